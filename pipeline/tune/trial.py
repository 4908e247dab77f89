"""One sweep trial: its config, the reporter ``train_loop`` calls, and the Tune function / Ray Train workers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Config, apply_overrides, from_dict, to_dict
from pipeline.train import checkpoint as ckpt
from pipeline.train.loop import train_loop


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
    own: dict[str, Any] = {
        "run.dir": str(Path(ctx.sweep_dir) / "trials" / trial_id),
        "run.name": f"{ctx.sweep}-{trial_id}",
        "checkpoint.resume": "",
        "tracking.uri": ctx.tracking_uri,
        "tracking.parent_run_id": ctx.parent_run_id,
    }
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
        if self.metric not in metrics:
            raise KeyError(
                f"sweep metric {self.metric!r} is not among the validation's metrics "
                f"{sorted(k for k in metrics if k.startswith('val_'))}"
            )
        out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        tag = ckpt.latest_complete(self.run_dir)
        out["checkpoint_step"] = float(ckpt.read_state(tag)["step"]) if tag is not None else -1.0
        self.report(out | {"checkpoint_dir": str(tag) if tag is not None else ""})


def run_trial(params: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune function trainable: one ``train_loop`` here, or a Ray Train ``TorchTrainer`` of ``workers``."""
    from ray import tune  # heavy: optional Ray dependency

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(ctx, trial_id, params)
    if ctx.workers == 1:
        train_loop(cfg, reporter=TrialReporter(ctx.metric, cfg.run.dir, tune.report))
        return
    import ray.train  # heavy: optional Ray dependency
    from ray.train.torch import TorchTrainer  # heavy: optional Ray dependency
    from ray.tune.integration.ray_train import TuneReportCallback  # heavy: optional Ray dependency

    per_worker = {"CPU": ctx.cpus_per_worker} | ({"GPU": ctx.gpus_per_worker} if ctx.gpus_per_worker else {})
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": to_dict(cfg), "metric": ctx.metric},
        scaling_config=ray.train.ScalingConfig(
            num_workers=ctx.workers, use_gpu=ctx.gpus_per_worker > 0, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=trial_id, storage_path=f"{ctx.storage}/{ctx.sweep}/train-runs", callbacks=[TuneReportCallback()]
        ),
    )
    trainer.fit()


def _train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker = one rank: the same ``train_loop``, reporting through ``ray.train.report``."""
    import ray.train  # heavy: optional Ray dependency

    cfg = from_dict(loop_config["config"])
    train_loop(cfg, reporter=TrialReporter(loop_config["metric"], cfg.run.dir, ray.train.report))
