"""Ray Tune sweeps (``python -m jobs.sweep``) on one local Ray cluster of 2 CPUs for the whole module.

The sweeps run the real thing end to end: Tune trials calling ``train_loop`` on the tiny stereo shards, ASHA
stopping trials, a Ray Train TorchTrainer of 2 DeepSpeed ZeRO-2 ranks, MLflow parent + nested runs in a sqlite
store, the best trial consolidated for ``jobs.register``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from jobs.sweep import main as sweep_main
from pipeline.config import load_config
from pipeline.tune import SpaceError, load_space
from tests.train.conftest import TINY_TRAIN, tiny_shards  # noqa: F401  (the session's tiny shards fixture)

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "launch" / "sweeps"
# the tiny config of the training tests, on CPU, with the tracking the sweep drives
TINY = [o for o in TINY_TRAIN if not o.startswith("tracking.")] + ["run.device=cpu", "checkpoint.keep=3"]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _args(tmp_path: Path, shards: str, space: Path, name: str) -> list[str]:
    return [
        "--space",
        str(space),
        "--name",
        name,
        "--quiet",
        *TINY,
        f"data.shards={shards}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.experiment=sweeps",
    ]


def _space(tmp_path: Path, source: str, storage: Path) -> Path:
    """A launch/sweeps file with its storage pointed into the test's directory."""
    doc = yaml.safe_load((SWEEPS / source).read_text()) | {"storage": str(storage)}
    path = tmp_path / source
    path.write_text(yaml.safe_dump(doc))
    return path


