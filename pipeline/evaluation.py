"""Evaluate a trained model on one split of a shard store, outside training.

A model is named by a checkpoint, consolidated weights or a registry URI, all resolved to one consolidated
weights file + its config (:class:`~pipeline.model_source.ModelSource`, :mod:`pipeline.model_source`).

:func:`evaluate_model` is the training loop's own reduction (:func:`pipeline.train.loop.evaluate`: sums of
``forward(batch, mode="eval")`` over an exact pass, turned into metrics by the task's ``finalize``) on a
single process, seeded by ``run.seed`` so that the density task's dequantisation noise — and therefore
the reported bits/dim — is the same every time the same weights meet the same manifest (the registry gate
compares such numbers). Metric names are ``<split>_<metric>`` (``val_bits_per_dim``, ``test_miou``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pipeline import metrics
from pipeline.config import Config
from pipeline.data import build_eval_loader, load_manifest, manifest_name
from pipeline.data.storage import join
from pipeline.model_source import (  # noqa: F401  (re-exported: the evaluation API names them)
    MODELS_URI_PREFIX,
    ModelSource,
    load_source,
    resolve_checkpoint,
    resolve_source,
    weights_config,
)
from pipeline.models import modality_specs
from pipeline.tasks import get_task, names_where

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Metrics of one exact pass. ``metrics`` keys are ``<split>_<name>`` (+ ``<split>_samples``)."""

    metrics: dict[str, float]
    split: str
    shards: str
    manifest_sha256: str
    samples: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "split": self.split,
                "shards": self.shards,
                "manifest_sha256": self.manifest_sha256,
                "samples": self.samples,
                "metrics": self.metrics,
                **self.extra,
            },
            indent=2,
            sort_keys=True,
        )


def metric_for_split(metric: str, split: str) -> str:
    """``cfg.eval.metric`` (named for validation, ``val_…``) as computed on ``split`` (``test_…``)."""
    return f"{split}_{metric.removeprefix('val_')}"


def pick_device(cfg: Config, requested: str = "auto") -> torch.device:
    """``requested`` (cpu / cuda / auto); auto follows ``run.device`` (cuda when available under auto)."""
    choice = cfg.run.device if requested == "auto" else requested
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda was requested but no CUDA device is available")
        return torch.device("cuda", 0)
    return torch.device("cpu")


def eval_loader(cfg: Config, shards: str, split: str, batch_size: int | None = None):
    """Single-process exact pass over ``split`` of ``shards``, and the split's manifest."""
    manifest = load_manifest(join(shards, manifest_name(split)))
    keys = model_keys(cfg, manifest)
    loader = build_eval_loader(
        manifest, batch_size or cfg.data.batch_size, rank=0, world_size=1, num_workers=0, modalities=keys
    )
    return loader, manifest


def model_keys(cfg: Config, manifest) -> tuple[str, ...]:
    """The sample keys the model reads, checked against the manifest (a mismatch is a ConfigError)."""
    return tuple(s[0] for s in modality_specs(cfg, manifest))


def evaluate_model(
    model: torch.nn.Module,
    cfg: Config,
    shards: str,
    split: str,
    *,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    inception_weights: str | None = None,
) -> EvalResult:
    """One seeded exact pass of ``model`` over ``split`` of ``shards`` → :class:`EvalResult`.

    The numbers are those the training loop logs for the same weights and split (same reduction); the
    density task draws its dequantisation noise from ``torch.manual_seed(cfg.run.seed)``. Translation adds
    FID / KID×100 over the split (``fid``/``kid`` with ``inception_weights``, else ``fid_proxy``/``kid_proxy``).
    """
    from pipeline.train.loop import evaluate  # heavy: the training loop imports DeepSpeed and the MLflow tracker

    device = torch.device(device)
    loader, manifest = eval_loader(cfg, shards, split, batch_size)
    state = torch.random.get_rng_state()
    torch.manual_seed(cfg.run.seed)
    try:
        raw = evaluate(model, cfg, loader, device)
    finally:
        torch.random.set_rng_state(state)
    model.eval()  # the loop's evaluate hands the model back in train mode
    metrics = {f"{split}_{k.removeprefix('val_')}": float(v) for k, v in raw.items()}
    samples = int(metrics.get(f"{split}_samples", 0))
    if samples == 0:
        raise ValueError(f"{shards} split {split!r}: the exact pass saw no samples")
    if get_task(cfg.model.task).image_distances:
        distances = image_distances(
            model, cfg, shards, split, device=device, batch_size=batch_size, inception_weights=inception_weights
        )
        metrics |= {f"{split}_{k}": v for k, v in distances.items()}
    elif inception_weights:
        raise ValueError(
            f"inception weights are for the {'/'.join(names_where('image_distances'))} task; "
            f"this model is {cfg.model.task!r}"
        )
    return EvalResult(metrics, split, str(shards), manifest.manifest_checksum(), samples)


