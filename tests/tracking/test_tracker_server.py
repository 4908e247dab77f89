"""MlflowTracker over HTTP against a real ``mlflow server`` (sqlite backend, proxied artifacts)."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from mlflow import MlflowClient

from pipeline.config import flatten, load_config, save_resolved
from pipeline.tracking import MetricsLog, MlflowTracker


def _wait_sent(tracker: MlflowTracker, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while tracker.stats.sent < n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tracker.stats.sent >= n, tracker.stats


def test_run_over_http_reads_back(mlflow_server, tmp_path):
    cfg = load_config(None, ["run.name=http", "tracking.log_every=2", f"tracking.uri={mlflow_server}"])
    yaml_path = save_resolved(cfg, tmp_path / "config.yaml")
    jsonl = MetricsLog(tmp_path / "metrics.jsonl")
    tracker = MlflowTracker.from_config(cfg)
    with tracker:
        run_id = tracker.start("http", tags={"data.manifest_sha256": "cafe"})
        tracker.log_config(cfg, yaml_path)
        tracker.log_params({"AWS_SECRET_ACCESS_KEY": "nope"})
        for step in range(10):
            tracker.log_metrics({"loss": 10.0 - step, "bits_per_dim": 5.0 - step / 10}, step)
            jsonl.log(step, {"loss": 10.0 - step, "bits_per_dim": 5.0 - step / 10})
        tracker.log_metrics_plot(jsonl.path, tmp_path / "plot.png")
    assert tracker.stats.dropped == 0

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == flatten(cfg)
    assert run.data.tags["data.manifest_sha256"] == "cafe"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 2, 4, 6, 8]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied through the server
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {"plots/plot.png"}
    back = Path(client.download_artifacts(run_id, "config/config.yaml", str(tmp_path / "dl")))
    assert back.read_text() == yaml_path.read_text()


def test_server_killed_mid_run_costs_seconds_and_one_warning(mlflow_server_factory, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    server = mlflow_server_factory()
    tracker = MlflowTracker("killed", uri=server.uri, retries=2, timeout_s=5)
    run_id = tracker.start("killed")
    for step in range(10):
        tracker.log_metrics({"loss": float(step)}, step)
    _wait_sent(tracker, 10)

    server.kill()
    t0 = time.monotonic()
    for step in range(10, 40):
        time.sleep(0.05)
        tracker.log_metrics({"loss": float(step)}, step)
    tracker.close()
    elapsed = time.monotonic() - t0

    assert elapsed < 30 * 0.05 + 6.0, f"{elapsed:.1f} s after the kill"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
    assert run_id and tracker.stats.sent == 10 and tracker.stats.dropped_unreachable >= 30


def test_server_frozen_at_the_end_of_a_run_still_gets_its_one_warning(mlflow_server_factory, tmp_path, caplog):
    # a server that stops answering just before the run ends never fails a send (it hangs): close() gives up
    # after timeout_s, and that is the store being unreachable too — the run's one warning must say so
    caplog.set_level(logging.DEBUG)
    server = mlflow_server_factory()
    tracker = MlflowTracker("frozen", uri=server.uri, retries=2, timeout_s=2)
    run_id = tracker.start("frozen")
    for step in range(5):
        tracker.log_metrics({"loss": float(step)}, step)
    _wait_sent(tracker, 5)

    os.killpg(server.proc.pid, signal.SIGSTOP)  # frozen, not dead: connections are accepted, nothing answers
    try:
        for step in range(5, 10):
            tracker.log_metrics({"loss": float(step)}, step)
        t0 = time.monotonic()
        stats = tracker.close()
        elapsed = time.monotonic() - t0
    finally:
        os.killpg(server.proc.pid, signal.SIGCONT)
    assert elapsed < 2 + 1.0, f"close took {elapsed:.1f} s with timeout_s=2"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
    assert "did not finish within 2 s" in warnings[0].getMessage()
    assert run_id and stats.sent == 5
