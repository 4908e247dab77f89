"""The sweep driver: parent MLflow run, the Tuner, the results table, the best trial's files."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config, apply_overrides, to_dict
from pipeline.tracking import bound_http_retries, ensure_experiment, project_root, resolve_tracking_uri
from pipeline.train.consolidate import config_path, consolidate

from .space import SpaceError, SweepSpec, tune_space
from .trial import TrialContext, run_trial, trial_config

_DRIVER_MEMORY = 256 * 2**20  # bytes booked by a trial that drives a multi-worker TorchTrainer
_PATH_KEYS = ("data.shards", "model.init_weights", "model.encoder_weights")  # made absolute: trials run elsewhere


@dataclass
class TrialRow:
    """One line of the results table."""

    trial_id: str
    status: str  # completed | stopped early | error
    step: int
    validations: int
    params: dict[str, Any]
    last: float
    best: float
    run_dir: str
    checkpoint_dir: str = ""
    checkpoint_step: int = -1
    mlflow_run_id: str = ""
    error: str = ""


@dataclass
class SweepResult:
    """What :func:`run_sweep` returns: the rows (table order), the best row, and where things were written."""

    spec: SweepSpec
    sweep_dir: Path
    rows: list[TrialRow]
    best: TrialRow | None
    table: str
    parent_run_id: str = ""
    best_json: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def run_sweep(base: Config, spec: SweepSpec, *, sweep_name: str | None = None, verbose: int = 1) -> SweepResult:
    """Run the sweep on the Ray cluster this process is connected to (``ray.init`` first if it is not: a
    local cluster, or ``RAY_ADDRESS``); returns once every trial ended, after writing the best trial's files."""
    import ray  # heavy: optional Ray dependency, only for a sweep

    name = sweep_name or spec.name
    base = _absolute_paths(apply_overrides(base, spec.fixed))
    sweep_dir = _new_sweep_dir(spec, name)
    parent = _ParentRun.open(base, spec, name) if base.tracking.enabled else None
    ctx = TrialContext(
        base=to_dict(base),
        sweep=name,
        sweep_dir=str(sweep_dir),
        storage=spec.storage,
        metric=spec.metric,
        workers=spec.workers,
        cpus_per_worker=spec.cpus_per_worker,
        gpus_per_worker=spec.gpus_per_worker,
        tracking_uri=parent.uri if parent else "",
        parent_run_id=parent.run_id if parent else "",
    )
    scheduler = _scheduler(spec)
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False)
    tuner = _tuner(spec, ctx, name, scheduler, verbose)
    started = time.monotonic()
    try:
        grid = tuner.fit()
        rows = _rows(grid, spec, ctx)
    except BaseException:
        if parent is not None:
            parent.close("FAILED")
        raise
    if parent is not None:
        parent.attach_children(rows, base.tracking.experiment)
    best = pick_best(rows, spec.mode)
    table = format_table(rows, spec, best)
    result = SweepResult(spec, sweep_dir, rows, best, table, parent.run_id if parent else "")
    result.extra["wall_s"] = time.monotonic() - started
    if best is not None:
        result.best_json = write_best(result, ctx)
    if parent is not None:
        parent.finish(result)
    return result


def _new_sweep_dir(spec: SweepSpec, name: str) -> Path:
    """The local sweep directory (under the project's runs/sweeps when the storage is remote), made; one that
    already holds a sweep is an error."""
    sweep_dir = (Path(spec.storage) if not spec.remote else project_root() / "runs" / "sweeps") / name
    if (sweep_dir / "best.json").exists() or (sweep_dir / "trials").exists():
        raise SpaceError(f"sweep directory {sweep_dir} already holds a sweep; pick another name (--name)")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    return sweep_dir


def _trial_resources(spec: SweepSpec) -> dict[str, float]:
    """What Tune books for one trial's actor."""
    if spec.workers == 1:
        return {"cpu": spec.cpus_per_worker, "gpu": spec.gpus_per_worker}
    # the trial actor only drives a TorchTrainer whose workers reserve their own CPUs/GPUs in their own
    # placement group; a CPU here would leave a 2-CPU node unable to place 2 one-CPU workers. Ray refuses an
    # all-zero request, so the driver books what it really uses: memory (a Python process, ~256 MiB).
    return {"cpu": 0, "memory": _DRIVER_MEMORY}


