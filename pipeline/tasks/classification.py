"""``model.task=classification``: image and/or text inputs → a multi-hot label vector (multi-label).

Head :class:`pipeline.models.heads.ClassificationHead` (per-modality pooling); loss BCE; eval sums ``tp``,
``fp``, ``fn`` (per label) and ``samples_f1_sum``; metrics ``micro_f1``, ``macro_f1``, ``weighted_f1``,
``samples_f1`` (:func:`pipeline.scores.f1_scores`), headline micro-F1 (higher is better); figure
``genre_f1.png`` (per-label F1 over the whole split); served output ``probs``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pipeline.config_rules import ConfigError
from pipeline.scores import f1_scores

from .base import LatentTask, Modality, Output, Spec


class ClassificationTask(LatentTask):
    name = "classification"
    needs_num_classes = True
    target_kind = "vector"
    input_kinds = ("image", "text")
    required_sums = ("tp", "fp", "fn", "samples_f1_sum")
    metrics = ("micro_f1", "macro_f1", "weighted_f1", "samples_f1")
    headline = "micro_f1"

    def check_target(self, cfg: Any, specs: Sequence[Spec], target: Modality) -> None:
        m = cfg.model
        k = dict((s[0], s[1]) for s in specs)[target.key][0]
        if k != m.num_classes:
            raise ConfigError(f"model.num_classes={m.num_classes} but {target.key} holds {k} labels per sample")

    def build_head(self, target: Modality, dim: int, num_inputs: int, steps: int, num_classes: int, **opts):
        from pipeline.models.heads import ClassificationHead  # cycle: pipeline.models imports pipeline.tasks

        return ClassificationHead(dim, num_classes, num_inputs)

    def scores(self, sums: Mapping[str, torch.Tensor], count: float) -> dict[str, float]:
        return f1_scores(sums["tp"], sums["fp"], sums["fn"], float(torch.as_tensor(sums["samples_f1_sum"])), count)

    def figures(self, ctx: Any) -> list:
        """``genre_f1.png``: per-label F1 over the whole split."""
        from pipeline import figures  # heavy: PIL / matplotlib, never on a serving host

        sums = ctx.eval_sums(("tp", "fp", "fn"))
        names = ctx.class_names(sums["tp"].shape[0])
        path, title = ctx.out_dir / "genre_f1.png", f"per-genre F1 ({ctx.split})"
        return [figures.genre_f1_bars(sums["tp"], sums["fp"], sums["fn"], names, path, title=title)]

    def output(self, cfg: Any, target_shape: tuple[int, ...]) -> Output:
        return ("probs", "float32", (cfg.model.num_classes,))


TASK = ClassificationTask()