def to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def weights_specs(weights: str | Path) -> list[tuple[str, tuple[int, ...], int]]:
    """(sample key, shape (C, H, W), bits) per modality, from the consolidated weights' metadata."""
    with safe_open(str(weights), "pt") as f:
        return [(n, tuple(s), int(b)) for n, s, b in json.loads((f.metadata() or {}).get("modalities", "[]"))]


def predictions(
    model: torch.nn.Module,
    cfg: Config,
    shards: str,
    split: str,
    *,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    limit: int | None = None,
):
    """Yield ``(batch, forward(batch, mode="predict"))`` over the valid samples of ``split`` in manifest
    order (at most ``limit`` samples; outputs on the CPU)."""
    loader, _ = eval_loader(cfg, shards, split, batch_size)
    seen = 0
    with torch.no_grad():
        for batch in loader:
            valid = batch["__valid__"].bool()
            if not valid.any():
                continue
            out = model(to_device(batch, device), mode="predict")
            keep = valid.nonzero().flatten()
            if limit is not None:
                keep = keep[: limit - seen]
            pick = {
                k: (v[keep] if isinstance(v, torch.Tensor) else [v[i] for i in keep.tolist()]) for k, v in batch.items()
            }
            yield pick, {k: v.detach().cpu()[keep] for k, v in out.items()}
            seen += len(keep)
            if limit is not None and seen >= limit:
                return


def target_unit(model: torch.nn.Module, target: torch.Tensor) -> torch.Tensor:
    """A translation target image in [0, 1] as the model scales it (8-bit / 255, 16-bit / depth_max)."""
    x = target.float()
    return x / 255.0 if model.target.bits == 8 else (x / model.depth_max).clamp(0.0, 1.0)


def image_distances(
    model: torch.nn.Module,
    cfg: Config,
    shards: str,
    split: str,
    *,
    device: torch.device | str,
    batch_size: int | None,
    inception_weights: str | None,
) -> dict[str, float]:
    """FID / KID×100 of the translation predictions against the targets over the whole split (proxies
    ``fid_proxy`` / ``kid_proxy`` without Inception weights; see :func:`pipeline.metrics.image_distances`)."""
    real, fake = [], []
    for batch, out in predictions(model, cfg, shards, split, device=device, batch_size=batch_size):
        real.append(target_unit(model, batch[model.target.key]))
        fake.append(out["pred"].float())
    as_u8 = lambda xs: (torch.cat(xs).clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1)  # noqa: E731
    return metrics.image_distances(as_u8(real), as_u8(fake), inception_weights=inception_weights)


