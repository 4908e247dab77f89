"""A real training run (``python -m jobs.train``) against a real ``mlflow server``: what it logs over HTTP, and
what a server that dies mid-run costs it. (``test_tracker_server.py`` covers the tracker alone, driven by a
simulated loop; here the whole train loop drives it.)"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mlflow import MlflowClient

from pipeline.config import flatten, load_config
from pipeline.data import load_manifest, manifest_name
from pipeline.tracking import read_metrics, redact_params
from tests.train.conftest import TINY_TRAIN, popen, tiny_shards  # noqa: F401  (session fixture)

STEPS, EVAL = 12, 6


def _train_args(shards: str, run_dir: Path, uri: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobs.train",
        *(o for o in TINY_TRAIN if not o.startswith("tracking.")),
        f"data.shards={shards}",
        f"run.dir={run_dir}",
        f"train.max_steps={STEPS}",
        f"eval.every={EVAL}",
        "checkpoint.every=1000",
        "tracking.enabled=true",
        f"tracking.uri={uri}",
        "tracking.log_every=1",
        "tracking.experiment=server-training",
        "tracking.timeout_s=2",
        "tracking.retries=1",
    ]


def _run_of(client: MlflowClient, run_dir: Path):
    exp = client.get_experiment_by_name("server-training")
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.`run.dir` = '{run_dir.resolve()}'")
    return runs[0] if runs else None


def test_training_run_logs_over_http_and_a_server_killed_mid_run_costs_seconds(
    mlflow_server,
    mlflow_server_factory,
    tiny_shards,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    # Two identical runs start together, so they see the same load on a shared machine: one against a live
    # server, one against a server that is killed as soon as the run's first step metrics reached it.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one core each: two 2-thread runs on 2 cores thrash
    server = mlflow_server_factory()
    private = MlflowClient(server.uri)
    start = time.monotonic()
    alive = popen(_train_args(tiny_shards, tmp_path / "alive", mlflow_server))
    dying = popen(_train_args(tiny_shards, tmp_path / "killed", server.uri))
    while dying.poll() is None:
        seen = _run_of(private, tmp_path / "killed")
        if seen is not None and private.get_metric_history(seen.info.run_id, "loss"):
            break
        time.sleep(0.1)
    killed_mid_run = dying.poll() is None
    server.kill()
    ends = {}
    outs = {}
    for name, proc in (("killed", dying), ("alive", alive)):
        outs[name], _ = proc.communicate(timeout=600)
        ends[name] = time.monotonic() - start
        assert proc.returncode == 0, outs[name][-3000:]

    # 1. the live server got the params, every step's metrics, the validations, artifacts and tags over HTTP
    client = MlflowClient(mlflow_server)
    logged = _run_of(client, tmp_path / "alive")
    assert logged is not None and logged.info.status == "FINISHED"
    assert logged.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server, not a local path
    cfg = load_config(tmp_path / "alive" / "config.yaml", [])
    assert logged.data.params == redact_params(flatten(cfg))  # every config key, secret-looking ones dropped
    rid = logged.info.run_id
    assert [m.step for m in client.get_metric_history(rid, "loss")] == list(range(1, STEPS + 1))
    assert [m.step for m in client.get_metric_history(rid, "val_bits_per_dim")] == [0, EVAL, STEPS]
    assert {a.path for a in client.list_artifacts(rid, "config")} == {"config/config.yaml"}
    assert {a.path for a in client.list_artifacts(rid, "plots")} == {"plots/metrics.png"}
    train_manifest = load_manifest(f"{tiny_shards}/{manifest_name('train')}")
    assert logged.data.tags["data.train_manifest_sha256"] == train_manifest.manifest_checksum()

    # 2. the killed server cost the other run seconds and one warning, and nothing of the run itself
    assert killed_mid_run, "the run ended before its first metrics reached the server"
    assert ends["killed"] < ends["alive"] + 15, ends
    warnings = [line for line in outs["killed"].splitlines() if "WARNING" in line and "unreachable" in line]
    assert len(warnings) == 1, outs["killed"][-3000:]
    records = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [x["step"] for x in records if "loss" in x] == list(range(1, STEPS + 1))
    assert [x["step"] for x in records if "val_bits_per_dim" in x] == [0, EVAL, STEPS]
