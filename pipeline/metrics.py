"""Task metrics: per-batch SUMS (reduced exactly across batches and ranks) → split-level numbers.

Two layers, so a metric over a split never becomes a mean of per-rank or per-batch means:

1. **Sums** (what a task model's ``forward(batch, mode="eval")`` returns; every value is additive):
   :func:`confusion_matrix` (segmentation), :func:`multilabel_sums` (classification),
   :func:`regression_sums` (translation); the density model sums bits/dim per sample itself.
2. :func:`finalize` ``(task, sums) -> {name: float}`` on the sums reduced over the whole split.

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

IGNORE_INDEX = 255
THRESHOLD = 0.5
TASKS = ("density", "segmentation", "translation", "classification")

#: sum keys each task's eval output must carry (besides ``count``)
REQUIRED_SUMS = {
    "density": ("bits_per_dim_sum",),
    "segmentation": ("confusion",),
    "translation": ("abs_err_sum", "sq_err_sum", "numel"),
    "classification": ("tp", "fp", "fn", "samples_f1_sum"),
}


# -- sums (per batch) -------------------------------------------------------------------------------------


def confusion_matrix(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """(K, K) int64 counts, rows = ground truth, cols = prediction, over pixels whose label ≠ ``ignore_index``.

    ``pred`` and ``target`` are integer (N, H, W) (any equal shapes); ``valid`` (N,) bool drops padding
    samples of an exact evaluation pass. A label outside ``0..K-1`` that is not ``ignore_index``, or a
    prediction outside ``0..K-1``, is an error (it would otherwise land in the wrong cell silently).
    """
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    target, pred = target.long(), pred.long()
    keep = target != ignore_index
    if valid is not None:
        keep &= valid.to(keep.device, torch.bool).reshape(-1, *([1] * (keep.dim() - 1)))
    t, p = target[keep], pred[keep]
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(
            f"confusion_matrix: ground-truth label {int(t.max() if t.max() >= num_classes else t.min())} "
            f"outside 0..{num_classes - 1} (and not the ignore label {ignore_index})"
        )
    if p.numel() and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"confusion_matrix: predicted class outside 0..{num_classes - 1}")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_sample_f1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) float64 F1 of each sample's predicted label set; 0 when it has no true and no predicted label."""
    pred, target = pred.bool(), target.bool()
    tp = (pred & target).sum(-1).double()
    denom = pred.sum(-1).double() + target.sum(-1).double()
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))


def multilabel_sums(
    probs: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None, threshold: float = THRESHOLD
) -> dict[str, torch.Tensor]:
    """``{"tp", "fp", "fn"}`` (K,) int64 and ``samples_f1_sum``, ``count`` (float64 scalars) of one batch.

    ``probs`` (N, K) probabilities (label on when ``> threshold``), ``target`` (N, K) multi-hot; ``valid``
    (N,) bool drops padding samples.
    """
    if probs.shape != target.shape or probs.dim() != 2:
        raise ValueError(
            f"multilabel_sums: probs {tuple(probs.shape)} and target {tuple(target.shape)} must both be (N, K)"
        )
    pred, true = probs > threshold, target.bool()
    w = (
        torch.ones(pred.shape[0], dtype=torch.bool, device=pred.device)
        if valid is None
        else valid.to(pred.device).bool()
    )
    pred, true = pred[w], true[w]
    return {
        "tp": (pred & true).sum(0).long(),
        "fp": (pred & ~true).sum(0).long(),
        "fn": (~pred & true).sum(0).long(),
        "samples_f1_sum": per_sample_f1(pred, true).sum(),
        "count": w.sum().double(),
    }


