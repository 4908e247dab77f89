"""Real two-"node" training through the rendered sbatch scripts, under the fake SLURM of conftest.py.

One run directory, three jobs, each 2 nodes × 1 rank (c10d / master on 127.0.0.1, the first host of
``127.0.0.[1-2]``), the tiny density model with ZeRO-3 — launches are batched because each costs ~20 s of
imports on 2 cores:

1. ``--launcher torchrun``: two torchrun invocations (``--nnodes=2 --nproc_per_node=1``). SIGUSR2 goes to the
   batch shell, as SLURM's ``--signal=B:USR2`` does; the script's trap forwards it to srun, srun to each node's
   ``node.sh``, node.sh to the ranks under torchrun. Both ranks save, the job requeues itself.
2. ``--launcher deepspeed``: the deepspeed launcher per node with the rendered two-host hostfile in ``--no_ssh``
   mode, node rank from each node's ``$SLURM_NODEID``; resumes job 1's checkpoint, is preempted the same way.
3. ``--launcher accelerate``: ``accelerate launch`` per node; resumes job 2's checkpoint and finishes.

The train loop never learns which launcher started it; resuming across launchers shows it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.data import write_split
from pipeline.launch import LaunchSpec, render
from pipeline.tracking import read_metrics
from tests.conftest import free_port
from tests.train.conftest import TINY_TRAIN

from .conftest import FakeSlurm

DEMO = str(Path(__file__).resolve().parents[2] / "launch" / "configs" / "demo.yaml")
MAX_STEPS = 40


@dataclass
class Job:
    job_id: int
    launcher: str
    rc: int
    out: str
    latest: int  # step of the newest complete checkpoint after the job
    steps: list[int]  # logged training steps in metrics.jsonl after the job
    node_logs: list[str]
    saved: set[str]  # files of that checkpoint (checkpoint.keep prunes it later)


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path) if "loss" in r] if path.exists() else []


def _latest(run_dir: Path) -> int:
    latest = run_dir / "checkpoints" / "latest"
    return int(latest.read_text().strip().removeprefix("step")) if latest.exists() else 0


def _run_job(
    fake: FakeSlurm,
    run_dir: Path,
    shards: str,
    job_id: int,
    launcher: str,
    preempt_after: int | None,
    max_steps: int = MAX_STEPS,
) -> Job:
    cfg = load_config(
        DEMO,
        [
            *TINY_TRAIN,
            f"data.shards={shards}",
            f"run.dir={run_dir}",
            "deepspeed.zero_stage=3",
            f"train.max_steps={max_steps}",
            "checkpoint.every=1000",
            "eval.every=1000",
            f"launch.python={sys.executable}",
            f"launch.rdzv_port={free_port()}",
        ],
    )  # not the job-id port: other tests may hold it
    (art,) = render(cfg, LaunchSpec("slurm", 2, 0, launcher=launcher)).artifacts
    script = run_dir.parent / f"{launcher}.sbatch"
    script.write_text(art.text)
    proc = subprocess.Popen(
        ["bash", str(script)],
        env={**os.environ, **fake.env(job_id)},
        cwd=run_dir.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if preempt_after is not None:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if max(_steps(run_dir), default=0) >= preempt_after:
                proc.send_signal(signal.SIGUSR2)  # SLURM's warning goes to the batch shell only
                break
            time.sleep(0.1)
    out, _ = proc.communicate(timeout=240)
    logs = sorted((run_dir / "logs" / f"mango-demo-{job_id}").glob("node*.log"))
    latest = _latest(run_dir)
    tag = run_dir / "checkpoints" / f"step{latest:08d}"
    saved = {p.name for p in tag.iterdir()} if tag.is_dir() else set()
    return Job(
        job_id,
        launcher,
        proc.returncode,
        out,
        latest,
        _steps(run_dir),
        [p.read_text(errors="replace") for p in logs],
        saved,
    )


@pytest.fixture(scope="module")
def jobs(fake_slurm: FakeSlurm, tmp_path_factory: pytest.TempPathFactory) -> list[Job]:
    root = tmp_path_factory.mktemp("cluster")
    shards = str(root / "stereo8")
    for split, per_shard in (("train", 24), ("val", 3)):  # as tests/train/conftest.py: 2 ranks, one val shard each
        write_split(
            "embedded",
            "stereo",
            shards,
            split,
            options={"patch": 8, "downscale": 8},
            samples_per_shard=per_shard,
            progress=False,
        )
    run_dir = root / "run"
    (run_dir / "logs").mkdir(parents=True)  # `jobs.launch --submit` creates it; SLURM would not
    first = _run_job(fake_slurm, run_dir, shards, 101, "torchrun", preempt_after=1)
    assert first.rc == 0, first.out[-3000:] + "".join(log[-2000:] for log in first.node_logs)
    second = _run_job(fake_slurm, run_dir, shards, 102, "deepspeed", preempt_after=first.latest + 1)
    assert second.rc == 0, second.out[-3000:] + "".join(log[-2000:] for log in second.node_logs)
    third = _run_job(fake_slurm, run_dir, shards, 103, "accelerate", None, max_steps=second.latest + 2)
    assert third.rc == 0, third.out[-3000:] + "".join(log[-2000:] for log in third.node_logs)
    return [first, second, third]


def test_usr2_reaches_the_ranks_through_the_trap_srun_and_node_wrapper(jobs: list[Job]) -> None:
    for job in jobs[:2]:
        assert "USR2 at" in job.out and "srun: forwarding SIGUSR2 to 2 task(s)" in job.out, job.out[-2000:]
        assert len(job.node_logs) == 2  # one log per node, in the job's own log directory
        for log in job.node_logs:
            assert "node.sh: forwarding SIGUSR2 to ranks" in log, log[-2000:]
            assert "received SIGUSR2: saved step" in log, log[-2000:]


def test_both_ranks_checkpoint_and_the_job_requeues(jobs: list[Job], fake_slurm: FakeSlurm) -> None:
    requeued = fake_slurm.records("requeue")
    first, second, third = jobs
    assert "101" in requeued and "102" in requeued and "103" not in requeued
    assert 1 <= first.latest < second.latest < MAX_STEPS
    for job in (first, second):
        assert {"COMPLETE", "trainer-rank0.pt", "trainer-rank1.pt"} <= job.saved
        assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= job.saved  # ZeRO-3: a shard per rank


def test_each_relaunch_resumes_where_the_last_job_saved(jobs: list[Job], fake_slurm: FakeSlurm) -> None:
    first, second, third = jobs
    assert first.steps == list(range(1, first.latest + 1))  # stopped right after the step it saved
    assert second.steps == list(range(1, second.latest + 1))  # continued from first.latest: no step repeated
    assert third.steps == list(range(1, second.latest + 3)) and third.latest == second.latest + 2
    launched = [" ".join(argv) for argv in fake_slurm.records("srun")]
    for launcher in ("torch.distributed.run", "deepspeed.launcher.runner", "accelerate.commands.launch"):
        assert sum(launcher in cmd for cmd in launched) == 1, launched  # one step per job, each its own launcher