def _scheduler(spec: SweepSpec):
    """ASHA (early stopping, in validations) or FIFO, as the space file's scheduler section says."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler  # heavy: optional Ray dependency

    s = spec.scheduler
    # max_t one past the last validation: trials end on their own at train.max_steps, and ASHA stopping a trial at
    # max_t would kill its actor before train_loop closes the MLflow run (the rungs stay those of max_t)
    return (
        ASHAScheduler(
            time_attr="training_iteration",
            max_t=s["max_t"] + 1,
            grace_period=s["grace_period"],
            reduction_factor=s["reduction_factor"],
        )
        if s["name"] == "asha"
        else FIFOScheduler()
    )


def _tuner(spec: SweepSpec, ctx: TrialContext, name: str, scheduler, verbose: int):
    """The Tuner: one ``run_trial`` per sampled config, seeded sampling, the concurrency cap."""
    from ray import tune  # heavy: optional Ray dependency
    from ray.tune.search.basic_variant import BasicVariantGenerator  # heavy: optional Ray dependency

    def mango_trial(params: dict[str, Any]) -> None:
        run_trial(params, ctx)

    return tune.Tuner(
        tune.with_resources(mango_trial, _trial_resources(spec)),
        param_space=tune_space(spec),
        # the concurrency cap goes to the search algorithm: Tune ignores TuneConfig.max_concurrent_trials when a
        # BasicVariantGenerator instance (needed for the seed) is passed
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            scheduler=scheduler,
            num_samples=spec.num_samples,
            search_alg=BasicVariantGenerator(random_state=spec.seed, max_concurrent=spec.max_concurrent_trials),
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(name=name, storage_path=spec.storage, verbose=verbose),
    )


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _absolute_paths(cfg: Config) -> Config:
    """Trials run in Ray's working directories: local paths in the config are made absolute."""
    fixes = {}
    for key in _PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value and "://" not in value and not os.path.isabs(value):
            fixes[key] = str(Path(value).resolve())
    return apply_overrides(cfg, fixes) if fixes else cfg


def _rows(grid, spec: SweepSpec, ctx: TrialContext) -> list[TrialRow]:
    rows = []
    for result in grid:
        trial_id = Path(result.path).name  # trial_dirname_creator: the directory is named by the trial id
        cfg = trial_config(ctx, trial_id, {k: result.config[k] for k in spec.space})
        history = result.metrics_dataframe
        values = [float(v) for v in history[spec.metric]] if history is not None and spec.metric in history else []
        m = result.metrics or {}
        step = int(m.get("step", 0))
        if result.error is not None:
            status = "error"
        else:
            status = "completed" if step >= cfg.train.max_steps else "stopped early"
        best = (min if spec.mode == "min" else max)(values) if values else float("nan")
        rows.append(
            TrialRow(
                trial_id,
                status,
                step,
                len(values),
                {k: result.config[k] for k in spec.space},
                float(m.get(spec.metric, float("nan"))),
                best,
                cfg.run.dir,
                str(m.get("checkpoint_dir", "")),
                int(m.get("checkpoint_step", -1)),
                error=" ".join(str(result.error).split())[:300] if result.error else "",
            )
        )
    return sorted(rows, key=lambda r: r.trial_id)


