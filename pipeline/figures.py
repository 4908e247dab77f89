"""Evaluation figures as PNG files: image grids (Pillow) and the per-genre F1 bar chart (matplotlib, Agg).

Every image panel is an RGB uint8 array (H, W, 3). Conversions (:func:`panel`):

- 8-bit modalities are shown as stored (1 channel → grey);
- 16-bit modalities (depth in mm, 0 = invalid) are min–max normalised per image over the valid pixels
  (invalid pixels black), so relative depth is visible whatever the range;
- float images in [0, 1] (translation predictions, targets scaled to [0, 1]) are scaled by 255;
- label maps (H, W) use a fixed palette (:func:`label_colors`); 255 (ignore) is black.

Small images (the embedded 8–16 px patches) are enlarged by an integer factor with nearest-neighbour
sampling so pixels stay visible; panels are separated by a white gap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline.flows import quantize

IGNORE = 255
_MIN_SIDE = 96  # enlarge panels to at least this many pixels on the short side
_GAP = 2


def label_colors(labels: np.ndarray) -> np.ndarray:
    """(H, W) integer classes → (H, W, 3) uint8; a fixed, well-spread palette; 255 → black."""
    labels = np.asarray(labels).astype(np.int64)
    idx = np.where(labels == IGNORE, 0, labels)
    # golden-ratio hues: neighbouring class ids get far-apart colours, stable across figures
    hue = (idx * 0.618033988749895) % 1.0
    sat, val = 0.65 + 0.35 * ((idx // 7) % 2), 0.95 - 0.3 * ((idx // 3) % 2)
    rgb = _hsv_to_rgb(hue, sat, val)
    rgb[labels == IGNORE] = 0
    return rgb


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * 6).astype(np.int64) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(h.shape + (3,), dtype=np.float64)
    for k, (r, g, b) in enumerate(table):
        m = i == k
        out[m] = np.stack(
            [np.broadcast_to(r, h.shape)[m], np.broadcast_to(g, h.shape)[m], np.broadcast_to(b, h.shape)[m]], -1
        )
    return (out * 255).round().astype(np.uint8)


def panel(img: torch.Tensor | np.ndarray, bits: int | None = None) -> np.ndarray:
    """One image (C, H, W) with C ∈ {1, 3} → (H, W, 3) uint8. ``bits`` 8 / 16 for integer images,
    ``None`` for floats in [0, 1] (see the module docstring)."""
    x = torch.as_tensor(img).detach().cpu()
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"panel: expected an image (C, H, W) with C = 1 or 3; got shape {tuple(x.shape)}")
    if bits is None:
        if not x.is_floating_point():
            raise ValueError(f"panel: an integer image ({x.dtype}) needs its bit depth (8 or 16)")
        out = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    elif bits == 8:
        out = x.to(torch.int32).clamp(0, 255).to(torch.uint8)
    elif bits == 16:
        v = x.to(torch.float64)
        valid = v > 0
        if valid.any():
            lo, hi = v[valid].min(), v[valid].max()
            v = torch.where(valid, (v - lo) / max(float(hi - lo), 1e-12) * 0.9 + 0.1, torch.zeros_like(v))
        out = (v.clamp(0, 1) * 255).round().to(torch.uint8)
    else:
        raise ValueError(f"panel: bits must be 8, 16 or None; got {bits!r}")
    arr = out.permute(1, 2, 0).numpy()
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr


def save_grid(rows: Sequence[Sequence[np.ndarray]], path: str | Path, titles: Sequence[str] | None = None) -> Path:
    """Write a grid of equally sized (H, W, 3) uint8 panels (``rows`` of columns) as one PNG.

    ``titles`` (one per column) are drawn above the first row. Returns ``path``.
    """
    if not rows or not rows[0]:
        raise ValueError("save_grid: no panels")
    h, w = rows[0][0].shape[:2]
    ncol = len(rows[0])
    for r in rows:
        if len(r) != ncol or any(p.shape != (h, w, 3) or p.dtype != np.uint8 for p in r):
            raise ValueError(f"save_grid: every row needs {ncol} uint8 panels of shape {(h, w, 3)}")
    scale = max(1, -(-_MIN_SIDE // min(h, w)))
    ph, pw = h * scale, w * scale
    top = 14 if titles else 0
    canvas = Image.new("RGB", (ncol * (pw + _GAP) + _GAP, top + len(rows) * (ph + _GAP) + _GAP), "white")
    for i, r in enumerate(rows):
        for j, p in enumerate(r):
            tile = Image.fromarray(p).resize((pw, ph), Image.NEAREST)
            canvas.paste(tile, (_GAP + j * (pw + _GAP), top + _GAP + i * (ph + _GAP)))
    if titles:
        if len(titles) != ncol:
            raise ValueError(f"save_grid: {len(titles)} titles for {ncol} columns")
        draw = ImageDraw.Draw(canvas)
        for j, t in enumerate(titles):
            draw.text((_GAP + j * (pw + _GAP) + 2, 1), str(t), fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def density_sample_grid(
    samples: Sequence[torch.Tensor], bits: Sequence[int], names: Sequence[str], path: str | Path
) -> Path:
    """Joint samples laid out ⌈√N⌉ per row; each sample is its modalities side by side (titled above).

    ``samples``: per modality, (N, C, H, W) in the flow's continuous space [−1/2, 1/2); quantised to each
    modality's ``bits`` (:func:`pipeline.flows.quantize`) before drawing. Empty cells of the last row are white.
    """
    if not (len(samples) == len(bits) == len(names)) or not samples:
        raise ValueError("density_sample_grid: one tensor, bit depth and name per modality")
    images = [quantize(s.detach().float().cpu(), b) for s, b in zip(samples, bits)]
    n = images[0].shape[0]
    per_row = math.ceil(math.sqrt(n))
    cells = [[panel(img[i], b) for img, b in zip(images, bits)] for i in range(n)]
    blank = [np.full_like(p, 255) for p in cells[0]]
    cells += [blank] * (-n % per_row)
    rows = [sum(cells[r : r + per_row], []) for r in range(0, len(cells), per_row)]
    return save_grid(rows, path, titles=[str(x).split(".")[0] for x in names] * per_row)


def segmentation_overlays(
    inputs: Sequence[tuple[str, torch.Tensor, int]], pred: torch.Tensor, target: torch.Tensor, path: str | Path
) -> Path:
    """Rows of input(s) | prediction | ground truth (RGB | depth | prediction | ground truth for RGB-D).
    ``inputs``: (name, (N, C, H, W) integer image, bits); ``pred`` and ``target`` (N, H, W) class ids
    (target 255 = ignore, drawn black)."""
    rows = []
    for i in range(pred.shape[0]):
        rows.append(
            [panel(x[i], b) for _, x, b in inputs]
            + [label_colors(pred[i].cpu().numpy()), label_colors(target[i].cpu().numpy())]
        )
    return save_grid(rows, path, titles=[str(n).split(".")[0] for n, _, _ in inputs] + ["prediction", "truth"])


def translation_triptychs(
    inputs: Sequence[tuple[str, torch.Tensor, int]], pred: torch.Tensor, target: torch.Tensor, path: str | Path
) -> Path:
    """Rows of input(s) | prediction | target. ``inputs``: (name, (N, C, H, W) integer image, bits);
    ``pred`` and ``target`` (N, C, H, W) floats in [0, 1]."""
    rows = []
    for i in range(pred.shape[0]):
        rows.append([panel(x[i], b) for _, x, b in inputs] + [panel(pred[i]), panel(target[i])])
    return save_grid(rows, path, titles=[str(n).split(".")[0] for n, _, _ in inputs] + ["prediction", "target"])


def genre_f1_bars(
    tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor, names: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """Per-genre F1 = 2·TP / (2·TP + FP + FN) (0 where a genre never occurs nor is predicted) as bars,
    with each genre's support (TP + FN) in its label."""
    import matplotlib  # heavy: matplotlib (~0.7 s), only for the bar chart

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: see above; after use("Agg")

    tp, fp, fn = (torch.as_tensor(t, dtype=torch.float64).cpu() for t in (tp, fp, fn))
    if not (tp.shape == fp.shape == fn.shape == (len(names),)):
        raise ValueError(
            f"genre_f1_bars: tp/fp/fn must be ({len(names)},); got {tuple(tp.shape)}, "
            f"{tuple(fp.shape)}, {tuple(fn.shape)}"
        )
    denom = 2 * tp + fp + fn
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp)).numpy()
    support = (tp + fn).numpy().astype(int)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * len(names) + 2), 4))
    ax.bar(range(len(names)), f1, color="#4C72B0")
    ax.set_xticks(
        range(len(names)), [f"{n} ({s})" for n, s in zip(names, support)], rotation=60, ha="right", fontsize=8
    )
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1 at threshold 0.5")
    ax.set_title(title or "per-genre F1 (support)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
