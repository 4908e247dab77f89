"""Training-time geometric augmentation of a batch, applied on the model's device (TokenFusion's protocol).

One random scale per batch (``data.scale_min..scale_max``), then per sample a random ``data.crop_size`` square
crop (``data.crop_size`` rows × ``data.crop_width`` columns when that is set, e.g. 3:4 crops of 3:4 images) (padded when the scaled image is smaller: images with 0, labels with 255 = ignore) and a horizontal
flip with probability 1/2 (``data.hflip``). Every spatial modality of a sample gets the same geometry, so
pixels stay aligned. Colour images are resampled bilinearly; 16-bit modalities (depth, 0 = invalid) and
label maps nearest-neighbour, so no invalid depth or non-existent class is blended in. Evaluation never
augments: it runs at the stored full resolution.

Values keep their units (integer images become float of the same scale), so the encoders' scaling applies
unchanged.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .heads import IGNORE_INDEX


@dataclass(frozen=True)
class Augment:
    """``crop_size`` 0 = no crop; ``scale`` (min, max), (1, 1) = no rescale; ``hflip`` on/off; ``crop_width`` > 0:
    crops of ``crop_size`` rows × ``crop_width`` columns (0 = square)."""

    crop_size: int = 0
    scale: tuple[float, float] = (1.0, 1.0)
    hflip: bool = False
    crop_width: int = 0

    @property
    def active(self) -> bool:
        return bool(self.crop_size) or self.scale != (1.0, 1.0) or self.hflip

    def __call__(self, tensors: dict[str, torch.Tensor], nearest: set[str]) -> dict[str, torch.Tensor]:
        """``tensors``: key → (N, C, H, W) image or (N, H, W) label map (all the same N, H, W)."""
        if not tensors or not self.active:
            return tensors
        sizes = {tuple(t.shape[-2:]) for t in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"augment: spatial modalities differ in size {sorted(sizes)}; they must be pixel-aligned")
        ((h, w),) = sizes
        out = {}
        s = random.uniform(*self.scale) if self.scale != (1.0, 1.0) else 1.0
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        for k, t in tensors.items():
            label = t.dim() == 3
            x = t.unsqueeze(1).float() if label else t.float()
            if (nh, nw) != (h, w):
                mode = "nearest" if (label or k in nearest) else "bilinear"
                x = F.interpolate(
                    x, size=(nh, nw), mode=mode, **({} if mode == "nearest" else {"align_corners": False})
                )
            out[k] = x
        if self.crop_size:
            c, cw = self.crop_size, self.crop_width or self.crop_size
            ph, pw = max(0, c - nh), max(0, cw - nw)
            n = next(iter(out.values())).shape[0]
            tops = [random.randint(0, nh + ph - c) for _ in range(n)]
            lefts = [random.randint(0, nw + pw - cw) for _ in range(n)]
            for k, x in out.items():
                fill = float(IGNORE_INDEX) if tensors[k].dim() == 3 else 0.0
                if ph or pw:
                    x = F.pad(x, (0, pw, 0, ph), value=fill)
                out[k] = torch.stack(
                    [x[i, :, t : t + c, left : left + cw] for i, (t, left) in enumerate(zip(tops, lefts))]
                )
        if self.hflip:
            n = next(iter(out.values())).shape[0]
            flip = torch.tensor([random.random() < 0.5 for _ in range(n)], device=next(iter(out.values())).device)
            for k, x in out.items():
                out[k] = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return {k: (x.squeeze(1).round().long() if tensors[k].dim() == 3 else x) for k, x in out.items()}
