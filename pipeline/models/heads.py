"""Task heads of the latent models: fused Z → task output, the task loss, eval sums and predictions.

Each head exposes ``forward(fused, ...)`` (the raw output), ``loss(out, target)`` (a scalar and per-sample
values), ``sums(out, target, valid)`` (additive eval sums in :mod:`pipeline.metrics`' definitions) and
``predict(out)`` (the per-sample outputs of the task-model contract).

- :class:`SegmentationHead` — grid (N, D, gh, gw) → ×2 conv-upsampling stages → (N, K, H, W) logits,
  bilinearly resized to the input's full resolution; cross-entropy with ``ignore_index`` 255. With
  ``model.skips`` every dense head decodes with :class:`SkipDecoder` instead: the fused grid plus the
  encoders' multi-scale maps (skip connections), as SegFormer / TokenFusion decode encoder features.
- :class:`TranslationHead` — the same decoder → (N, C, H, W) in [0, 1] (sigmoid); L1 against the target
  scaled to [0, 1]; optional PatchGAN discriminator (``model.gan_weight > 0``).
- :class:`WarpTranslationHead` (``model.decoder=warp``) — view synthesis on a rectified stereo pair (Monodepth
  style): the same decoder → one signed horizontal shift per pixel, |d| < R, and the *source* image (an input
  modality of the target's kind) warped by it with ``grid_sample``; optional occlusion term
  (``model.warp_generate``).
- :class:`SelectTranslationHead` (``model.decoder=select``) — the same task by Deep3D's
  selection layer: the same decoder → per-pixel logits over the 2R+1 horizontal shifts −R..R of the *source*
  image (an input modality of the target's kind), optionally plus one generated candidate (a direct RGB output,
  ``model.warp_generate``); output = Σ_k p_k · shift_k(source) [+ p_gen · generated]. Shifts whose source pixel
  lies outside the image are masked out of the softmax. Same loss, sums and predictions as TranslationHead.
- :class:`ClassificationHead` — per-modality pooled Z (text pads masked out) → MLP → (N, K) logits; BCE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pipeline import scores

IGNORE_INDEX = scores.IGNORE_INDEX


def decoder_steps(image_size: int, grid_side: int) -> int:
    """Number of ×2 upsampling stages from the token grid towards ``image_size`` (at most 5; the rest bilinear)."""
    return max(0, min(5, int(round(math.log2(max(1.0, image_size / max(grid_side, 1)))))))


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(next(g for g in (8, 4, 2, 1) if c % g == 0), c)


def _upsampling_stages(c: int, steps: int) -> tuple[list[nn.Module], int]:
    """``steps`` × (bilinear ×2 → 3×3 conv → GN → GELU) from ``c`` channels, widths halving down to 32; returns the
    layers and the final width."""
    layers: list[nn.Module] = []
    for _ in range(steps):
        out = max(32, c // 2)
        layers += [
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(c, out, 3, padding=1),
            _gn(out),
            nn.GELU(),
        ]
        c = out
    return layers, c


class UpDecoder(nn.Module):
    """(N, D, gh, gw) → ``steps`` × (bilinear ×2 → 3×3 conv → GN → GELU) → 1×1 conv to ``out_channels``.

    Widths halve per stage down to 32. The output is resized bilinearly to the requested (H, W), so any input
    resolution (training crops, full-resolution evaluation) gets a full-resolution output.
    """

    def __init__(self, dim: int, out_channels: int, steps: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(dim, dim, 3, padding=1), _gn(dim), nn.GELU()]
        c = dim
        stages, c = _upsampling_stages(c, steps)
        layers += stages
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(c, out_channels, 1)

    def forward(self, grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        y = self.out(self.body(grid))
        if tuple(y.shape[-2:]) != tuple(size):
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y


class SkipDecoder(nn.Module):
    """Fused grid + the encoders' multi-scale maps → ``out_channels`` (``model.skips``; SegFormer-style decoding).

    Each skip level (the maps of every input modality at one stride, concatenated along channels) is projected
    by a 1×1 conv to D and resized bilinearly to the finest level's size, as is the fused latent grid (N, D, gh,
    gw); the concatenation is mixed by a 1×1 conv → GN → GELU, then ``refine`` × (bilinear ×2 → 3×3 conv → GN
    → GELU; widths halve down to 32) and a 1×1 conv to ``out_channels``, resized bilinearly to the requested
    (H, W). Segmentation uses ``refine`` = 0 (logits at stride 4, upsampled, as SegFormer); translation refines
    back to full resolution. The latent grid stays the only path through the flow G; the skips add resolution.
    """

    def __init__(self, dim: int, out_channels: int, skip_channels: Sequence[int], refine: int = 0):
        super().__init__()
        if not skip_channels:
            raise ValueError("SkipDecoder: needs at least one skip level (the encoders' feature maps)")
        self.skip_channels = tuple(int(c) for c in skip_channels)
        self.proj = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in self.skip_channels)
        self.latent = nn.Conv2d(dim, dim, 1)
        self.fuse = nn.Sequential(nn.Conv2d(dim * (len(self.skip_channels) + 1), dim, 1), _gn(dim), nn.GELU())
        stages, c = _upsampling_stages(dim, refine)
        self.refine = nn.Sequential(*stages)
        self.out = nn.Conv2d(c, out_channels, 1)

    def forward(
        self, grid: torch.Tensor, size: tuple[int, int], skips: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        if skips is None or len(skips) != len(self.proj):
            raise ValueError(
                f"SkipDecoder: expected {len(self.proj)} skip levels (model.skips); got "
                f"{None if skips is None else len(skips)}"
            )
        finest = tuple(skips[0].shape[-2:])
        parts = [F.interpolate(self.latent(grid), size=finest, mode="bilinear", align_corners=False)]
        for proj, skip in zip(self.proj, skips, strict=True):
            y = proj(skip)
            parts.append(
                y
                if tuple(y.shape[-2:]) == finest
                else F.interpolate(y, size=finest, mode="bilinear", align_corners=False)
            )
        y = self.out(self.refine(self.fuse(torch.cat(parts, dim=1))))
        if tuple(y.shape[-2:]) != tuple(size):
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y


def make_decoder(
    dim: int, out_channels: int, steps: int, skip_channels: Sequence[int] | None = None, refine: int = 0
) -> nn.Module:
    """:class:`SkipDecoder` when ``skip_channels`` is given (``model.skips``), else :class:`UpDecoder`."""
    if skip_channels:
        return SkipDecoder(dim, out_channels, skip_channels, refine)
    return UpDecoder(dim, out_channels, steps)


def _decode(decoder: nn.Module, grid: torch.Tensor, size: tuple[int, int], skips) -> torch.Tensor:
    if isinstance(decoder, SkipDecoder):
        return decoder(grid, size, skips)
    if skips is not None:
        raise ValueError("skip maps given to a decoder without skip connections (model.skips=false)")
    return decoder(grid, size)


def _per_sample_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, ...) values and 0/1 weights → (N,) weighted means (0 where a sample has no weight)."""
    dims = tuple(range(1, values.dim()))
    return (values * weights).sum(dims) / weights.sum(dims).clamp_min(1)


