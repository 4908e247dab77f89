"""Task models. ``build_model(cfg, manifest)`` is the one place that maps ``model.task`` to a model.

``specs`` (name, shape, bits per modality) come from the shard manifest at training time and from the
consolidated weights' metadata when a model is loaded for inference, so no manifest is needed then.

Every task model's ``forward(batch, mode=...)`` is its single entry point (``"loss"`` → ``{"loss", ...}``,
``"eval"`` → sums + ``"count"`` for exact cross-rank reduction, ``"sample"`` where the task samples), so
the DeepSpeed engine (and ZeRO-3's parameter gathering) sees every call.
"""

from __future__ import annotations

from torch import nn

from pipeline.config import Config, ConfigError

from .density import DensityModel, build_density

__all__ = ["DensityModel", "build_model", "modality_specs"]


def modality_specs(cfg: Config, manifest) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, bits) for each of ``data.modalities``, checked against the shard manifest."""
    available = manifest.modalities
    out = []
    for name in cfg.data.modalities:
        if name not in available:
            raise ConfigError(f"data.modalities: '{name}' is not in the shards at {cfg.data.shards} "
                              f"(they hold {sorted(available)})")
        spec = available[name]
        out.append((name, tuple(spec.shape), int(spec.bits)))
    return out


def build_model(cfg: Config, specs: list[tuple[str, tuple[int, ...], int]]) -> nn.Module:
    """The model for ``cfg.model.task`` on modalities ``specs`` = :func:`modality_specs` (mismatch → ConfigError)."""
    task = cfg.model.task
    if task == "density":
        for name, shape, _ in specs:
            want = (cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
            if tuple(shape) != want:
                raise ConfigError(f"model.channels/model.image_size: the density model expects {name} images of shape "
                                  f"{want} (C, H, W) but the shards hold {tuple(shape)}")
        return build_density(cfg.model, [s[0] for s in specs], [s[2] for s in specs])
    raise ConfigError(f"model.task={task!r} is not available in this build; use 'density'")
