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
    """(sample key, shape (C, H, W), bits) for each of ``data.modalities``, checked against the shard manifest.

    A config modality name (``rgb``) matches the manifest member whose stem it is (``rgb.png``); images are
    stored (H, W, C) / (H, W) and batched (C, H, W), so the shape is reported in the batched layout.
    """
    available = manifest.modalities
    by_stem = {key.split(".")[0]: key for key in available}
    out = []
    for name in cfg.data.modalities:
        if name not in by_stem:
            raise ConfigError(f"data.modalities: '{name}' is not in the shards at {cfg.data.shards} "
                              f"(they hold {sorted(by_stem)})")
        key = by_stem[name]
        spec = available[key]
        shape = tuple(spec.shape or ())
        if spec.kind in ("image", "depth") and len(shape) in (2, 3):
            shape = (shape[2] if len(shape) == 3 else 1, shape[0], shape[1])
        bits = {"uint8": 8, "uint16": 16}.get(spec.dtype, 0)
        out.append((key, shape, bits))
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
        # deepspeed.activation_checkpointing is the operator's switch; the flow implements it per MANGO block
        memory = "checkpoint" if cfg.deepspeed.activation_checkpointing and cfg.model.memory == "store" else cfg.model.memory
        return build_density(cfg.model, [s[0] for s in specs], [s[2] for s in specs], memory=memory)
    raise ConfigError(f"model.task={task!r} is not available in this build; use 'density'")
