"""Task metrics: per-batch SUMS (reduced exactly across batches and ranks) → split-level numbers.

Two layers, so a metric over a split never becomes a mean of per-rank or per-batch means:

1. **Sums** (what a task model's ``forward(batch, mode="eval")`` returns; every value is additive):
   :func:`confusion_matrix` (segmentation), :func:`multilabel_sums` (classification),
   :func:`regression_sums` (translation); the density model sums bits/dim per sample itself.
2. :func:`finalize` ``(task, sums) -> {name: float}`` on the sums reduced over the whole split: the task's
   own :meth:`~pipeline.tasks.base.Task.finalize` (``pipeline/tasks/<task>.py``, which also names the
   headline metric and whether higher is better).

The primitives (sums and the split-level scores) live in :mod:`pipeline.scores` and are re-exported here.

Definitions (all results are plain floats; fractions in [0, 1], never percentages):

- **segmentation** — one confusion matrix ``C`` (K, K) over the split, rows = ground truth, columns =
  prediction, pixels labelled ``ignore_index`` (255) excluded. As TokenFusion (CEN's ``getScores``) computes
  them: ``pixacc = tr C / ΣC``; ``macc = nanmean_k C_kk / Σ_j C_kj`` (classes absent from the ground truth
  are 0/0 = NaN and excluded); ``miou = nanmean_k C_kk / (Σ_j C_kj + Σ_i C_ik − C_kk)`` (classes absent from
  both ground truth and prediction are 0/0 = NaN and excluded; a class predicted but absent from the ground
  truth has IoU 0 and *is* counted).
- **classification** (multi-label, K labels) — label predicted when ``prob > 0.5`` (torchmetrics'
  convention; equal to ``logit > 0``); per label ``F1 = 2tp / (2tp + fp + fn)``. ``micro_f1`` pools the
  counts; ``macro_f1`` is the unweighted mean over all K labels; ``weighted_f1`` weights by support
  ``tp + fn``; ``samples_f1`` is the mean over samples of the per-sample F1. Every 0/0 is 0: sklearn's
  ``f1_score(..., zero_division=0)`` (its default value) and torchmetrics' ``zero_division=0`` — so a
  label never true and never predicted adds F1 = 0 to the macro mean, and a sample with no true and no
  predicted label adds F1 = 0 to the samples mean.
- **translation** — ``mae = Σ|ŷ − y| / numel``, ``mse = Σ(ŷ − y)² / numel`` over every pixel value of the
  split, target scaled to [0, 1].
- **density** — ``bits_per_dim = Σ_samples bpd / count``.
- any task: ``task_loss`` / ``nll`` = per-sample sums / count when the model returns ``task_loss_sum`` /
  ``nll_sum``.

Image-distribution distances (translation figures, ``jobs.evaluate``) live in :func:`image_distances`:
FID and KID (×100) with the pt_inception FID weights from a local file, otherwise ``fid_proxy`` /
``kid_proxy`` on a fixed-seed random conv feature net — numbers for comparing runs with each other,
never to be reported as FID.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch

from pipeline.inception import FIDInceptionV3
from pipeline.scores import (  # noqa: F401  (re-exported: the metrics API has always named them)
    IGNORE_INDEX,
    THRESHOLD,
    bits_per_dim,
    confusion_matrix,
    f1_scores,
    multilabel_sums,
    per_class_iou,
    per_label_f1,
    per_sample_f1,
    regression_sums,
    segmentation_scores,
)
from pipeline.tasks import TASKS as ALL_TASKS
from pipeline.tasks import get_task, task_names

#: every task's name, from the registry (pipeline.tasks)
TASKS = task_names()

#: sum keys each task's eval output must carry (besides ``count``)
REQUIRED_SUMS = {task.name: task.required_sums for task in ALL_TASKS}


def finalize(task: str, sums: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Split-level metrics of ``task`` from sums reduced over the whole split (keys: see module docstring).

    ``sums`` holds the reduced eval outputs, ``count`` included. A missing required key is an error naming
    the key (a model returning the wrong sums must not yield a quiet zero). The per-task numbers are the task's
    :meth:`~pipeline.tasks.base.Task.finalize` (``pipeline/tasks/<task>.py``).
    """
    if task not in TASKS:
        raise ValueError(f"finalize: unknown task {task!r}; known: {list(TASKS)}")
    return get_task(task).finalize(sums)


