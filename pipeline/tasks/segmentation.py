"""``model.task=segmentation``: 1–2 input images → a label map (ignore label 255).

Head :class:`pipeline.models.heads.SegmentationHead` (pixel decoder; skip connections with ``model.skips``);
loss CE; eval sums one confusion matrix; metrics ``pixacc``, ``macc``, ``miou`` (TokenFusion's definitions,
:func:`pipeline.scores.segmentation_scores`), headline mIoU (higher is better); figure ``overlays.png``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pipeline.scores import segmentation_scores

from .base import LatentTask, Modality, Output


class SegmentationTask(LatentTask):
    name = "segmentation"
    spatial = True
    needs_num_classes = True
    target_kind = "label"
    required_sums = ("confusion",)
    metrics = ("pixacc", "macc", "miou")
    headline = "miou"

    def build_head(self, target: Modality, dim: int, num_inputs: int, steps: int, num_classes: int, **opts):
        from pipeline.models.heads import SegmentationHead  # cycle: pipeline.models imports pipeline.tasks

        skip = {"skip_channels": list(opts["skip_channels"])} if opts.get("skip_channels") else {}
        return SegmentationHead(dim, num_classes, steps, **skip)

    def scores(self, sums: Mapping[str, torch.Tensor], count: float) -> dict[str, float]:
        return segmentation_scores(sums["confusion"])

    def figures(self, ctx: Any) -> list:
        """``overlays.png``: inputs | prediction | ground truth of the first ``ctx.n`` samples."""
        from pipeline import figures  # heavy: PIL / matplotlib, never on a serving host

        batch, out = ctx.first_predictions()
        inputs = self.image_inputs(ctx.model, batch)
        path = ctx.out_dir / "overlays.png"
        return [figures.segmentation_overlays(inputs, out["pred"], batch[ctx.model.target.key], path)]

    def output(self, cfg: Any, target_shape: tuple[int, ...]) -> Output:
        return ("pred", "int64", target_shape[-2:])

    def prediction_member(self, input_manifest: Any) -> dict[str, Any]:
        label = next((s for s in input_manifest.modalities.values() if s.kind == "label"), None)
        return {"kind": "label", "classes": label.classes if label else None}


TASK = SegmentationTask()
