"""The sweep's space file: parsed and checked against the config before Ray starts (format: ``pipeline.tune``)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Config, ConfigError, apply_overrides
from pipeline.tracking import project_root

SAMPLERS = {  # name → number of arguments (None: a non-empty list of values)
    "loguniform": 2,
    "uniform": 2,
    "randn": 2,
    "quniform": 3,
    "qloguniform": 3,
    "randint": 2,
    "lograndint": 2,
    "choice": None,
    "grid": None,
}
SCHEDULERS = ("asha", "fifo")
# set by the sweep for every trial: sweeping them would break the trial's bookkeeping
RESERVED_KEYS = (
    "run.dir",
    "run.name",
    "tracking.uri",
    "tracking.parent_run_id",
    "checkpoint.resume",
    "checkpoint.remote",
)
_TOP_KEYS = {
    "name",
    "metric",
    "mode",
    "num_samples",
    "max_concurrent_trials",
    "seed",
    "storage",
    "scheduler",
    "resources",
    "fixed",
    "space",
}
_SCHEDULER_KEYS = {"name": "asha", "max_t": 0, "grace_period": 1, "reduction_factor": 2}
_RESOURCE_KEYS = {"workers": 1, "cpus_per_worker": 1.0, "gpus_per_worker": 0.0}


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


def load_space(path: str | os.PathLike, base: Config) -> SweepSpec:
    """Read and check a space file against ``base`` (every fixed and swept key, every candidate value)."""
    path = Path(path)
    where = str(path)
    raw = _read_space_file(path, where)
    fixed = _mapping(raw, "fixed", where)
    space_raw = _mapping(raw, "space", where)
    base, space = _checked_fixed_and_space(fixed, space_raw, base, where)
    sched = {**_SCHEDULER_KEYS, **_mapping(raw, "scheduler", where)}
    res = {**_RESOURCE_KEYS, **_mapping(raw, "resources", where)}
    _only_keys(sched, _SCHEDULER_KEYS, f"{where}: scheduler")
    _only_keys(res, _RESOURCE_KEYS, f"{where}: resources")
    _check_scheduler(sched, base, space, where)
    _check_resources(res, where)
    mode, metric = _checked_objective(raw, base, where)
    for key in ("num_samples", "max_concurrent_trials", "seed"):
        _int_at_least(raw.get(key, {"num_samples": 1}.get(key, 0)), 1 if key == "num_samples" else 0, f"{where}: {key}")
    storage = _checked_storage(raw, where)
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name or "/" in name:
        raise SpaceError(f"{where}: name must be a non-empty string without '/'; got {name!r}")
    return SweepSpec(
        name=name,
        metric=metric,
        mode=mode,
        num_samples=raw.get("num_samples", 1),
        max_concurrent_trials=raw.get("max_concurrent_trials", 0),
        seed=raw.get("seed", 0),
        storage=storage.rstrip("/"),
        scheduler=sched,
        workers=res["workers"],
        cpus_per_worker=float(res["cpus_per_worker"]),
        gpus_per_worker=float(res["gpus_per_worker"]),
        fixed=dict(fixed),
        space=space,
        path=str(path.resolve()),
    )


def _read_space_file(path: Path, where: str) -> dict[str, Any]:
    """The file's top-level mapping, with only known keys."""
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
    return raw


def _checked_fixed_and_space(
    fixed: dict[str, Any], space_raw: dict[str, Any], base: Config, where: str
) -> tuple[Config, dict[str, tuple[str, list[Any]]]]:
    """(``base`` with ``fixed`` applied, the parsed samplers), every candidate value checked against that config."""
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
    return base, space


def _check_scheduler(sched: dict[str, Any], base: Config, space: Mapping[str, Any], where: str) -> None:
    """Check the scheduler section; a ``max_t`` of 0 becomes ``ceil(train.max_steps / eval.every)`` (in place)."""
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
        raise SpaceError(
            f"{where}: scheduler.grace_period ({sched['grace_period']}) exceeds max_t ({sched['max_t']} validations)"
        )


def _check_resources(res: Mapping[str, Any], where: str) -> None:
    _int_at_least(res["workers"], 1, f"{where}: resources.workers")
    for key in ("cpus_per_worker", "gpus_per_worker"):
        if isinstance(res[key], bool) or not isinstance(res[key], (int, float)) or res[key] < 0:
            raise SpaceError(f"{where}: resources.{key} must be a number ≥ 0; got {res[key]!r}")
    if res["cpus_per_worker"] <= 0 and res["gpus_per_worker"] <= 0:
        raise SpaceError(f"{where}: resources: a worker needs cpus_per_worker > 0 or gpus_per_worker > 0")


def _checked_objective(raw: Mapping[str, Any], base: Config, where: str) -> tuple[str, str]:
    """(mode, metric): the file's, else the config's ``eval.mode`` / ``eval.metric``."""
    mode = raw.get("mode", base.eval.mode)
    if mode not in ("min", "max"):
        raise SpaceError(f"{where}: mode must be min or max; got {mode!r}")
    metric = raw.get("metric", base.eval.metric)
    if not isinstance(metric, str) or not metric.startswith("val_"):
        raise SpaceError(f"{where}: metric must name a validation metric (val_...); got {metric!r}")
    return mode, metric


def _checked_storage(raw: Mapping[str, Any], where: str) -> str:
    """The sweep storage: an absolute path or s3:// URL; "" = ``<project root>/runs/sweeps``."""
    storage = raw.get("storage", "") or ""
    if not isinstance(storage, str) or not (storage.startswith("s3://") or os.path.isabs(storage) or storage == ""):
        raise SpaceError(
            f"{where}: storage must be an absolute local path or an s3:// URL (Ray needs absolute "
            f"paths); got {storage!r}"
        )
    if not storage:
        storage = str(project_root() / "runs" / "sweeps")
    return storage


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
        raise SpaceError(
            f"{at}: expected one sampler such as {{loguniform: [1e-4, 1e-2]}} or {{choice: [a, b]}} "
            f"(constants go under 'fixed'); got {spec!r}"
        )
    ((kind, args),) = spec.items()
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
    from ray import tune  # heavy: Ray is only needed once the sweep starts

    make: dict[str, Callable[..., Any]] = {
        "loguniform": tune.loguniform,
        "uniform": tune.uniform,
        "randn": tune.randn,
        "quniform": tune.quniform,
        "qloguniform": tune.qloguniform,
        "randint": tune.randint,
        "lograndint": tune.lograndint,
        "choice": tune.choice,
        "grid": tune.grid_search,
    }
    return {
        key: make[kind](args) if SAMPLERS[kind] is None else make[kind](*args)
        for key, (kind, args) in spec.space.items()
    }
