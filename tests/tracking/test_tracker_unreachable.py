"""A dead tracking server costs seconds and one warning, never the run."""

from __future__ import annotations

import logging
import socket
import time

from pipeline.tracking import MetricsLog, MlflowTracker

STEPS, STEP_S = 30, 0.05  # a simulated training loop: 30 steps of 50 ms


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def _session(tracker: MlflowTracker, tmp_path) -> float:
    """What a train loop does with its tracker; returns the wall time."""
    t0 = time.monotonic()
    tracker.start("unreachable", tags={"data.manifest_sha256": "ab12"})
    tracker.log_params({"optim.lr": "0.001"})
    jsonl = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(STEPS):
        time.sleep(STEP_S)
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step)
        jsonl.log(step, {"loss": 1.0 / (step + 1)})
    tracker.log_metrics_plot(jsonl.path, tmp_path / "plot.png")
    tracker.close()
    return time.monotonic() - t0


def test_unreachable_server_costs_seconds_and_one_warning(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    tracker = MlflowTracker("dead", uri=f"http://127.0.0.1:{_closed_port()}", retries=2, timeout_s=5)
    elapsed = _session(tracker, tmp_path)

    normal = STEPS * STEP_S
    assert elapsed < normal + 6.0, f"{elapsed:.1f} s for a {normal:.1f} s loop"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "unreachable" in warnings[0].getMessage()
    assert tracker.run_id is None
    assert tracker.stats.sent == 0 and tracker.stats.dropped_unreachable >= STEPS
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "plot.png").exists()