@dataclass
class FigureContext:
    """What a task's :meth:`~pipeline.tasks.base.Task.figures` draws from: the model, where its data is, and
    the passes over it (so the tasks need not import this module)."""

    model: torch.nn.Module
    source: ModelSource
    shards: str
    split: str
    out_dir: Path
    n: int = 8
    device: torch.device | str = "cpu"
    temperature: float = 1.0

    @property
    def cfg(self) -> Config:
        return self.source.cfg

    def sample(self) -> dict[str, torch.Tensor]:
        """``n`` joint samples at ``temperature``, seeded by ``run.seed`` (density)."""
        with torch.no_grad():
            torch.manual_seed(self.cfg.run.seed)
            return self.model(mode="sample", n=self.n, temperature=self.temperature)

    def bits(self) -> dict[str, int]:
        """Bits per modality, from the consolidated weights' metadata."""
        return {s[0]: s[2] for s in weights_specs(self.source.weights)}

    def first_predictions(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(batch, predictions)`` of the split's first ``n`` valid samples in manifest order."""
        return next(
            predictions(
                self.model, self.cfg, self.shards, self.split, device=self.device, batch_size=self.n, limit=self.n
            )
        )

    def target_unit(self, target: torch.Tensor) -> torch.Tensor:
        return target_unit(self.model, target)

    def eval_sums(self, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """The ``forward(batch, mode="eval")`` sums ``keys`` over the whole split (float64, on the CPU)."""
        loader, _ = eval_loader(self.cfg, self.shards, self.split)
        sums: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for batch in loader:
                out = self.model(to_device(batch, self.device), mode="eval")
                for k in keys:
                    sums[k] = sums.get(k, 0) + out[k].detach().double().cpu()
        return sums

    def class_names(self, k: int) -> list[str]:
        """The target's class names from the split's manifest (``0..k-1`` when it names none)."""
        manifest = load_manifest(join(self.shards, manifest_name(self.split)))
        spec = next((v for key, v in manifest.modalities.items() if key == self.model.target.key), None)
        return list(spec.classes) if spec is not None and spec.classes else [str(i) for i in range(k)]


def task_figures(
    model: torch.nn.Module,
    source: ModelSource,
    shards: str,
    split: str,
    out_dir: str | Path,
    *,
    n: int = 8,
    device: torch.device | str = "cpu",
    temperature: float = 1.0,
) -> list[Path]:
    """The task's figures for ``split`` as PNGs in ``out_dir``; image figures show its first ``n`` samples
    in manifest order.

    density: ``samples.png`` (``n`` joint samples, seeded by ``run.seed``); segmentation: ``overlays.png``
    (inputs | prediction | ground truth); translation: ``triptychs.png`` (inputs | prediction | target);
    classification: ``genre_f1.png`` (per-genre F1 over the whole split). Each is the task's
    :meth:`~pipeline.tasks.base.Task.figures`.
    """
    model.eval()
    ctx = FigureContext(model, source, shards, split, Path(out_dir), n, device, temperature)
    return get_task(source.cfg.model.task).figures(ctx)


def log_evaluation(result: EvalResult, source: ModelSource, files: list[Path], tracking_uri: str = "") -> str:
    """Log ``result`` (metrics as ``eval/<split>_<name>`` at the checkpoint's step, the manifest checksum as
    tag ``eval.<split>.manifest_sha256``) and ``files``
    (under ``eval/<split>/``) to the model's training run when this store knows it, else to a new
    ``evaluate-<task>`` run; returns the run id."""
    from mlflow.entities import Metric, RunTag  # heavy: optional tracking dependency
    from mlflow.exceptions import MlflowException  # heavy: optional tracking dependency

    from pipeline.tracking.store import client_for, ensure_experiment  # heavy: MLflow's client

    client = client_for(tracking_uri)
    run_id = None
    if source.run_id:
        try:
            run_id = client.get_run(source.run_id).info.run_id
        except MlflowException:
            log.warning("run %s is not in %s; logging the evaluation in a new run", source.run_id, client.tracking_uri)
    tags = {
        f"eval.{result.split}.manifest_sha256": result.manifest_sha256,
        f"eval.{result.split}.shards": result.shards,
    }
    if run_id is None:
        exp = ensure_experiment(client, source.cfg.tracking.experiment)
        run_tags = {"mango.job": "evaluate", "mango.source": source.origin}
        if source.run_id:
            run_tags["mango.trained_in_run"] = source.run_id
        run_id = client.create_run(exp, run_name=f"evaluate-{source.cfg.model.task}", tags=run_tags).info.run_id
    now, step = int(time.time() * 1000), source.step or 0
    # eval/ names: the training run's own val_* history at this step stays as training logged it
    client.log_batch(
        run_id,
        metrics=[Metric(f"eval/{k}", float(v), now, step) for k, v in result.metrics.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
        synchronous=True,
    )
    for f in files:
        client.log_artifact(run_id, str(f), f"eval/{result.split}")
    if client.get_run(run_id).info.status == "RUNNING" and run_id != source.run_id:
        client.set_terminated(run_id, "FINISHED")
    return run_id