class SegmentationHead(nn.Module):
    """Fused grid → (N, K, H, W) logits; CE ignoring label 255 (see module docstring)."""

    def __init__(self, dim: int, num_classes: int, steps: int, skip_channels: Sequence[int] | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.decoder = make_decoder(dim, num_classes, steps, skip_channels, refine=0)

    def forward(self, grid: torch.Tensor, size: tuple[int, int], skips=None) -> torch.Tensor:
        return _decode(self.decoder, grid, size, skips)

    def loss(self, logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean CE over every labelled pixel of the batch, (N,) per-sample mean CE)."""
        label = label.long()
        bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= self.num_classes))
        if bool(bad.any()):
            raise ValueError(
                f"segmentation: label values outside 0..{self.num_classes - 1} (and not {IGNORE_INDEX}); "
                f"model.num_classes={self.num_classes} does not fit the data"
            )
        ce = F.cross_entropy(logits.float(), label, ignore_index=IGNORE_INDEX, reduction="none")  # (N, H, W)
        keep = (label != IGNORE_INDEX).to(ce.dtype)
        # a batch with no labelled pixel contributes 0 (a plain mean would be 0/0 = NaN)
        return (ce * keep).sum() / keep.sum().clamp_min(1), _per_sample_mean(ce, keep)

    def sums(self, logits: torch.Tensor, label: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        conf = scores.confusion_matrix(logits.argmax(1), label, self.num_classes, valid=valid)
        return {"confusion": conf}

    def predict(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pred": logits.argmax(1).long()}


class PatchDiscriminator(nn.Module):
    """A small PatchGAN: (N, C, H, W) in [0, 1] → (N, 1, H/8, W/8) real/fake logits."""

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for i in range(3):
            out = width * 2**i
            layers += [nn.Conv2d(c, out, 4, stride=2, padding=1)]
            if i:
                layers += [_gn(out)]
            layers += [nn.LeakyReLU(0.2)]
            c = out
        layers += [nn.Conv2d(c, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(2.0 * x - 1.0)


class TranslationHead(nn.Module):
    """Fused grid → (N, C, H, W) in [0, 1]; L1 loss, optional adversarial term (module docstring).

    With ``gan_weight > 0`` one combined objective trains generator and discriminator in the same optimizer
    step: the generator's adversarial term runs the discriminator with *detached* parameters (so it moves
    only the generator), the discriminator's term sees the output detached (so it moves only the
    discriminator). Non-saturating BCE losses.
    """

    needs_source = False  # forward(grid, size); the warp head also takes the source image

    def __init__(
        self,
        dim: int,
        channels: int,
        steps: int,
        gan_weight: float = 0.0,
        decoder_channels: int = 0,
        skip_channels: Sequence[int] | None = None,
        refine: int = 0,
    ):
        super().__init__()
        self.channels, self.gan_weight = channels, gan_weight
        self.decoder = make_decoder(dim, decoder_channels or channels, steps, skip_channels, refine)
        self.discriminator = PatchDiscriminator(channels) if gan_weight > 0 else None

    def forward(self, grid: torch.Tensor, size: tuple[int, int], skips=None) -> torch.Tensor:
        return torch.sigmoid(_decode(self.decoder, grid, size, skips).float())

    def _decode_with_source(
        self, grid: torch.Tensor, size: tuple[int, int], source: torch.Tensor, skips=None
    ) -> torch.Tensor:
        """The decoder's fp32 output, after checking ``source`` (the image a source-taking head moves) fits."""
        if source.shape[1] != self.channels or tuple(source.shape[2:]) != tuple(size):
            raise ValueError(
                f"{type(self).__name__}: source {tuple(source.shape)} must be (N, {self.channels}, "
                f"{size[0]}, {size[1]})"
            )
        return _decode(self.decoder, grid, size, skips).float()

    def loss(
        self, pred: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(L1 [+ adversarial] scalar, (N,) per-sample L1, extra detached terms)."""
        l1 = (pred - target).abs()
        per = l1.flatten(1).mean(1)
        total, extra = l1.mean(), {}
        if self.discriminator is not None:
            frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            fake_for_g = functional_call(self.discriminator, frozen, (pred,))
            g_adv = F.binary_cross_entropy_with_logits(fake_for_g, torch.ones_like(fake_for_g))
            real, fake = self.discriminator(target), self.discriminator(pred.detach())
            d_loss = 0.5 * (
                F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
            )
            total = total + self.gan_weight * (g_adv + d_loss)
            extra = {"gan_g": g_adv.detach(), "gan_d": d_loss.detach()}
        return total, per, extra

    def sums(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        return scores.regression_sums(pred, target, valid)

    def predict(self, pred: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pred": pred}


class WarpTranslationHead(TranslationHead):
    """Fused grid + source image → (N, C, H, W) in [0, 1]: one regressed horizontal shift per pixel, then a warp.

    The decoder gives ``y`` per pixel; ``d = R · tanh(y / R)`` (``max_shift`` = R px at the input resolution:
    ≈ y for small values, bounded by ±R) and ``out[..., x] = source[..., x + d(x)]``, sampled bilinearly with
    ``grid_sample`` (rows unchanged: a rectified stereo pair's epipolar lines are the image rows; a source column
    outside the image takes the edge value). This is the Monodepth-style view synthesis: what the model has to
    get right is the per-pixel disparity, a function of depth. The source is only ever an *input* (the target
    is never warped). ``generate=True`` adds an occlusion term: ``out = (1 − m) · warped + m · generated`` with
    ``m = σ(·)`` (its logit starts at −3, m ≈ 0.05) and ``generated`` a directly decoded image in [0, 1].
    """

    needs_source = True
    MASK_BIAS = -3.0

    def __init__(
        self,
        dim: int,
        channels: int,
        steps: int,
        max_shift: int,
        gan_weight: float = 0.0,
        generate: bool = False,
        skip_channels: Sequence[int] | None = None,
        refine: int = 0,
    ):
        if max_shift < 1:
            raise ValueError(f"WarpTranslationHead: max_shift must be ≥ 1 px; got {max_shift}")
        super().__init__(
            dim,
            channels,
            steps,
            gan_weight,
            decoder_channels=1 + (1 + channels if generate else 0),
            skip_channels=skip_channels,
            refine=refine,
        )
        self.max_shift, self.generate = int(max_shift), bool(generate)
        if self.generate:
            with torch.no_grad():
                self.decoder.out.bias[1] = self.MASK_BIAS

    def disparity(self, y: torch.Tensor) -> torch.Tensor:
        """(N, ≥1, H, W) decoder output → (N, H, W) signed shift in px, |d| < R."""
        return self.max_shift * torch.tanh(y[:, 0] / self.max_shift)

    def forward(self, grid: torch.Tensor, size: tuple[int, int], source: torch.Tensor, skips=None) -> torch.Tensor:
        y = self._decode_with_source(grid, size, source, skips)
        warped = warp_rows(source.float(), self.disparity(y))
        if not self.generate:
            return warped
        m = torch.sigmoid(y[:, 1:2])
        return (1 - m) * warped + m * torch.sigmoid(y[:, 2:])

    def shifts(self, grid: torch.Tensor, size: tuple[int, int], skips=None) -> torch.Tensor:
        """(N, H, W) the predicted per-pixel shift in px, for inspection."""
        return self.disparity(_decode(self.decoder, grid, size, skips).float())


def warp_rows(source: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``out[..., y, x] = source[..., y, x + shift[y, x]]`` (bilinear; columns outside take the edge value).

    ``source`` (N, C, H, W), ``shift`` (N, H, W) in pixels. Differentiable in both.
    """
    n, _, h, w = source.shape
    xs = torch.arange(w, device=source.device, dtype=source.dtype).view(1, 1, w) + shift.to(source.dtype)
    ys = torch.arange(h, device=source.device, dtype=source.dtype).view(1, h, 1).expand(n, h, w)
    gx = 2.0 * xs / max(w - 1, 1) - 1.0
    gy = 2.0 * ys / max(h - 1, 1) - 1.0
    return F.grid_sample(
        source, torch.stack([gx, gy], dim=-1), mode="bilinear", padding_mode="border", align_corners=True
    )


class SelectTranslationHead(TranslationHead):
    """Fused grid + source image → (N, C, H, W) in [0, 1] by a soft per-pixel choice of horizontal shifts.

    ``out[..., x] = Σ_k p_k(x) · source[..., x + k]`` for k in −R..R (``max_shift`` = R, pixels of the input
    resolution), ``p = softmax`` over the 2R+1 shift logits, with the shifts whose source column ``x + k`` falls
    outside the image masked out (a pixel whose match left the image takes the nearest shift still inside).
    Every candidate gets a gradient from the first step. The source is only ever an *input* (the model picks
    it; the target is never warped). See Xie et al., Deep3D (2016). ``generate=True`` adds one candidate,
    ``p_gen(x) · generated(x)`` with ``generated`` a directly decoded image in [0, 1] (for occlusions). On the
    stereo demo this head overfits the training region (a per-pixel choice among 33 shifts can match texture):
    concat, 800 steps, held-out MAE 0.071 vs 0.054 for :class:`WarpTranslationHead`'s one regressed shift; with
    the generated candidate 0.080-0.083 vs 0.070-0.075 without (400 steps, two seeds).
    """

    needs_source = True

    def __init__(
        self,
        dim: int,
        channels: int,
        steps: int,
        max_shift: int,
        gan_weight: float = 0.0,
        generate: bool = False,
        skip_channels: Sequence[int] | None = None,
        refine: int = 0,
    ):
        if max_shift < 1:
            raise ValueError(f"SelectTranslationHead: max_shift must be ≥ 1 px; got {max_shift}")
        extra = 1 + channels if generate else 0
        super().__init__(
            dim,
            channels,
            steps,
            gan_weight,
            decoder_channels=2 * max_shift + 1 + extra,
            skip_channels=skip_channels,
            refine=refine,
        )
        self.max_shift, self.generate = int(max_shift), bool(generate)
        self.candidates = 2 * self.max_shift + 1 + int(self.generate)

    def forward(self, grid: torch.Tensor, size: tuple[int, int], source: torch.Tensor, skips=None) -> torch.Tensor:
        y = self._decode_with_source(grid, size, source, skips)
        w = source.shape[-1]
        k = 2 * self.max_shift + 1
        p = self._probs(y[:, : self.candidates])
        padded = F.pad(source.float(), (self.max_shift, self.max_shift))  # (n, c, h, w + 2R)
        windows = padded.unfold(-1, w, 1)  # (n, c, h, k, w), a view: windows[..., j, x] = source[..., x + j − R]
        warped = torch.einsum("nchkw,nkhw->nchw", windows, p[:, :k])
        return warped + p[:, k:] * torch.sigmoid(y[:, k + 1 :]) if self.generate else warped

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, candidates, H, W) logits → probabilities, the shifts reading outside the image masked out."""
        r, k, w = self.max_shift, 2 * self.max_shift + 1, logits.shape[-1]
        col = torch.arange(w, device=logits.device).view(1, w) + torch.arange(-r, r + 1, device=logits.device).view(
            k, 1
        )
        inside = torch.cat(
            [(col >= 0) & (col < w), torch.ones(self.candidates - k, w, dtype=torch.bool, device=logits.device)]
        )
        return torch.softmax(logits.masked_fill(~inside.view(1, self.candidates, 1, w), float("-inf")), dim=1)

    def shift_probs(self, grid: torch.Tensor, size: tuple[int, int], skips=None) -> torch.Tensor:
        """(N, candidates, H, W) probabilities (shifts −R..R, then the generated one if on), for inspection."""
        return self._probs(_decode(self.decoder, grid, size, skips).float()[:, : self.candidates])


class ClassificationHead(nn.Module):
    """Per-modality pooled Z (masked mean over real tokens) → concat → MLP → (N, K) multi-label logits; BCE."""

    def __init__(self, dim: int, num_classes: int, num_modalities: int):
        super().__init__()
        self.num_classes = num_classes
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim * num_modalities),
            nn.Linear(dim * num_modalities, dim),
            nn.GELU(),
            nn.Linear(dim, num_classes),
        )

    def forward(self, zs: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None]) -> torch.Tensor:
        pooled = []
        for z, m in zip(zs, masks, strict=True):
            if m is None:
                pooled.append(z.mean(1))
            else:
                w = m.to(z.dtype).unsqueeze(-1)
                pooled.append((z * w).sum(1) / w.sum(1).clamp_min(1))
        return self.mlp(torch.cat(pooled, dim=-1)).float()

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if target.shape != logits.shape:
            raise ValueError(
                f"classification: target {tuple(target.shape)} does not match logits {tuple(logits.shape)}"
            )
        bce = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
        return bce.mean(), bce.mean(1)

    def sums(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        out = scores.multilabel_sums(torch.sigmoid(logits), target, valid)
        out.pop("count")  # the model reports count once, for every task alike
        return out

    def predict(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"probs": torch.sigmoid(logits)}
