"""``model.task=translation``: 1–2 input images → the image ``model.target`` names (e.g. the other view).

Heads (``model.decoder``): ``direct`` :class:`~pipeline.models.heads.TranslationHead`, ``warp``
:class:`~pipeline.models.heads.WarpTranslationHead`, ``select`` :class:`~pipeline.models.heads.SelectTranslationHead`;
skip connections with ``model.skips``; loss L1 (+ a GAN term with ``model.gan_weight``); eval sums
``abs_err_sum``, ``sq_err_sum``, ``numel``; metrics ``mae``, ``mse`` (target in [0, 1]), headline MAE (lower
is better); evaluation adds FID / KID (or their proxies); figure ``triptychs.png``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .base import LatentTask, Modality, Output


class TranslationTask(LatentTask):
    name = "translation"
    spatial = True
    target_kind = "image"
    target_required = True
    decoders = ("direct", "warp", "select")
    gan = True
    image_distances = True
    required_sums = ("abs_err_sum", "sq_err_sum", "numel")
    metrics = ("mae", "mse")
    headline = "mae"
    higher_is_better = False

    def build_head(self, target: Modality, dim: int, num_inputs: int, steps: int, num_classes: int, **opts):
        from pipeline.models.heads import (  # cycle: pipeline.models imports pipeline.tasks
            SelectTranslationHead,
            TranslationHead,
            WarpTranslationHead,
        )

        skip: dict[str, Any] = {"skip_channels": list(opts["skip_channels"])} if opts.get("skip_channels") else {}
        if skip:
            skip["refine"] = max(0, round(math.log2(max(1, opts.get("skip_stride", 1)))))
        decoder, gan_weight = opts.get("decoder", "direct"), opts.get("gan_weight", 0.0)
        if decoder != "direct":
            cls = WarpTranslationHead if decoder == "warp" else SelectTranslationHead
            warp = (opts.get("warp_range", 16), gan_weight, opts.get("warp_generate", False))
            return cls(dim, target.channels, steps, *warp, **skip)
        return TranslationHead(dim, target.channels, steps, gan_weight, **skip)

    def scores(self, sums: Mapping[str, torch.Tensor], count: float) -> dict[str, float]:
        numel = float(torch.as_tensor(sums["numel"]))
        if numel <= 0:
            raise ValueError("finalize('translation'): no pixel values were evaluated (numel = 0)")
        return {
            "mae": float(torch.as_tensor(sums["abs_err_sum"])) / numel,
            "mse": float(torch.as_tensor(sums["sq_err_sum"])) / numel,
        }

    def figures(self, ctx: Any) -> list:
        """``triptychs.png``: inputs | prediction | target of the first ``ctx.n`` samples."""
        from pipeline import figures  # heavy: PIL / matplotlib, never on a serving host

        batch, out = ctx.first_predictions()
        inputs = self.image_inputs(ctx.model, batch)
        target = ctx.target_unit(batch[ctx.model.target.key])
        return [figures.translation_triptychs(inputs, out["pred"], target, ctx.out_dir / "triptychs.png")]

    def output(self, cfg: Any, target_shape: tuple[int, ...]) -> Output:
        return ("pred", "float32", target_shape)


TASK = TranslationTask()
