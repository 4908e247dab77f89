"""``model.task=density``: the multiscale pixel-level flow over 1–2 image modalities (joint likelihood).

Model :class:`pipeline.models.DensityModel` (no head, no target: every modality is modelled); loss and
headline metric bits/dim (lower is better); eval sums ``bits_per_dim_sum``; the only task that samples
(``forward(mode="sample")``, pyfunc ``mode=sample``, ``jobs.sample``); served inputs are floats already
dequantised into the flow's space, the output is per-sample bits/dim.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pipeline.config_rules import ConfigError
from pipeline.flows import quantize

from .base import FieldSpec, Output, Spec, Task


class DensityTask(Task):
    name = "density"
    can_sample = True
    required_sums = ("bits_per_dim_sum",)
    metrics = ("bits_per_dim",)
    headline = "bits_per_dim"
    higher_is_better = False
    prediction_dequantisation = "uniform noise seeded by (sample key, modality)"

    def check_config(self, cfg: Any) -> None:
        m = cfg.model
        if len(cfg.data.modalities) not in (1, 2):
            raise ConfigError(
                f"data.modalities: the density model takes 1 or 2 image modalities; got {cfg.data.modalities}"
            )
        scale = m.patch_size * 2 ** (m.levels - 1)
        if m.image_size % scale:
            raise ConfigError(
                f"model.image_size must be divisible by model.patch_size·2^(model.levels−1) = {scale}; "
                f"got {m.image_size}"
            )
        super().check_config(cfg)

    def check_specs(self, cfg: Any, specs: Sequence[Spec]) -> None:
        want = (cfg.model.channels, cfg.model.image_size, cfg.model.image_size)
        for name, shape, _ in specs:
            if tuple(shape) != want:
                raise ConfigError(
                    f"model.channels/model.image_size: the density model expects {name} images of shape "
                    f"{want} (C, H, W) but the shards hold {tuple(shape)}"
                )

    def scores(self, sums: Mapping[str, torch.Tensor], count: float) -> dict[str, float]:
        if count <= 0:
            raise ValueError("finalize('density'): no samples were evaluated (count = 0)")
        return {"bits_per_dim": float(torch.as_tensor(sums["bits_per_dim_sum"])) / count}

    def figures(self, ctx: Any) -> list:
        """``samples.png``: ``ctx.n`` joint samples, seeded by ``run.seed``."""
        from pipeline import figures  # heavy: PIL / matplotlib, never on a serving host

        out = ctx.sample()
        names = list(out)
        bits = ctx.bits()
        return [
            figures.density_sample_grid(
                [out[k] for k in names], [bits[k] for k in names], names, ctx.out_dir / "samples.png"
            )
        ]

    def io(self, cfg: Any, specs: Sequence[Spec]) -> tuple[tuple[FieldSpec, ...], tuple[Output, ...]]:
        fields = tuple((k, "dequantised", "float32", tuple(int(d) for d in s), b) for k, s, b in specs if len(s) == 3)
        return fields, (("bits_per_dim", "float64", ()),)

    def predict(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
        # per-sample bits/dim through the flow's own entry point (the DensityModel's forward reduces to batch
        # means/sums; a plain module here, so nothing needs ZeRO-3's gathering)
        images = [batch[m] for m in model.modalities]
        return {"bits_per_dim": model.flow(*images, mode="bits_per_dim").double().numpy()}

    def sample(self, model: torch.nn.Module, n: int, temperature: float, seed: int) -> dict[str, Any]:
        torch.manual_seed(seed)
        out = model(mode="sample", n=n, temperature=temperature)
        bits = dict(zip(model.modalities, model.flow.bits))
        return {k: quantize(v.float(), bits[k]).numpy() for k, v in out.items()}

    def prediction_member(self, input_manifest: Any) -> dict[str, Any]:
        return {"kind": "target", "quantisation": "bits per dimension (per sample)"}


TASK = DensityTask()