# -- image-distribution distances -------------------------------------------------------------------------


class RandomConvFeatures(torch.nn.Module):
    """Fixed-seed random conv net: uint8 (N, 3, H, W) → (N, 256) features, for ``fid_proxy`` / ``kid_proxy``.

    Deterministic (seeded weights, frozen), so proxies are comparable between runs of this code — but they
    are not FID/KID and must never be reported as such.
    """

    num_features = 256

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        widths = (3, 32, 64, 128, 256)
        self.convs = torch.nn.ModuleList()
        for cin, cout in zip(widths[:-1], widths[1:]):
            conv = torch.nn.Conv2d(cin, cout, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / (cin * 9)))
                conv.bias.zero_()
            self.convs.append(conv)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> RandomConvFeatures:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(
            x.float() / 127.5 - 1.0, size=(64, 64), mode="bilinear", align_corners=False, antialias=True
        )
        for conv in self.convs:
            x = torch.relu(conv(x))
        return x.mean(dim=(2, 3))


def feature_extractor(inception_weights: str | None) -> tuple[torch.nn.Module, str]:
    """(feature net, prefix): the FID Inception-v3 from ``inception_weights`` → ``"fid"``; None → the
    random conv proxy → ``"fid_proxy"``. An unusable weights file raises ``ValueError`` naming it."""
    if inception_weights:
        return FIDInceptionV3.from_file(inception_weights), "fid"
    return RandomConvFeatures(), "fid_proxy"


def image_distances(
    real: torch.Tensor,
    fake: torch.Tensor,
    inception_weights: str | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    batch_size: int = 64,
) -> dict[str, float]:
    """FID and KID×100 (``{"fid", "kid"}``) with Inception weights, else ``{"fid_proxy", "kid_proxy"}``.

    ``real``/``fake``: uint8 (N, 3, H, W) images. torchmetrics' ``FrechetInceptionDistance`` and
    ``KernelInceptionDistance`` do the statistics on the chosen feature net; the KID subset size is capped
    at the smaller sample count (KID is unbiased at any size, with more variance on small sets).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance  # heavy: torchmetrics, only for the distances
    from torchmetrics.image.kid import KernelInceptionDistance  # heavy: torchmetrics, only for the distances

    for name, x in (("real", real), ("fake", fake)):
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"image_distances: {name} images must be uint8 (N, 3, H, W), got {x.dtype} {tuple(x.shape)}"
            )
        if x.shape[0] < 2:
            raise ValueError(f"image_distances: need at least 2 {name} images, got {x.shape[0]}")
    net, prefix = feature_extractor(inception_weights)
    if prefix != "fid":
        logging.getLogger(__name__).warning(
            "image_distances: no Inception weights given, so these are fid_proxy / kid_proxy on a fixed random "
            "feature net — comparable between runs of this code, not FID / KID (pass the pt_inception weights file)"
        )
    subset = min(kid_subset_size, real.shape[0], fake.shape[0])
    fid = FrechetInceptionDistance(feature=net, normalize=False)
    kid = KernelInceptionDistance(feature=net, subsets=kid_subsets, subset_size=subset, normalize=False)
    with torch.no_grad():
        for images, is_real in ((real, True), (fake, False)):
            for chunk in images.split(batch_size):
                fid.update(chunk, real=is_real)
                kid.update(chunk, real=is_real)
        kid_mean, _ = kid.compute()
        names = ("fid", "kid") if prefix == "fid" else ("fid_proxy", "kid_proxy")
        return {names[0]: float(fid.compute()), names[1]: 100.0 * float(kid_mean)}