def regression_sums(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """``abs_err_sum``, ``sq_err_sum``, ``numel`` (float64) over all values of the valid samples of (N, ...)."""
    if pred.shape != target.shape:
        raise ValueError(f"regression_sums: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    err = pred.double() - target.double()
    if valid is not None:
        err = err[valid.to(err.device).bool()]
    return {
        "abs_err_sum": err.abs().sum(),
        "sq_err_sum": err.square().sum(),
        "numel": torch.tensor(float(err.numel()), dtype=torch.float64),
    }


# -- split-level numbers ----------------------------------------------------------------------------------


def segmentation_scores(conf: torch.Tensor) -> dict[str, float]:
    """``pixacc``, ``macc``, ``miou`` (fractions) of a (K, K) confusion matrix, TokenFusion's definitions."""
    c = torch.as_tensor(conf).double()
    if c.dim() != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"segmentation_scores: confusion matrix must be (K, K), got {tuple(c.shape)}")
    total = c.sum()
    if total <= 0:
        raise ValueError("segmentation_scores: the confusion matrix is empty (no labelled pixels were evaluated)")
    tp, gt, pr = c.diag(), c.sum(1), c.sum(0)
    acc = tp / gt  # 0/0 = NaN: class absent from the ground truth
    iou = tp / (gt + pr - tp)  # 0/0 = NaN: class absent from ground truth and prediction
    return {"pixacc": float(tp.sum() / total), "macc": float(acc.nanmean()), "miou": float(iou.nanmean())}


def per_class_iou(conf: torch.Tensor) -> torch.Tensor:
    """(K,) IoU per class (NaN where a class is absent from both ground truth and prediction)."""
    c = torch.as_tensor(conf).double()
    tp = c.diag()
    return tp / (c.sum(1) + c.sum(0) - tp)


def per_label_f1(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    """(K,) float64 F1 per label, 0 where ``2tp + fp + fn = 0``."""
    tp, fp, fn = (torch.as_tensor(t).double() for t in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1e-300), torch.zeros_like(denom))


def f1_scores(
    tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor, samples_f1_sum: float, count: float
) -> dict[str, float]:
    """``micro_f1``, ``macro_f1``, ``weighted_f1``, ``samples_f1`` from split-level counts (see module doc)."""
    tp, fp, fn = (torch.as_tensor(t).double().reshape(-1) for t in (tp, fp, fn))
    if not (tp.shape == fp.shape == fn.shape):
        raise ValueError(f"f1_scores: tp/fp/fn shapes differ: {tuple(tp.shape)}, {tuple(fp.shape)}, {tuple(fn.shape)}")
    if count <= 0:
        raise ValueError("f1_scores: no samples were evaluated (count = 0)")
    f1 = per_label_f1(tp, fp, fn)
    micro_denom = float(2 * tp.sum() + fp.sum() + fn.sum())
    support = tp + fn
    return {
        "micro_f1": float(2 * tp.sum()) / micro_denom if micro_denom > 0 else 0.0,
        "macro_f1": float(f1.mean()),
        "weighted_f1": float((f1 * support).sum() / support.sum()) if support.sum() > 0 else 0.0,
        "samples_f1": float(samples_f1_sum) / float(count),
    }


def bits_per_dim(nll_nats: torch.Tensor | float, num_dims: int) -> torch.Tensor | float:
    """Bits per dimension of a *discrete* negative log-likelihood in nats (dequantisation included)."""
    return nll_nats / (num_dims * math.log(2.0))


def finalize(task: str, sums: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Split-level metrics of ``task`` from sums reduced over the whole split (keys: see module docstring).

    ``sums`` holds the reduced eval outputs, ``count`` included. A missing required key is an error naming
    the key (a model returning the wrong sums must not yield a quiet zero).
    """
    if task not in TASKS:
        raise ValueError(f"finalize: unknown task {task!r}; known: {list(TASKS)}")
    missing = [k for k in (*REQUIRED_SUMS[task], "count") if k not in sums]
    if missing:
        raise ValueError(f"finalize({task!r}): the eval sums lack {missing} (they hold {sorted(sums)})")
    count = float(torch.as_tensor(sums["count"]).sum())
    out: dict[str, float] = {}
    if task == "segmentation":
        out |= segmentation_scores(sums["confusion"])
    elif task == "classification":
        out |= f1_scores(sums["tp"], sums["fp"], sums["fn"], float(torch.as_tensor(sums["samples_f1_sum"])), count)
    elif task == "translation":
        numel = float(torch.as_tensor(sums["numel"]))
        if numel <= 0:
            raise ValueError("finalize('translation'): no pixel values were evaluated (numel = 0)")
        out |= {
            "mae": float(torch.as_tensor(sums["abs_err_sum"])) / numel,
            "mse": float(torch.as_tensor(sums["sq_err_sum"])) / numel,
        }
    else:
        if count <= 0:
            raise ValueError("finalize('density'): no samples were evaluated (count = 0)")
        out["bits_per_dim"] = float(torch.as_tensor(sums["bits_per_dim_sum"])) / count
    for key in ("task_loss", "nll"):
        if f"{key}_sum" in sums and count > 0:
            out[key] = float(torch.as_tensor(sums[f"{key}_sum"])) / count
    return out


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
        from pipeline.inception import FIDInceptionV3

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
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

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
