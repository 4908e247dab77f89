"""Ray Tune sweeps whose every trial runs :func:`pipeline.train.loop.train_loop` — the function torchrun runs.

A sweep is a base config (``--config`` + overrides) and a *space file* (``launch/sweeps/<name>.yaml``)::

    name: tiny                    # optional; default: the file's stem. The sweep directory is <storage>/<name>
    metric: val_bits_per_dim      # optional; default eval.metric of the config (a key the validation returns)
    mode: min                     # optional; default eval.mode
    num_samples: 1                # Tune's num_samples (with grid entries: repeats of the whole grid)
    max_concurrent_trials: 2      # 0 = as many as the resources allow
    seed: 0                       # seeds the random sampling of the space
    storage: ""                   # absolute local path or s3://bucket/prefix; "" = <project root>/runs/sweeps
    scheduler:
      name: asha                  # asha (default) or fifo (no early stopping)
      max_t: 0                    # in validations (reports); 0 = ceil(train.max_steps / eval.every)
      grace_period: 1             # validations before a trial can be stopped
      reduction_factor: 2
    resources:                    # per trial
      workers: 1                  # > 1: Ray Train TorchTrainer, one DeepSpeed rank per worker
      cpus_per_worker: 1
      gpus_per_worker: 0
    fixed:                        # overrides applied to every trial
      train.max_steps: 8
    space:                        # any config key → one sampler
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      model.partitions: {choice: [all, mmca]}

Samplers: ``loguniform|uniform|randn: [a, b]``, ``quniform|qloguniform: [lo, hi, q]``, ``randint|lograndint:
[lo, hi]`` (hi exclusive, as in Tune), ``choice: [...]``, ``grid: [...]`` (every value, × num_samples).
:func:`load_space` checks the file and every key/value against the config (unknown key, wrong type, values
outside a field's range: :class:`SpaceError` naming the key) before Ray starts.

Trials. Each trial's config = base ← ``fixed`` ← sampled values ← what the sweep sets itself (``run.dir`` =
``<sweep dir>/trials/<trial id>``, ``run.name``, ``tracking.uri`` resolved once in the driver,
``tracking.parent_run_id``, and with s3 storage ``checkpoint.remote``); those keys cannot be swept. One
worker: the trial calls ``train_loop`` in its Tune actor. Several: the trial starts a Ray Train
``TorchTrainer`` whose workers call ``train_loop`` (``RANK``/``WORLD_SIZE``/``MASTER_*`` set by Ray Train, read
by :func:`pipeline.dist.world_info_from_env`; DeepSpeed adopts Ray's process group). ``train_loop`` calls the
reporter at every validation on every rank, after that step's checkpoint is saved; the reporter hands
``metric``, ``step``, ``checkpoint_step`` and ``checkpoint_dir`` to ``tune.report`` (one worker) or
``ray.train.report`` (every rank; rank 0's values reach Tune through ``TuneReportCallback``). ASHA's time
unit is that report, i.e. one validation.

Tracking. The driver opens one parent MLflow run per sweep; every trial's run is created by ``train_loop``
on rank 0 with the ``mlflow.parentRunId`` tag (the URI and parent id travel in the trial's config, not via
Tune callbacks). Trials that ASHA stopped are left RUNNING by their killed actor; the driver marks them
KILLED and tags ``sweep.status``. At the end the results table is printed and logged to the parent
(``results.txt``, ``results.csv``).

Best trial → ``<sweep dir>/best.json`` (the format :func:`write_best` documents) and the consolidated
weights ``<sweep dir>/best.safetensors`` with ``best.config.yaml`` beside them (the trial's resolved config),
so ``jobs.register`` can take them directly.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Config, ConfigError, apply_overrides, from_dict, to_dict

log = logging.getLogger("pipeline.sweep")

SAMPLERS = {  # name → number of arguments (None: a non-empty list of values)
    "loguniform": 2, "uniform": 2, "randn": 2, "quniform": 3, "qloguniform": 3, "randint": 2, "lograndint": 2,
    "choice": None, "grid": None,
}
SCHEDULERS = ("asha", "fifo")
# set by the sweep for every trial: sweeping them would break the trial's bookkeeping
RESERVED_KEYS = ("run.dir", "run.name", "tracking.uri", "tracking.parent_run_id", "checkpoint.resume",
                 "checkpoint.remote")
_TOP_KEYS = {"name", "metric", "mode", "num_samples", "max_concurrent_trials", "seed", "storage", "scheduler",
             "resources", "fixed", "space"}
_SCHEDULER_KEYS = {"name": "asha", "max_t": 0, "grace_period": 1, "reduction_factor": 2}
_RESOURCE_KEYS = {"workers": 1, "cpus_per_worker": 1.0, "gpus_per_worker": 0.0}
_DRIVER_MEMORY = 256 * 2**20  # bytes booked by a trial that drives a multi-worker TorchTrainer
_PATH_KEYS = ("data.shards", "model.init_weights", "model.encoder_weights")  # made absolute: trials run elsewhere


class SpaceError(ConfigError):
    """A bad space file; the message names the file and the key."""


@dataclass(frozen=True)
class SweepSpec:
    """A checked space file (see the module docstring); ``space`` maps a dotted key to (sampler, args)."""

    name: str
    metric: str
    mode: str
    num_samples: int
    max_concurrent_trials: int
    seed: int
    storage: str  # absolute local path or s3:// URL
    scheduler: dict[str, Any]
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    fixed: dict[str, Any]
    space: dict[str, tuple[str, list[Any]]]
    path: str = ""

    @property
    def remote(self) -> bool:
        return self.storage.startswith("s3://")


# -- the space file -------------------------------------------------------------------------------------


def load_space(path: str | os.PathLike, base: Config) -> SweepSpec:
    """Read and check a space file against ``base`` (every fixed and swept key, every candidate value)."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise SpaceError(f"space file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpaceError(f"{where}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(raw, dict):
        raise SpaceError(f"{where}: the top level must be a mapping (space, fixed, scheduler, resources, ...)")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise SpaceError(f"{where}: unknown key '{unknown[0]}'; known keys: {', '.join(sorted(_TOP_KEYS))}")
    fixed = _mapping(raw, "fixed", where)
    space_raw = _mapping(raw, "space", where)
    if not space_raw:
        raise SpaceError(f"{where}: 'space' must map at least one config key to a sampler")
    for key in [*fixed, *space_raw]:
        if key in RESERVED_KEYS:
            raise SpaceError(f"{where}: '{key}' is set by the sweep for every trial and cannot be fixed or swept")
    both = sorted(set(fixed) & set(space_raw))
    if both:
        raise SpaceError(f"{where}: '{both[0]}' is both fixed and swept")
    try:
        base = apply_overrides(base, fixed)
    except ConfigError as e:
        raise SpaceError(f"{where}: fixed: {e}") from None
    space = {key: _sampler(key, spec, where) for key, spec in space_raw.items()}
    for key, (kind, args) in space.items():
        for value in _candidates(kind, args):
            try:
                apply_overrides(base, {key: value})
            except ConfigError as e:
                raise SpaceError(f"{where}: space.{key} ({kind} {args}): {e}") from None

    sched = {**_SCHEDULER_KEYS, **_mapping(raw, "scheduler", where)}
    res = {**_RESOURCE_KEYS, **_mapping(raw, "resources", where)}
    _only_keys(sched, _SCHEDULER_KEYS, f"{where}: scheduler")
    _only_keys(res, _RESOURCE_KEYS, f"{where}: resources")
    if sched["name"] not in SCHEDULERS:
        raise SpaceError(f"{where}: scheduler.name must be one of {list(SCHEDULERS)}; got {sched['name']!r}")
    for key, low in (("max_t", 0), ("grace_period", 1)):
        _int_at_least(sched[key], low, f"{where}: scheduler.{key}")
    if not isinstance(sched["reduction_factor"], (int, float)) or sched["reduction_factor"] <= 1:
        raise SpaceError(f"{where}: scheduler.reduction_factor must be a number > 1; got {sched['reduction_factor']!r}")
    if sched["max_t"] == 0:
        if {"train.max_steps", "eval.every"} & set(space):
            raise SpaceError(f"{where}: scheduler.max_t must be given when train.max_steps or eval.every is swept")
        sched["max_t"] = math.ceil(base.train.max_steps / base.eval.every)
    if sched["grace_period"] > sched["max_t"]:
        raise SpaceError(f"{where}: scheduler.grace_period ({sched['grace_period']}) exceeds max_t ({sched['max_t']} "
                         f"validations)")
    _int_at_least(res["workers"], 1, f"{where}: resources.workers")
    for key in ("cpus_per_worker", "gpus_per_worker"):
        if isinstance(res[key], bool) or not isinstance(res[key], (int, float)) or res[key] < 0:
            raise SpaceError(f"{where}: resources.{key} must be a number ≥ 0; got {res[key]!r}")
    if res["cpus_per_worker"] <= 0 and res["gpus_per_worker"] <= 0:
        raise SpaceError(f"{where}: resources: a worker needs cpus_per_worker > 0 or gpus_per_worker > 0")

    mode = raw.get("mode", base.eval.mode)
    if mode not in ("min", "max"):
        raise SpaceError(f"{where}: mode must be min or max; got {mode!r}")
    metric = raw.get("metric", base.eval.metric)
    if not isinstance(metric, str) or not metric.startswith("val_"):
        raise SpaceError(f"{where}: metric must name a validation metric (val_...); got {metric!r}")
    for key in ("num_samples", "max_concurrent_trials", "seed"):
        _int_at_least(raw.get(key, {"num_samples": 1}.get(key, 0)), 1 if key == "num_samples" else 0, f"{where}: {key}")
    storage = raw.get("storage", "") or ""
    if not isinstance(storage, str) or not (storage.startswith("s3://") or os.path.isabs(storage) or storage == ""):
        raise SpaceError(f"{where}: storage must be an absolute local path or an s3:// URL (Ray needs absolute "
                         f"paths); got {storage!r}")
    if not storage:
        from pipeline.tracking import project_root

        storage = str(project_root() / "runs" / "sweeps")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name or "/" in name:
        raise SpaceError(f"{where}: name must be a non-empty string without '/'; got {name!r}")
    return SweepSpec(name=name, metric=metric, mode=mode, num_samples=raw.get("num_samples", 1),
                     max_concurrent_trials=raw.get("max_concurrent_trials", 0), seed=raw.get("seed", 0),
                     storage=storage.rstrip("/"), scheduler=sched, workers=res["workers"],
                     cpus_per_worker=float(res["cpus_per_worker"]), gpus_per_worker=float(res["gpus_per_worker"]),
                     fixed=dict(fixed), space=space, path=str(path.resolve()))


def _mapping(raw: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise SpaceError(f"{where}: '{key}' must be a mapping; got {type(value).__name__}")
    return value


def _only_keys(d: Mapping[str, Any], known: Mapping[str, Any], where: str) -> None:
    bad = sorted(set(d) - set(known))
    if bad:
        raise SpaceError(f"{where}: unknown key '{bad[0]}'; known keys: {', '.join(known)}")


def _int_at_least(value: Any, low: int, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SpaceError(f"{where} must be an integer ≥ {low}; got {value!r}")


def _sampler(key: str, spec: Any, where: str) -> tuple[str, list[Any]]:
    at = f"{where}: space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SpaceError(f"{at}: expected one sampler such as {{loguniform: [1e-4, 1e-2]}} or {{choice: [a, b]}} "
                         f"(constants go under 'fixed'); got {spec!r}")
    (kind, args), = spec.items()
    if kind not in SAMPLERS:
        raise SpaceError(f"{at}: unknown sampler '{kind}'; use one of {', '.join(SAMPLERS)}")
    if not isinstance(args, list) or not args:
        raise SpaceError(f"{at}: {kind} takes a non-empty list; got {args!r}")
    n = SAMPLERS[kind]
    if n is None:
        return kind, args
    if len(args) != n or any(isinstance(a, bool) or not isinstance(a, (int, float)) for a in args):
        raise SpaceError(f"{at}: {kind} takes {n} numbers; got {args!r}")
    if kind in ("randint", "lograndint") and any(not isinstance(a, int) for a in args):
        raise SpaceError(f"{at}: {kind} takes integer bounds; got {args!r}")
    if kind != "randn" and args[0] >= args[1]:
        raise SpaceError(f"{at}: {kind} needs low < high; got {args!r}")
    if kind == "randn" and args[1] <= 0:
        raise SpaceError(f"{at}: randn needs a standard deviation > 0; got {args!r}")
    if kind.startswith(("log", "qlog")) and args[0] <= 0:
        raise SpaceError(f"{at}: {kind} needs low > 0; got {args!r}")
    if kind.startswith("q") and args[2] <= 0:
        raise SpaceError(f"{at}: {kind} needs q > 0; got {args!r}")
    return kind, args


def _candidates(kind: str, args: list[Any]) -> list[Any]:
    """Values a sampler can produce that are checked against the config: every listed value, or both ends."""
    if SAMPLERS[kind] is None:
        return list(args)
    if kind in ("randint", "lograndint"):
        return [args[0], args[1] - 1]
    if kind == "randn":
        return [float(args[0])]
    return [float(args[0]), float(args[1])]


def tune_space(spec: SweepSpec) -> dict[str, Any]:
    """The Tune ``param_space``: dotted config keys → Tune samplers."""
    from ray import tune

    make: dict[str, Callable[..., Any]] = {
        "loguniform": tune.loguniform, "uniform": tune.uniform, "randn": tune.randn, "quniform": tune.quniform,
        "qloguniform": tune.qloguniform, "randint": tune.randint, "lograndint": tune.lograndint,
        "choice": tune.choice, "grid": tune.grid_search,
    }
    return {key: make[kind](args) if SAMPLERS[kind] is None else make[kind](*args)
            for key, (kind, args) in spec.space.items()}


# -- one trial ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs from the driver (pickled into the trial actors)."""

    base: dict[str, Any]  # the base config with the fixed overrides, as a plain dict
    sweep: str
    sweep_dir: str  # local directory of this sweep (trial run dirs live under trials/)
    storage: str
    metric: str
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    tracking_uri: str
    parent_run_id: str


def trial_config(ctx: TrialContext, trial_id: str, params: Mapping[str, Any]) -> Config:
    """The trial's config: base ← sampled ``params`` ← the sweep's own keys (run dir, tracking, remote)."""
    own: dict[str, Any] = {"run.dir": str(Path(ctx.sweep_dir) / "trials" / trial_id),
                           "run.name": f"{ctx.sweep}-{trial_id}", "checkpoint.resume": "",
                           "tracking.uri": ctx.tracking_uri, "tracking.parent_run_id": ctx.parent_run_id}
    if ctx.storage.startswith("s3://"):
        own["checkpoint.remote"] = f"{ctx.storage}/{ctx.sweep}/{trial_id}/checkpoints"
    return apply_overrides(from_dict(ctx.base), {**params, **own})


class TrialReporter:
    """``train_loop``'s reporter inside a trial: called at every validation on every rank (after the save).

    Sends the numeric metrics plus ``checkpoint_step`` / ``checkpoint_dir`` (this rank's newest complete
    checkpoint, -1 / "" if none) through ``report``. A validation without ``metric`` is an error naming the keys
    it did return.
    """

    def __init__(self, metric: str, run_dir: str, report: Callable[[dict[str, Any]], None]):
        self.metric, self.run_dir, self.report = metric, run_dir, report

    def __call__(self, metrics: Mapping[str, Any]) -> None:
        from pipeline.train import checkpoint as ckpt

        if self.metric not in metrics:
            raise KeyError(f"sweep metric {self.metric!r} is not among the validation's metrics "
                           f"{sorted(k for k in metrics if k.startswith('val_'))}")
        out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        tag = ckpt.latest_complete(self.run_dir)
        out["checkpoint_step"] = float(ckpt.read_state(tag)["step"]) if tag is not None else -1.0
        self.report(out | {"checkpoint_dir": str(tag) if tag is not None else ""})


def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune function trainable: one ``train_loop`` here, or a Ray Train ``TorchTrainer`` of ``workers``."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(ctx, trial_id, params)
    if ctx.workers == 1:
        from pipeline.train.loop import train_loop

        train_loop(cfg, reporter=TrialReporter(ctx.metric, cfg.run.dir, tune.report))
        return
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    per_worker = {"CPU": ctx.cpus_per_worker} | ({"GPU": ctx.gpus_per_worker} if ctx.gpus_per_worker else {})
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": to_dict(cfg), "metric": ctx.metric},
        scaling_config=ray.train.ScalingConfig(num_workers=ctx.workers, use_gpu=ctx.gpus_per_worker > 0,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(name=trial_id, storage_path=f"{ctx.storage}/{ctx.sweep}/train-runs",
                                       callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def _train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker = one rank: the same ``train_loop``, reporting through ``ray.train.report``."""
    import ray.train

    from pipeline.train.loop import train_loop

    cfg = from_dict(loop_config["config"])
    train_loop(cfg, reporter=TrialReporter(loop_config["metric"], cfg.run.dir, ray.train.report))


# -- the driver -----------------------------------------------------------------------------------------


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
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    name = sweep_name or spec.name
    base = _absolute_paths(apply_overrides(base, spec.fixed))
    from pipeline.tracking import project_root

    sweep_dir = (Path(spec.storage) if not spec.remote else project_root() / "runs" / "sweeps") / name
    if (sweep_dir / "best.json").exists() or (sweep_dir / "trials").exists():
        raise SpaceError(f"sweep directory {sweep_dir} already holds a sweep; pick another name (--name)")
    sweep_dir.mkdir(parents=True, exist_ok=True)

    parent = _ParentRun.open(base, spec, name) if base.tracking.enabled else None
    ctx = TrialContext(base=to_dict(base), sweep=name, sweep_dir=str(sweep_dir), storage=spec.storage,
                       metric=spec.metric, workers=spec.workers, cpus_per_worker=spec.cpus_per_worker,
                       gpus_per_worker=spec.gpus_per_worker, tracking_uri=parent.uri if parent else "",
                       parent_run_id=parent.run_id if parent else "")

    def mango_trial(params: dict[str, Any]) -> None:
        run_trial(params, ctx)

    if spec.workers == 1:
        resources: dict[str, float] = {"cpu": spec.cpus_per_worker, "gpu": spec.gpus_per_worker}
    else:
        # the trial actor only drives a TorchTrainer whose workers reserve their own CPUs/GPUs in their own
        # placement group; a CPU here would leave a 2-CPU node unable to place 2 one-CPU workers. Ray refuses an
        # all-zero request, so the driver books what it really uses: memory (a Python process, ~256 MiB).
        resources = {"cpu": 0, "memory": _DRIVER_MEMORY}
    trainable = tune.with_resources(mango_trial, resources)
    s = spec.scheduler
    # max_t one past the last validation: trials end on their own at train.max_steps, and ASHA stopping a trial at
    # max_t would kill its actor before train_loop closes the MLflow run (the rungs stay those of max_t)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=s["max_t"] + 1, grace_period=s["grace_period"],
                               reduction_factor=s["reduction_factor"])
                 if s["name"] == "asha" else FIFOScheduler())
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False)
    tuner = tune.Tuner(
        trainable,
        param_space=tune_space(spec),
        # the concurrency cap goes to the search algorithm: Tune ignores TuneConfig.max_concurrent_trials when a
        # BasicVariantGenerator instance (needed for the seed) is passed
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler,
                                    num_samples=spec.num_samples,
                                    search_alg=BasicVariantGenerator(random_state=spec.seed,
                                                                     max_concurrent=spec.max_concurrent_trials),
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=name, storage_path=spec.storage, verbose=verbose),
    )
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
        rows.append(TrialRow(trial_id, status, step, len(values), {k: result.config[k] for k in spec.space},
                             float(m.get(spec.metric, float("nan"))), best, cfg.run.dir,
                             str(m.get("checkpoint_dir", "")), int(m.get("checkpoint_step", -1)),
                             error=" ".join(str(result.error).split())[:300] if result.error else ""))
    return sorted(rows, key=lambda r: r.trial_id)


def pick_best(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The best trial by its *last* reported metric (the state its last checkpoint holds), among trials without
    an error whose checkpoint is of that last validated step; None when there is none."""
    ok = [r for r in rows if r.status != "error" and r.checkpoint_dir and r.checkpoint_step == r.step
          and math.isfinite(r.last)]
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
        body.append([r.trial_id, r.status, str(r.step), str(r.validations), *vals, f"{r.last:.4f}", f"{r.best:.4f}",
                     "<- best" if best is not None and r.trial_id == best.trial_id else ""])
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
    from pipeline.train.consolidate import config_path, consolidate

    best = result.best
    assert best is not None
    weights = consolidate(best.checkpoint_dir, result.sweep_dir / "best.safetensors")
    cfg = trial_config(ctx, best.trial_id, best.params)  # consolidate wrote the checkpoint's copy of it beside
    remote = f"{cfg.checkpoint.remote}/{Path(best.checkpoint_dir).name}" if cfg.checkpoint.remote else ""
    info = {"weights": str(weights), "config": str(config_path(weights)), "checkpoint": best.checkpoint_dir,
            "checkpoint_remote": remote, "step": best.step, "metric": result.spec.metric, "mode": result.spec.mode,
            "value": best.last, "trial_id": best.trial_id, "run_dir": best.run_dir, "params": best.params,
            "sweep": ctx.sweep, "mlflow_run_id": best.mlflow_run_id, "parent_run_id": ctx.parent_run_id,
            "tracking_uri": ctx.tracking_uri}
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
        from mlflow import MlflowClient
        from mlflow.entities import Param

        from pipeline.tracking import bound_http_retries, ensure_experiment, resolve_tracking_uri

        uri = resolve_tracking_uri(base.tracking.uri)
        bound_http_retries(base.tracking.retries, base.tracking.timeout_s)
        client = MlflowClient(tracking_uri=uri)
        exp = ensure_experiment(client, base.tracking.experiment)
        run = client.create_run(exp, run_name=f"sweep-{name}", tags={"mango.sweep": name, "sweep.role": "parent"})
        params = {"sweep.metric": spec.metric, "sweep.mode": spec.mode, "sweep.num_samples": spec.num_samples,
                  "sweep.max_concurrent_trials": spec.max_concurrent_trials, "sweep.scheduler": json.dumps(spec.scheduler),
                  "sweep.workers": spec.workers, "sweep.storage": spec.storage,
                  **{f"space.{k}": json.dumps({kind: args}) for k, (kind, args) in spec.space.items()},
                  **{f"fixed.{k}": json.dumps(v) for k, v in spec.fixed.items()}}
        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()], synchronous=True)
        if spec.path:
            client.log_artifact(run.info.run_id, spec.path, "sweep")
        return cls(client, uri, run.info.run_id)

    def attach_children(self, rows: list[TrialRow], experiment: str) -> None:
        """Match the nested runs to trials (by their ``run.dir`` tag); end runs a stopped actor left RUNNING."""
        exp = self.client.get_experiment_by_name(experiment)
        children = self.client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{self.run_id}'",
                                           max_results=10000)
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
            writer.writerow([r.trial_id, r.status, r.step, r.validations, *(r.params[k] for k in keys), r.last, r.best,
                             r.mlflow_run_id, r.error])
        self.client.log_text(rid, buf.getvalue(), "sweep/results.csv")
        counts = {s: sum(r.status == s for r in result.rows) for s in ("completed", "stopped early", "error")}
        for key, value in {"trials_completed": counts["completed"], "trials_stopped_early": counts["stopped early"],
                           "trials_failed": counts["error"]}.items():
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
