"""Metric primitives: per-batch SUMS and the split-level numbers computed from them (a leaf: torch only).

What each task reports, and the definitions, are in :mod:`pipeline.metrics` (the split-level entry point
:func:`pipeline.metrics.finalize`) and in each task's module under :mod:`pipeline.tasks`, whose ``finalize``
calls these. The task models' heads (:mod:`pipeline.models.heads`) compute the per-batch sums with them.
Everything here is re-exported by :mod:`pipeline.metrics`.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = 255
THRESHOLD = 0.5


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
