"""The train loop's contract at its edges: bad config fails before launch; a dead MLflow costs seconds."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pipeline.tracking import read_metrics

from .conftest import TINY_TRAIN, free_port, run


def test_bad_config_key_or_type_fails_before_launch_naming_the_key(tmp_path: Path) -> None:
    r = run([sys.executable, "-m", "jobs.train", "optim.lrr=3e-4", f"run.dir={tmp_path}"])
    assert r.returncode == 2 and "optim.lrr" in r.stderr and "Traceback" not in r.stderr
    r = run([sys.executable, "-m", "jobs.train", "train.max_steps=ten", f"run.dir={tmp_path}"])
    assert r.returncode == 2 and "train.max_steps" in r.stderr
    assert not (tmp_path / "config.yaml").exists()  # nothing started


def test_unreachable_tracking_server_costs_seconds_and_warns_once(tiny_shards: str, tmp_path: Path) -> None:
    common = [*TINY_TRAIN, f"data.shards={tiny_shards}", "train.max_steps=6", "eval.every=3", "checkpoint.every=100"]
    start = time.monotonic()
    r = run([sys.executable, "-m", "jobs.train", *common, f"run.dir={tmp_path / 'a'}", "tracking.enabled=false"])
    baseline = time.monotonic() - start
    assert r.returncode == 0, r.stderr[-3000:]
    start = time.monotonic()
    dead = f"http://127.0.0.1:{free_port()}"
    r = run([sys.executable, "-m", "jobs.train", *common, f"run.dir={tmp_path / 'b'}", "tracking.enabled=true",
             f"tracking.uri={dead}", "tracking.timeout_s=2", "tracking.retries=1"])
    elapsed = time.monotonic() - start
    assert r.returncode == 0, r.stderr[-3000:]
    assert elapsed < baseline + 20, (baseline, elapsed)
    warnings = [line for line in r.stderr.splitlines() if "unreachable" in line.lower()]
    assert len(warnings) == 1, r.stderr[-3000:]
    # the run itself lost nothing: metrics.jsonl holds every step and the validations
    records = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [x["step"] for x in records if "loss" in x] == [1, 2, 3, 4, 5, 6]
    assert [x["step"] for x in records if "val_bits_per_dim" in x] == [0, 3, 6]