def pick_best(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The best trial by its *last* reported metric (the state its last checkpoint holds), among trials without
    an error whose checkpoint is of that last validated step; None when there is none."""
    ok = [
        r
        for r in rows
        if r.status != "error" and r.checkpoint_dir and r.checkpoint_step == r.step and math.isfinite(r.last)
    ]
    if not ok:
        return None
    return (min if mode == "min" else max)(ok, key=lambda r: r.last)


def format_table(rows: list[TrialRow], spec: SweepSpec, best: TrialRow | None) -> str:
    """A fixed-width text table: trial, status, steps, validations, swept values, last and best metric."""
    keys = list(spec.space)
    head = ["trial", "status", "steps", "reports", *keys, f"{spec.metric} (last)", "best", ""]
    body = []
    for r in rows:
        vals = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in (r.params[k] for k in keys)]
        body.append(
            [
                r.trial_id,
                r.status,
                str(r.step),
                str(r.validations),
                *vals,
                f"{r.last:.4f}",
                f"{r.best:.4f}",
                "<- best" if best is not None and r.trial_id == best.trial_id else "",
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def write_best(result: SweepResult, ctx: TrialContext) -> Path:
    """Consolidate the best trial's checkpoint and write ``best.json`` in the sweep directory.

    ``best.json`` (what ``jobs.register`` reads)::

        {"weights": ".../best.safetensors",       # consolidated fp32 weights (pipeline.train.consolidate)
         "config": ".../best.config.yaml",        # the trial's resolved config, beside the weights
         "checkpoint": ".../trials/<id>/checkpoints/<tag>",   # the DeepSpeed checkpoint they came from
         "checkpoint_remote": "s3://..." or "",   # its mirror when the sweep stores on S3
         "step": 8, "metric": "val_bits_per_dim", "mode": "min", "value": 7.41,
         "trial_id": "...", "run_dir": "...", "params": {"optim.lr": 0.003, ...},
         "sweep": "<name>", "mlflow_run_id": "<child run>", "parent_run_id": "<sweep run>", "tracking_uri": "..."}
    """
    best = result.best
    assert best is not None
    weights = consolidate(best.checkpoint_dir, result.sweep_dir / "best.safetensors")
    cfg = trial_config(ctx, best.trial_id, best.params)  # consolidate wrote the checkpoint's copy of it beside
    remote = f"{cfg.checkpoint.remote}/{Path(best.checkpoint_dir).name}" if cfg.checkpoint.remote else ""
    info = {
        "weights": str(weights),
        "config": str(config_path(weights)),
        "checkpoint": best.checkpoint_dir,
        "checkpoint_remote": remote,
        "step": best.step,
        "metric": result.spec.metric,
        "mode": result.spec.mode,
        "value": best.last,
        "trial_id": best.trial_id,
        "run_dir": best.run_dir,
        "params": best.params,
        "sweep": ctx.sweep,
        "mlflow_run_id": best.mlflow_run_id,
        "parent_run_id": ctx.parent_run_id,
        "tracking_uri": ctx.tracking_uri,
    }
    path = result.sweep_dir / "best.json"
    tmp = path.with_name(".best.json.tmp")
    tmp.write_text(json.dumps(info, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


class _ParentRun:
    """The sweep's parent MLflow run, driven synchronously from the driver (it is not on a training path)."""

    def __init__(self, client, uri: str, run_id: str):
        self.client, self.uri, self.run_id = client, uri, run_id

    @classmethod
    def open(cls, base: Config, spec: SweepSpec, name: str) -> _ParentRun:
        from mlflow import MlflowClient  # heavy: optional tracking dependency
        from mlflow.entities import Param  # heavy: optional tracking dependency

        uri = resolve_tracking_uri(base.tracking.uri)
        bound_http_retries(base.tracking.retries, base.tracking.timeout_s)
        client = MlflowClient(tracking_uri=uri)
        exp = ensure_experiment(client, base.tracking.experiment)
        run = client.create_run(exp, run_name=f"sweep-{name}", tags={"mango.sweep": name, "sweep.role": "parent"})
        params = {
            "sweep.metric": spec.metric,
            "sweep.mode": spec.mode,
            "sweep.num_samples": spec.num_samples,
            "sweep.max_concurrent_trials": spec.max_concurrent_trials,
            "sweep.scheduler": json.dumps(spec.scheduler),
            "sweep.workers": spec.workers,
            "sweep.storage": spec.storage,
            **{f"space.{k}": json.dumps({kind: args}) for k, (kind, args) in spec.space.items()},
            **{f"fixed.{k}": json.dumps(v) for k, v in spec.fixed.items()},
        }
        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()], synchronous=True)
        if spec.path:
            client.log_artifact(run.info.run_id, spec.path, "sweep")
        return cls(client, uri, run.info.run_id)

    def attach_children(self, rows: list[TrialRow], experiment: str) -> None:
        """Match the nested runs to trials (by their ``run.dir`` tag); end runs a stopped actor left RUNNING."""
        exp = self.client.get_experiment_by_name(experiment)
        children = self.client.search_runs(
            [exp.experiment_id], f"tags.mlflow.parentRunId = '{self.run_id}'", max_results=10000
        )
        by_dir = {c.data.tags.get("run.dir"): c for c in children}
        for row in rows:
            child = by_dir.get(str(Path(row.run_dir).resolve()))
            if child is None:
                continue
            row.mlflow_run_id = child.info.run_id
            self.client.set_tag(child.info.run_id, "sweep.status", row.status)
            if child.info.status == "RUNNING":
                self.client.set_terminated(child.info.run_id, "FAILED" if row.status == "error" else "KILLED")

    def finish(self, result: SweepResult) -> None:
        rid = self.run_id
        self.client.log_text(rid, result.table + "\n", "sweep/results.txt")
        buf = io.StringIO()
        writer = csv.writer(buf)
        keys = list(result.spec.space)
        writer.writerow(["trial_id", "status", "step", "validations", *keys, "last", "best", "mlflow_run_id", "error"])
        for r in result.rows:
            writer.writerow(
                [
                    r.trial_id,
                    r.status,
                    r.step,
                    r.validations,
                    *(r.params[k] for k in keys),
                    r.last,
                    r.best,
                    r.mlflow_run_id,
                    r.error,
                ]
            )
        self.client.log_text(rid, buf.getvalue(), "sweep/results.csv")
        counts = {s: sum(r.status == s for r in result.rows) for s in ("completed", "stopped early", "error")}
        for key, value in {
            "trials_completed": counts["completed"],
            "trials_stopped_early": counts["stopped early"],
            "trials_failed": counts["error"],
        }.items():
            self.client.log_metric(rid, key, value)
        if result.best is not None:
            self.client.log_metric(rid, f"best_{result.spec.metric}", result.best.last)
            self.client.set_tag(rid, "sweep.best_trial", result.best.trial_id)
            self.client.set_tag(rid, "sweep.best_run_id", result.best.mlflow_run_id)
            if result.best_json is not None:
                self.client.log_artifact(rid, str(result.best_json), "sweep")
        self.close("FINISHED" if result.best is not None else "FAILED")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)
