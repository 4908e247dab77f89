"""Multiscale, high-resolution MANGO flow over two image modalities (Glow/RealNVP-style levels).

Data flow for images a, b (N, C, H, W) with the same channel count C::

    patchify each modality (p×p patches) → tokens (N, n0, C·p²);  x = [A tokens ; B tokens]  (N, 2·n0, D0)
    level k:  MangoFlow(blocks_per_level) on x (N, 2·n_k, D_k)
              factor out channels [:D_k/2] → latent z_k (N, 2·n_k, D_k/2)      (not at the last level)
              squeeze 2×2 (space-to-depth on each modality's token grid) → n_{k+1} = n_k/4, D_{k+1} = 2·D_k
    last level: all of x is the latent z_{K-1}.  Prior: N(0, I) over every latent.

An exact flow cannot change dimensionality, so the token width is fixed by ``channels · patch_size²`` and
doubles per level; ``dim`` is the width of the learned conditioners (q/k projections, coupling hidden
width). LICA's token mixer has ``L·G`` parameters, so levels use token groups of ``lica_group`` (a full
L×L mixer at 256² would be tens of millions of parameters per layer).

``num_modalities=1`` builds the single-modality baseline with the same layer types: one image's tokens are
split even/odd (interleaved columns) into the two "modalities" the partitions expect.

Every entry point (``log_prob``, ``bits_per_dim``, ``encode``, ``decode``, ``sample``) is routed through
``forward(mode=...)``: ZeRO-3 gathers partitioned weights only inside module forward hooks.

Quantisation: each modality declares its bit depth (8 for RGB, 16 for depth in mm). ``bits_per_dim``
takes integer images, dequantises with uniform noise ``x = (v + u)/2^bits − 1/2`` and includes the
``bits · ln 2`` per-dimension correction, so it is a bound on the discrete data's code length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .base import inside_flow
from .mango import MangoFlow
from .partitions import resolve_partitions

MODES = ("log_prob", "bits_per_dim", "encode", "decode", "sample")


def patchify(img: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) → (N, (H/p)·(W/p), C·p²), tokens in raster order."""
    n, c, h, w = img.shape
    t = img.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return t.reshape(n, (h // p) * (w // p), c * p * p)


def unpatchify(tok: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    n = tok.shape[0]
    t = tok.reshape(n, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return t.reshape(n, c, h, w)


def squeeze(tok: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Space-to-depth on a token grid: (N, gh·gw, D) → (N, gh/2·gw/2, 4D)."""
    n, _, d = tok.shape
    t = tok.reshape(n, gh // 2, 2, gw // 2, 2, d).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(n, (gh // 2) * (gw // 2), 4 * d)


def unsqueeze(tok: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Inverse of :func:`squeeze` (gh, gw are the grid *before* squeezing)."""
    n, _, d4 = tok.shape
    t = tok.reshape(n, gh // 2, gw // 2, 2, 2, d4 // 4).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(n, gh * gw, d4 // 4)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Continuous flow space [−1/2, 1/2) → integer levels {0 … 2^bits − 1} (int64)."""
    levels = 2**bits
    return torch.clamp(torch.floor((x + 0.5) * levels), 0, levels - 1).to(torch.int64)


def _equal_channels(channels: int | Sequence[int]) -> int:
    """The one channel count every modality shares (an exact pixel-level flow needs equal token widths)."""
    if isinstance(channels, int):
        return channels
    chans = list(channels)
    if len(set(chans)) != 1:
        raise ValueError(
            f"MultiscaleMangoFlow: the modalities have different channel counts {chans}; an exact pixel-level "
            "MANGO flow needs equal token widths. Use the latent task model (model.task=segmentation / "
            "translation, which encodes each modality to D channels) or equal-channel modalities such as "
            "the stereo pair (RGB + RGB)."
        )
    return chans[0]


def _blocks_per_level(blocks_per_level: int | Sequence[int], levels: int) -> list[int]:
    """One MANGO block count per level."""
    per_level = [blocks_per_level] * levels if isinstance(blocks_per_level, int) else list(blocks_per_level)
    if levels < 1 or len(per_level) != levels:
        raise ValueError(
            f"MultiscaleMangoFlow: need levels ≥ 1 and one block count per level; got {levels}, {per_level}"
        )
    return per_level


def _check_image_geometry(
    h: int, w: int, patch_size: int, levels: int, bits: Sequence[int], num_modalities: int
) -> None:
    """The image divides into patches and squeezes at every level; 8 or 16 bits per modality."""
    scale = patch_size * 2 ** (levels - 1)
    if h % scale or w % scale:
        raise ValueError(
            f"MultiscaleMangoFlow: image size {h}×{w} must be divisible by patch_size·2^(levels−1) = {scale}"
        )
    if len(bits) != num_modalities or any(b not in (8, 16) for b in bits):
        raise ValueError(
            f"MultiscaleMangoFlow: bits must give 8 or 16 per modality ({num_modalities}); got {tuple(bits)}"
        )


def _check_level(
    k: int, levels: int, gh: int, gw: int, d: int, num_modalities: int, partitions: str | Sequence[str]
) -> None:
    """Level ``k``'s gh×gw token grid of width ``d`` can be factored out and split as the partitions need."""
    tokens = gh * gw * num_modalities
    if k < levels - 1 and d % 2:
        raise ValueError(f"MultiscaleMangoFlow: level {k} token width {d} is odd; cannot factor out half")
    if num_modalities == 1 and gw % 2:
        raise ValueError(f"MultiscaleMangoFlow: single-modality level {k} needs an even grid width; got {gw}")
    per_modality = tokens // 2
    if per_modality % 2 and any(p.startswith(("imca", "lica")) for p in resolve_partitions(partitions)):
        raise ValueError(
            f"MultiscaleMangoFlow: level {k} has a {gh}×{gw} token grid ({per_modality} tokens per "
            f"modality, odd); IMCA/LICA split each modality's tokens even/odd. Use fewer levels, a smaller "
            f"patch_size, a larger image, or partitions='mmca'"
        )


class MultiscaleMangoFlow(nn.Module):
    """Exact joint density of two equal-channel image modalities (see module docstring).

    Args:
        channels: channels per modality (both modalities must match at pixel level).
        image_size: H (= W) or (H, W).
        levels: number of levels K (K−1 factor-outs and squeezes).
        blocks_per_level: MANGO blocks per level (an int, or one int per level).
        dim: conditioner width (q/k projections and coupling hidden width).
        patch_size: p; level-0 token width is ``channels·p²``.
        bits: bit depth per modality for :meth:`bits_per_dim` (e.g. ``(8, 8)``; ``(8, 16)`` for RGB + mm).
        partitions: the block layout (preset or names), as in :class:`~pipeline.flows.MangoBlock`.
        lica_group: LICA token-group size (clipped to the level's token count).
        num_modalities: 2 (joint) or 1 (single-modality baseline, tokens split even/odd).
        channel_mix: start every block with a learned invertible channel mixer (False = the paper's block).
        memory, form, learn_temperature, attention: passed to every level's :class:`~pipeline.flows.MangoFlow`
            (``attention="auto"`` picks the fused ICA forward per level by its token count).
    """

    def __init__(
        self,
        channels: int | Sequence[int],
        image_size: int | Sequence[int],
        levels: int,
        blocks_per_level: int | Sequence[int],
        dim: int,
        *,
        patch_size: int = 2,
        bits: Sequence[int] = (8, 8),
        partitions: str | Sequence[str] = "all",
        lica_group: int = 64,
        num_modalities: int = 2,
        memory: str = "store",
        form: str = "gated",
        learn_temperature: bool = False,
        attention: str = "auto",
        channel_mix: bool = True,
    ):
        super().__init__()
        channels = _equal_channels(channels)
        if num_modalities not in (1, 2):
            raise ValueError(f"MultiscaleMangoFlow: num_modalities must be 1 or 2; got {num_modalities}")
        h, w = _pair(image_size)
        per_level = _blocks_per_level(blocks_per_level, levels)
        _check_image_geometry(h, w, patch_size, levels, bits, num_modalities)
        self.channels, self.height, self.width = channels, h, w
        self.patch_size, self.levels, self.num_modalities = patch_size, levels, num_modalities
        self.bits = tuple(bits)

        self.flows = nn.ModuleList()
        self.grids: list[tuple[int, int]] = []
        gh, gw, d = h // patch_size, w // patch_size, channels * patch_size**2
        for k in range(levels):
            tokens = gh * gw * num_modalities
            _check_level(k, levels, gh, gw, d, num_modalities, partitions)
            self.grids.append((gh, gw))
            self.flows.append(
                MangoFlow(
                    d,
                    tokens,
                    per_level[k],
                    memory=memory,
                    partitions=partitions,
                    hidden=dim,
                    qk_dim=min(dim, d),
                    lica_group=min(lica_group, tokens) if lica_group else 0,
                    form=form,
                    learn_temperature=learn_temperature,
                    attention=attention,
                    channel_mix=channel_mix,
                )
            )
            if k < levels - 1:
                gh, gw, d = gh // 2, gw // 2, d * 2
        self.latent_shapes = [
            (gh_ * gw_ * num_modalities, (channels * patch_size**2 * 2**k) // (1 if k == levels - 1 else 2))
            for k, (gh_, gw_) in enumerate(self.grids)
        ]

    # -- public entry points, all through forward -----------------------------------------------------
    def log_prob(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """Log-density (N,) in nats of continuous inputs: log N(z) over all latents + log|det|."""
        return self(a, b, mode="log_prob")

    def bits_per_dim(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """Bits per dimension (N,) of integer images (uniform dequantisation, correction included).

        Floating-point images are taken as already dequantised, ``(v + u)/2^bits − 1/2``: no noise is drawn.
        """
        return self(a, b, mode="bits_per_dim")

    def encode(self, a: torch.Tensor, b: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The factored-out latents, finest first and coarsest last: [(N, L_k, D_k')]."""
        return self(a, b, mode="encode")

    def decode(self, zs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Exact inverse of :meth:`encode` → (a, b) (or (a,) for a single-modality flow)."""
        return self(zs=list(zs), mode="decode")

    def sample(self, n: int, temperature: float = 1.0) -> tuple[torch.Tensor, ...]:
        """Exact joint samples (continuous flow space); see :func:`quantize` for integer images."""
        return self(n=n, temperature=temperature, mode="sample")

    def forward(
        self, a=None, b=None, *, mode: str = "log_prob", zs=None, n: int | None = None, temperature: float = 1.0
    ):
        if mode == "decode" and zs is not None:
            for k, z in enumerate(zs):
                if isinstance(z, torch.Tensor) and not bool(torch.isfinite(z.detach()).all()):
                    raise ValueError(f"MultiscaleMangoFlow.decode: latent {k} has non-finite values")
        # inputs are validated here, at the model's boundary; inside, a NaN activation must become a
        # non-finite loss (skipped and counted by the train loop), not an input error of an inner level
        with inside_flow():
            return self._dispatch(a, b, mode, zs, n, temperature)

    def _dispatch(self, a, b, mode: str, zs, n: int | None, temperature: float):
        if mode == "log_prob":
            return self._log_prob(*self._check_images(a, b))
        if mode == "bits_per_dim":
            return self._bits_per_dim(*self._check_images(a, b))
        if mode == "encode":
            return self._transform(*self._check_images(a, b))[0]
        if mode == "decode":
            return self._inverse(zs)
        if mode == "sample":
            return self._sample(n, temperature)
        raise ValueError(f"MultiscaleMangoFlow: unknown mode '{mode}'; use one of {list(MODES)}")

    # -- implementation -------------------------------------------------------------------------------
    @property
    def num_dims(self) -> int:
        """Data dimensions per sample (all modalities)."""
        return self.num_modalities * self.channels * self.height * self.width

    def _check_images(self, a: torch.Tensor, b: torch.Tensor | None) -> list[torch.Tensor]:
        imgs = [a] if self.num_modalities == 1 else [a, b]
        if self.num_modalities == 1 and b is not None:
            raise ValueError("MultiscaleMangoFlow: this is a single-modality flow; pass one image tensor")
        want = (self.channels, self.height, self.width)
        for name, img in zip("ab", imgs):
            if img is None:
                raise ValueError(f"MultiscaleMangoFlow: modality '{name}' is missing; the joint flow needs both images")
            if not isinstance(img, torch.Tensor):
                raise ValueError(f"MultiscaleMangoFlow: modality '{name}' must be a tensor; got {type(img).__name__}")
            if img.is_floating_point() and not bool(torch.isfinite(img.detach()).all()):
                raise ValueError(f"MultiscaleMangoFlow: modality '{name}' has non-finite values (NaN or inf)")
            if img.ndim != 4 or tuple(img.shape[1:]) != want:
                hint = ""
                if img.ndim == 4 and img.shape[1] != self.channels:
                    hint = (
                        " — modalities with different channel counts (e.g. RGB + 1-channel depth) cannot be an "
                        "exact pixel-level MANGO flow: use the latent task model, or equal-channel modalities "
                        "such as the stereo pair"
                    )
                raise ValueError(
                    f"MultiscaleMangoFlow: modality '{name}' must be (N, {want[0]}, {want[1]}, {want[2]}); "
                    f"got {tuple(img.shape)}{hint}"
                )
        if self.num_modalities == 2 and a.shape[0] != b.shape[0]:
            raise ValueError(f"MultiscaleMangoFlow: batch sizes differ: a {a.shape[0]} vs b {b.shape[0]}")
        return imgs

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @staticmethod
    def _even_odd(t: torch.Tensor) -> torch.Tensor:
        """Raster-order tokens → [even ; odd] (the single-modality baseline's two "modalities")."""
        return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)

    @staticmethod
    def _raster(x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`_even_odd`."""
        return torch.stack(x.chunk(2, dim=1), dim=2).reshape(x.shape)

    def _tokens(self, imgs: Sequence[torch.Tensor]) -> torch.Tensor:
        toks = [patchify(img.to(self._param_dtype()), self.patch_size) for img in imgs]
        return self._even_odd(toks[0]) if self.num_modalities == 1 else torch.cat(toks, dim=1)

    def _images(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p, c, h, w = self.patch_size, self.channels, self.height, self.width
        parts = [self._raster(x)] if self.num_modalities == 1 else x.chunk(2, dim=1)
        return tuple(unpatchify(t, p, c, h, w) for t in parts)

    def _squeeze(self, x: torch.Tensor, k: int, inverse: bool = False) -> torch.Tensor:
        """Squeeze level k's grid to level k+1's (``inverse=True``: back), per modality."""
        gh, gw = self.grids[k]
        fn = unsqueeze if inverse else squeeze
        if self.num_modalities == 1:
            return self._even_odd(fn(self._raster(x), gh, gw))
        return torch.cat([fn(t, gh, gw) for t in x.chunk(2, dim=1)], dim=1)

    def _transform(self, *imgs: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = self._tokens(imgs)
        total = x.new_zeros(x.shape[0], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        zs = []
        for k, flow in enumerate(self.flows):
            x, logdet = flow(x)
            total = total + logdet
            if k < self.levels - 1:
                d = x.shape[-1] // 2
                zs.append(x[..., :d])
                x = self._squeeze(x[..., d:], k)
        zs.append(x)
        return zs, total

    def _inverse(self, zs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if len(zs) != self.levels:
            raise ValueError(f"MultiscaleMangoFlow.decode: expected {self.levels} latents; got {len(zs)}")
        for k, (z, shape) in enumerate(zip(zs, self.latent_shapes)):
            if z.ndim != 3 or tuple(z.shape[1:]) != shape:
                raise ValueError(
                    f"MultiscaleMangoFlow.decode: latent {k} must be (N, {shape[0]}, {shape[1]}); got {tuple(z.shape)}"
                )
        x = zs[-1]
        for k in reversed(range(self.levels)):
            if k < self.levels - 1:
                x = torch.cat([zs[k], self._squeeze(x, k, inverse=True)], dim=-1)
            x, _ = self.flows[k](x, reverse=True)
        return self._images(x)

    def _log_prob(self, *imgs: torch.Tensor) -> torch.Tensor:
        zs, logdet = self._transform(*imgs)
        log_2pi = math.log(2 * math.pi)
        prior = sum(-0.5 * (z.to(logdet.dtype).pow(2) + log_2pi).flatten(1).sum(1) for z in zs)
        return prior + logdet

    def _bits_per_dim(self, *imgs: torch.Tensor) -> torch.Tensor:
        xs, correction = [], 0.0
        for img, bits in zip(imgs, self.bits):
            if img.is_floating_point():
                # already dequantised by the caller, x = (v + u)/2^bits − 1/2 (e.g. noise drawn outside)
                xs.append(img.to(self._param_dtype()))
            else:
                v = img.to(torch.int32).to(self._param_dtype())
                xs.append((v + torch.rand_like(v)) / 2**bits - 0.5)
            correction += img[0].numel() * bits * math.log(2)
        nats = -self._log_prob(*xs) + correction
        return nats / (self.num_dims * math.log(2))

    def _sample(self, n: int | None, temperature: float) -> tuple[torch.Tensor, ...]:
        if not n or n < 1:
            raise ValueError(f"MultiscaleMangoFlow.sample: n must be a positive int; got {n}")
        ref = next(self.parameters())
        zs = [torch.randn(n, *shape, dtype=ref.dtype, device=ref.device) * temperature for shape in self.latent_shapes]
        return self._inverse(zs)
