"""Faults while saving: kill -9 mid-save, a full disk (RLIMIT_FSIZE on the running process), kill -9
mid-upload to S3, SIGTERM during validation. Every time, ``latest`` names a complete checkpoint whose files
match their recorded checksums, and ``checkpoint.resume=latest`` continues from it."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.train import main as train_main
from pipeline.tracking import read_metrics
from pipeline.train import checkpoint as ckpt
from tests.train.conftest import REPO

from .conftest import tiny


def _start(shards: Path, run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jobs.train", *tiny(shards, run_dir, "train.max_steps=100000", *extra)]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _latest(run_dir: Path) -> int:
    p = run_dir / "checkpoints" / "latest"
    return int(p.read_text().strip().removeprefix("step")) if p.exists() else 0


def _wait(cond, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _check_latest_and_resume(shards: Path, run_dir: Path) -> int:
    tag = ckpt.latest_complete(run_dir)
    assert tag is not None and (tag / ckpt.COMPLETE).exists()
    ckpt.verify_files(tag)  # every file as recorded at save time
    at = int(tag.name.removeprefix("step"))
    assert (
        train_main(
            tiny(
                shards,
                run_dir,
                f"train.max_steps={at + 2}",
                "checkpoint.every=100000",
                "eval.every=100000",
                "checkpoint.resume=latest",
            )
        )
        == 0
    )
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, at + 3)), steps[-5:]
    return at


@pytest.mark.timeout(240)
def test_kill9_during_saves_leaves_latest_complete(shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _start(shards, run_dir, "checkpoint.every=1", "checkpoint.keep=2", "eval.every=100000")
    root = run_dir / "checkpoints"

    def mid_save() -> bool:  # a tag directory newer than latest, without COMPLETE: a save in progress
        newest = max((p.name for p in root.glob("step*")), default="") if root.exists() else ""
        return (
            _latest(run_dir) >= 5
            and newest > ckpt.step_tag(_latest(run_dir))
            and not (root / newest / ckpt.COMPLETE).exists()
        )

    try:
        _wait(mid_save, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    partial = [p for p in root.glob("step*") if not (p / ckpt.COMPLETE).exists()]
    at = _check_latest_and_resume(shards, run_dir)
    assert partial and all(int(p.name.removeprefix("step")) > at for p in partial), (partial, at)


@pytest.mark.timeout(240)
def test_full_disk_while_saving_stops_with_one_line_and_resumes(shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _start(shards, run_dir, "checkpoint.every=40", "eval.every=100000")
    try:
        _wait(lambda: _latest(run_dir) >= 40, proc)
        # the kernel's file size limit on the running trainer: the next model-state file (≈470 kB) cannot be
        # written (EFBIG), while metrics.jsonl (a few kB) still can — what a full disk does to a save
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (200_000, 200_000))
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [ln for ln in err.splitlines() if ln.startswith("checkpoint error: ")]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    at = _check_latest_and_resume(shards, run_dir)
    assert f"{ckpt.step_tag(at)} stays in charge" in lines[0] and "saving checkpoint" in lines[0], lines[0]


@pytest.mark.timeout(240)
def test_sigterm_during_validation_saves_and_exits_143(shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # validation after every step, over batches of one sample: most of the run's time is validation
    proc = _start(shards, run_dir, "checkpoint.every=100000", "eval.every=1", "data.batch_size=1")
    try:
        _wait(
            lambda: (
                (run_dir / "metrics.jsonl").exists()
                and sum("val_samples" in r for r in read_metrics(run_dir / "metrics.jsonl")) >= 3
            ),
            proc,
        )
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err[-3000:]
    _check_latest_and_resume(shards, run_dir)


@pytest.mark.timeout(300)
def test_kill9_during_s3_upload_never_leaves_remote_latest_on_a_partial_tag(
    shards: Path, tmp_path: Path, s3_env
) -> None:
    from pipeline.train.remote import latest_remote

    remote = s3_env.make_bucket() + "/run"
    run_dir = tmp_path / "run"
    proc = _start(
        shards,
        run_dir,
        "checkpoint.every=1",
        "checkpoint.keep=3",
        "eval.every=100000",
        f"checkpoint.remote={remote}",
        env=s3_env.env,
    )
    try:
        _wait(lambda: len([k for k in s3_env.keys(remote) if k.endswith("/COMPLETE")]) >= 3, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    keys = s3_env.keys(remote)
    bucket, _, prefix = remote[len("s3://") :].partition("/")
    client = s3_env.client()
    named = client.get_object(Bucket=bucket, Key=f"{prefix}/latest")["Body"].read().decode().strip()
    assert f"{prefix}/{named}/COMPLETE" in keys
    state = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/{named}/state.json")["Body"].read())
    sizes = {
        o["Key"]: o["Size"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{named}/")["Contents"]
    }
    for rel, want in state["files"].items():  # every file of the tag, at its recorded size
        assert sizes.get(f"{prefix}/{named}/{rel}") == want["size"], (rel, want, sizes)
    assert latest_remote(remote) is not None