def _runs(tmp_path: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sweeps")
    return client, client.search_runs([exp.experiment_id], max_results=100)


# -- the space file: checked before Ray starts -----------------------------------------------------------


@pytest.mark.parametrize(
    "body, named",
    [
        ({"space": {"optim.lrr": {"loguniform": [1e-4, 1e-2]}}}, "optim.lrr"),
        ({"space": {"model.blocks_per_level": {"uniform": [1, 3]}}}, "model.blocks_per_level"),  # float into an int
        ({"space": {"optim.lr": {"loguniform": [0.0, 1e-2]}}}, "optim.lr"),
        ({"space": {"optim.lr": {"lognormal": [1, 2]}}}, "lognormal"),
        ({"space": {"optim.lr": 3e-4}}, "optim.lr"),  # a constant belongs under fixed
        ({"space": {"model.partitions": {"choice": ["all", "mmcaa"]}}}, "model.partitions"),
        ({"space": {"run.dir": {"choice": ["/a", "/b"]}}}, "run.dir"),
        ({"space": {"optim.lr": {"choice": [1e-3]}}, "fixed": {"train.max_stepz": 4}}, "train.max_stepz"),
        ({"space": {"optim.lr": {"choice": [1e-3]}}, "resources": {"workers": 0}}, "resources.workers"),
        ({"space": {"optim.lr": {"choice": [1e-3]}}, "scheduler": {"name": "pbt"}}, "scheduler.name"),
        ({"space": {"optim.lr": {"choice": [1e-3]}}, "storage": "relative/dir"}, "storage"),
        ({"space": {"optim.lr": {"choice": [1e-3]}}, "num_sample": 4}, "num_sample"),
    ],
)
def test_bad_space_file_is_refused_naming_the_key(tmp_path, body, named):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(SpaceError, match=named.replace(".", r"\.")):
        load_space(path, load_config(None, []))


def test_jobs_sweep_exits_2_on_a_bad_space_before_ray_starts(tmp_path, capsys):
    import ray

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"space": {"optim.lrr": {"choice": [1e-3]}}}))
    assert sweep_main(["--space", str(path)]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_launch_space_files_are_valid(tiny_shards):  # noqa: F811
    demo = load_config(REPO / "launch/configs/demo.yaml", [])
    for path in sorted(SWEEPS.glob("*.yaml")):
        # an ablation space <recipe>_tableN_*.yaml is checked against its recipe, the others against the demo
        recipe = REPO / "launch/configs" / f"{path.stem.split('_table')[0]}.yaml"
        base = load_config(recipe, []) if "_table" in path.stem else demo
        spec = load_space(path, base)
        assert spec.space and spec.scheduler["max_t"] >= spec.scheduler["grace_period"]


# -- real sweeps -----------------------------------------------------------------------------------------


def test_asha_sweep_stops_trials_early_nests_runs_and_writes_the_best(
    ray_cluster,
    tiny_shards,  # noqa: F811
    tmp_path,
    capsys,
):
    storage = tmp_path / "sweeps"
    assert sweep_main(_args(tmp_path, tiny_shards, _space(tmp_path, "tiny.yaml", storage), "asha")) == 0
    out = capsys.readouterr().out
    table = out[out.index("trial ") :]
    rows = [line.split() for line in table.splitlines()[2:] if line.split() and "_" in line.split()[0]]
    assert len(rows) == 4, table
    status = {r[0]: " ".join(r[1:3]) if r[1] == "stopped" else r[1] for r in rows}
    assert "completed" in status.values() and "stopped early" in status.values(), table

    # MLflow: one parent, four nested runs (one per trial, each pointing at its own run dir); stopped ones KILLED
    client, runs = _runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    by_trial = {Path(c.data.tags["run.dir"]).name: c for c in children}
    assert set(by_trial) == set(status)
    for trial, c in by_trial.items():
        assert c.data.tags["sweep.status"] == status[trial]
        assert c.info.status == ("FINISHED" if status[trial] == "completed" else "KILLED"), (trial, c.info.status)
        assert c.data.params["tracking.parent_run_id"] == parent.info.run_id
        history = client.get_metric_history(c.info.run_id, "val_bits_per_dim")
        assert history and all(math.isfinite(m.value) for m in history)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} >= {
        "sweep/results.txt",
        "sweep/results.csv",
        "sweep/best.json",
        "sweep/tiny.yaml",
    }
    assert parent.data.metrics["trials_stopped_early"] >= 1 and parent.data.metrics["trials_completed"] >= 1

    # the best trial: the lowest last validation among trials whose checkpoint is of that step
    best = json.loads((storage / "asha" / "best.json").read_text())
    logged = Path(client.download_artifacts(parent.info.run_id, "sweep/results.csv", str(tmp_path / "dl")))
    lasts = {r["trial_id"]: float(r["last"]) for r in csv.DictReader(logged.open())}
    assert best["value"] == min(lasts.values()) and best["trial_id"] in status
    assert best["mlflow_run_id"] == by_trial[best["trial_id"]].info.run_id
    assert Path(best["checkpoint"]).name == f"step{best['step']:08d}"
    from pipeline.train.consolidate import load_model

    model, cfg = load_model(best["weights"])
    assert (
        cfg.optim.lr == pytest.approx(best["params"]["optim.lr"])
        and cfg.model.partitions == best["params"]["model.partitions"]
    )
    assert Path(best["config"]).is_file() and cfg.train.max_steps == 6


def test_trial_on_two_ray_train_workers_runs_deepspeed_zero2(ray_cluster, tiny_shards, tmp_path, capsys):  # noqa: F811
    from pipeline.train import checkpoint as ckpt

    storage = tmp_path / "sweeps"
    assert sweep_main(_args(tmp_path, tiny_shards, _space(tmp_path, "tiny_zero2.yaml", storage), "zero2")) == 0
    assert "completed" in capsys.readouterr().out
    best = json.loads((storage / "zero2" / "best.json").read_text())
    state = ckpt.read_state(Path(best["checkpoint"]))
    # two ranks wrote the checkpoint: Ray Train's RANK/WORLD_SIZE were detected and DeepSpeed ran ZeRO-2 over them
    assert state["world_size"] == 2 and state["config"]["deepspeed"]["zero_stage"] == 2 and state["step"] == 4
    assert sorted(p.name for p in Path(best["checkpoint"]).glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]  # one shard per rank
    assert sorted(p.name for p in Path(best["checkpoint"]).glob("trainer-rank*.pt")) == [
        "trainer-rank0.pt",
        "trainer-rank1.pt",
    ]
    client, runs = _runs(tmp_path)
    child = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(child) == 1 and child[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(child[0].info.run_id, "val_bits_per_dim")] == [0, 2, 4]
