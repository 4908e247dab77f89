"""Real ranks: the demo config on 2 ranks (a val split with fewer shards than ranks), ZeRO-0 resumed
2 → 1 → 2 ranks with Adam's state, and a rank lost (kill -9 / SIGSTOP) under a per-rank launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jobs.demo import shard_stereo
from jobs.train import main as train_main
from pipeline.data import build_eval_loader, load_manifest
from pipeline.tracking import read_metrics
from tests.conftest import free_port
from tests.train.conftest import REPO, run, torchrun_cmd

from .conftest import tiny
from .rank_worker import adam_matches, adam_matches_universal, universal_steps

DEMO = [
    "--config",
    "launch/configs/demo.yaml",
    "tracking.enabled=false",
    "train.log_every=1",
    "optim.warmup_steps=2",
    "eval.every=4",
    "checkpoint.every=4",
]


def _trained_keys(run_dir: Path) -> dict[int, list[list[str]]]:
    """step -> the micro-batch keys of every rank that trained it (train.log_keys), rank order."""
    by_step: dict[int, list[list[str]]] = {}
    for f in sorted((run_dir / "keys").glob("rank*.jsonl")):
        for row in read_metrics(f):
            by_step.setdefault(row["step"], []).append(row["keys"])
    return by_step


@pytest.mark.timeout(420)
def test_demo_config_on_two_ranks_resumes_2_to_1_to_2_with_adam_state(tmp_path: Path, caplog) -> None:
    shards, run_dir = tmp_path / "stereo", tmp_path / "run"
    shard_stereo(str(shards))
    val = load_manifest(str(shards / "manifest-val.json"))
    train = load_manifest(str(shards / "manifest-train.json"))
    assert len(val.shards) == 1  # fewer val shards than ranks: rank 1 contributes nothing, and that works
    common = [*DEMO, f"data.shards={shards}", f"run.dir={run_dir}", "train.log_keys=true"]
    r = run(torchrun_cmd(2, "-m", "jobs.train", *common, "train.max_steps=4"), timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [row["val_samples"] for row in rows if "val_samples" in row] == [val.total_samples] * 2

    # 2 → 1: the loaded optimizer equals the saved one bit for bit, then the run continues
    tag4 = run_dir / "checkpoints" / "step00000004"
    got = adam_matches(tag4)
    assert got["same"] and got["adam_steps"] == [4] and got["scheduler_epoch"] == got["saved_scheduler_epoch"] == 4, got
    from pipeline import dist

    dist.cleanup()
    assert train_main([*common, "train.max_steps=6", "checkpoint.every=6", "checkpoint.resume=latest"]) == 0
    assert any("written by 2 ranks) on 1 ranks" in r.getMessage() for r in caplog.records)
    # 1 → 2, on to one step past the end of the epoch: 4·16 + 2·8 samples, then the 338 left = 21 steps of 16
    # with 2 carried into the next round, whose first step trains them ahead of epoch 1's first 14
    end = 6 + (train.total_samples - 80) // 16 + 1
    r = run(
        torchrun_cmd(2, "-m", "jobs.train", *common, f"train.max_steps={end}", "checkpoint.resume=latest"), timeout=180
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "written by 1 ranks) on 2 ranks" in r.stderr
    final = torch.load(run_dir / "checkpoints" / f"step{end:08d}" / "mp_rank_00_model_states.pt", weights_only=True)
    assert {int(v["step"]) for v in final["optimizer"]["state"].values()} == {end}, "Adam's step == steps trained"
    assert final["lr_scheduler"]["last_epoch"] == end
    steps = [row["step"] for row in read_metrics(run_dir / "metrics.jsonl") if "loss" in row]
    assert steps == list(range(1, end + 1)), steps
    # every key of epoch 0 trained exactly once across the resizes (the keys logs were cut back on each resume)
    trained = _trained_keys(run_dir)
    assert sorted(trained) == list(range(1, end + 1))
    assert [len(trained[s]) for s in range(1, end + 1)] == [2] * 4 + [1] * 2 + [2] * (end - 6)
    epoch0 = [k for s in range(1, end) for batch in trained[s] for k in batch] + trained[end][0][:2]
    every = {
        k
        for batch in build_eval_loader(train, 64, rank=0, world_size=1, num_workers=0, decode=None)
        for k in batch["__key__"]
    }
    assert len(epoch0) == len(set(epoch0)) == train.total_samples and set(epoch0) == every


@pytest.mark.timeout(480)
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stage_resumes_at_other_world_sizes_through_universal_checkpoints(
    shards: Path, tmp_path: Path, stage: int, caplog
) -> None:
    from pipeline import dist

    run_dir = tmp_path / "run"
    ema = ["optim.ema=0.9"] if stage == 2 else []  # EMA weights travel with a resize (ZeRO-3 refuses EMA)
    common = tiny(shards, run_dir, f"deepspeed.zero_stage={stage}", "eval.every=4", "checkpoint.every=4", *ema)
    r = run(torchrun_cmd(2, "-m", "jobs.train", *common, "train.max_steps=4"), timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    tag4 = run_dir / "checkpoints" / "step00000004"
    got = adam_matches_universal(tag4)  # 2 → 1: moments, fp32 weights, step, scheduler as saved
    dist.cleanup()
    assert got["same"] and got["compared"] > 100 and got["saved_steps"] == [4], got
    assert got["client_step"] == got["scheduler_epoch"] == 4, got
    assert (
        train_main([*common, "train.max_steps=6", "checkpoint.every=6", "eval.every=6", "checkpoint.resume=latest"])
        == 0
    )
    dist.cleanup()
    assert any("written by 2 ranks) on 1 ranks" in r.getMessage() for r in caplog.records)
    if stage == 3:  # once is enough for ZeRO-3 (the slowest launches)
        assert universal_steps(run_dir / "checkpoints" / "step00000006") == [6]
        return
    r = run(
        torchrun_cmd(2, "-m", "jobs.train", *common, "train.max_steps=8", "checkpoint.resume=latest"), timeout=180
    )  # 1 → 2
    assert r.returncode == 0, r.stderr[-3000:]
    assert universal_steps(run_dir / "checkpoints" / "step00000008") == [8], "Adam's step == steps trained"
    steps = [row["step"] for row in read_metrics(run_dir / "metrics.jsonl") if "loss" in row]
    assert steps == list(range(1, 9)), steps
    ema_steps = [row["step"] for row in read_metrics(run_dir / "metrics.jsonl") if "val_ema_bits_per_dim" in row]
    assert ema_steps == [0, 4, 6, 8], ema_steps
    saved = torch.load(run_dir / "checkpoints" / "step00000008" / "trainer-rank0.pt", weights_only=True)["ema"]
    assert saved and all(torch.isfinite(v).all() for v in saved.values())


def _per_rank(shards: Path, run_dir: Path, port: int, rank: int, *extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "PYTHONWARNINGS": "ignore",
    }
    cmd = [
        sys.executable,
        "-m",
        "jobs.train",
        *tiny(shards, run_dir, "train.max_steps=100000", "eval.every=100000", "checkpoint.every=100000", *extra),
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_step(run_dir: Path, step: int, procs, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = run_dir / "metrics.jsonl"
        if m.exists() and any(r.get("step", 0) >= step and "loss" in r for r in read_metrics(m)):
            return
        assert all(p.poll() is None for p in procs), [p.stderr.read()[-2000:] for p in procs if p.poll() is not None]
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout}s")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["kill9", "sigstop"])
def test_a_lost_rank_ends_the_others_within_the_bound_naming_it(shards: Path, tmp_path: Path, how: str) -> None:
    bound = 10.0
    run_dir, port = tmp_path / "run", free_port()
    procs = [_per_rank(shards, run_dir, port, r, f"train.collective_timeout_s={bound}") for r in (0, 1)]
    try:
        _wait_for_step(run_dir, 3, procs)
        t0 = time.monotonic()
        os.kill(procs[1].pid, signal.SIGKILL if how == "kill9" else signal.SIGSTOP)
        _, err = procs[0].communicate(timeout=bound + 30)
        took = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert procs[0].returncode == 1 and len(lines) == 1, err[-3000:]
    assert "lost rank(s) 1" in lines[0] and f"train.collective_timeout_s={bound:g}" in lines[0], lines[0]
    assert took < bound + 15, took  # a dead peer is seen at once; a hung one at the bound (+ heartbeat check)


@pytest.mark.timeout(240)
def test_a_rank_killed_under_torchrun_ends_the_job_within_the_bound(shards: Path, tmp_path: Path) -> None:
    import psutil

    bound = 10.0
    run_dir = tmp_path / "run"
    cmd = torchrun_cmd(
        2,
        "-m",
        "jobs.train",
        *tiny(
            shards,
            run_dir,
            "train.max_steps=100000",
            "eval.every=100000",
            "checkpoint.every=100000",
            f"train.collective_timeout_s={bound}",
        ),
    )
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_step(run_dir, 3, [proc])
        ranks = {
            int(c.environ().get("RANK", -1)): c
            for c in psutil.Process(proc.pid).children(recursive=True)
            if "RANK" in c.environ()
        }
        t0 = time.monotonic()
        ranks[1].send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=bound + 60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and took < bound + 30, (proc.returncode, took)
    # torchrun's summary names the lost rank (exit -9); the survivor exits without waiting on it
    assert "rank      : 1" in err and "exitcode  : -9" in err, err[-3000:]


@pytest.mark.timeout(120)
def test_a_rank_that_never_joins_ends_the_rendezvous_within_the_bound(shards: Path, tmp_path: Path) -> None:
    bound = 5.0
    proc = _per_rank(shards, tmp_path / "run", free_port(), 0, f"train.collective_timeout_s={bound}")
    t0 = time.monotonic()
    try:
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "did not form" in lines[0] and f"train.collective_timeout_s={bound:g}" in lines[0], lines[0]
    assert time.monotonic() - t0 < bound + 40  # imports (seconds on a shared core) + the bound
