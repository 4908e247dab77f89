"""Preemption and crashes: SIGTERM saves and exits 143; kill -9 during a save never corrupts ``latest``."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from pipeline.tracking import read_metrics
from pipeline.train.checkpoint import COMPLETE, latest_complete

from .conftest import TINY_TRAIN, popen, run


def _train_cmd(shards: str, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobs.train",
        *TINY_TRAIN,
        f"data.shards={shards}",
        f"run.dir={run_dir}",
        "train.max_steps=40",
        "eval.every=1000",
        *extra,
    ]


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in read_metrics(path) if "loss" in r] if path.exists() else []


def test_sigterm_saves_and_exits_143(tiny_shards: str, tmp_path: Path) -> None:
    proc = popen(_train_cmd(tiny_shards, tmp_path, "checkpoint.every=1000"))
    deadline = time.monotonic() + 180
    while proc.poll() is None and max(_steps(tmp_path), default=0) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    saved = latest_complete(tmp_path)
    assert saved is not None and (saved / COMPLETE).exists()
    assert int(saved.name.removeprefix("step")) == max(_steps(tmp_path)) < 40  # the step it was in, finished


def test_kill_9_during_a_save_leaves_the_previous_checkpoint_loadable(tiny_shards: str, tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    killed_mid_save = False
    for _attempt in range(3):  # the save window is short: retry until the kill lands inside one
        proc = popen(_train_cmd(tiny_shards, tmp_path, "checkpoint.every=1", "checkpoint.keep=100"))
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            partial = [d for d in ckpts.glob("step*") if not (d / COMPLETE).exists()] if ckpts.exists() else []
            if partial and max(_steps(tmp_path), default=0) >= 3:
                proc.kill()  # SIGKILL: no handler, no cleanup
                break
            time.sleep(0.001)
        proc.communicate(timeout=60)
        if any(not (d / COMPLETE).exists() for d in ckpts.glob("step*")):
            killed_mid_save = True
            break
    assert killed_mid_save, "could not land a kill -9 inside a save in 3 attempts"
    newest_dir = max(ckpts.glob("step*"))
    good = latest_complete(tmp_path)
    assert good is not None and good != newest_dir and (good / COMPLETE).exists()
    assert (ckpts / "latest").read_text().strip() == good.name  # the pointer never named the partial save

    r = run(
        _train_cmd(tiny_shards, tmp_path, "checkpoint.every=1000", "checkpoint.resume=latest", "train.max_steps=12")
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert _steps(tmp_path)[-1] == 12
    assert not newest_dir.exists() or (newest_dir / COMPLETE).exists()  # the partial save was pruned or redone


def test_a_new_node_resumes_from_the_newest_complete_checkpoint_on_s3(
    tiny_shards: str, tmp_path: Path, s3_server
) -> None:
    import shutil

    remote = s3_server.make_bucket() + "/runs/demo"
    env = {**s3_server.env, "AWS_MAX_ATTEMPTS": "2"}
    common = ["checkpoint.every=3", f"checkpoint.remote={remote}", "checkpoint.keep=2"]
    r = run(_train_cmd(tiny_shards, tmp_path, *common, "train.max_steps=6"), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    keys = s3_server.keys(remote)
    assert "runs/demo/step00000006/COMPLETE" in keys and "runs/demo/latest" in keys
    assert not any("step00000003" in k for k in keys) or "runs/demo/step00000003/COMPLETE" in keys

    shutil.rmtree(tmp_path / "checkpoints")  # a new node: empty local disk
    r = run(_train_cmd(tiny_shards, tmp_path, *common, "train.max_steps=9", "checkpoint.resume=latest"), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fetching" in r.stderr
    steps = _steps(tmp_path)
    assert steps[-3:] == [7, 8, 9] and steps.count(6) == 1  # continued after step 6, nothing repeated
    assert "runs/demo/step00000009/COMPLETE" in s3_server.keys(remote)
