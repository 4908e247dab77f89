"""Image encoders E of the latent task models, and the tokenizer that puts their features on a fixed grid.

Two encoders, both ``(N, C, H, W) float → list of feature maps (N, C_i, H_i, W_i)``:

- :class:`ConvPatchEncoder` (``model.encoder=conv``, the default): a small strided conv stem that trains
  from scratch; one map at stride ``patch_size``.
- :class:`MixVisionTransformer` (``model.encoder=mit_b0..mit_b5``): SegFormer's hierarchical MiT encoder
  (overlapping patch embeddings, spatial-reduction attention, Mix-FFN); four maps at strides 4, 8, 16, 32.
  Its parameter names are the published SegFormer/MiT ones (``patch_embed1.proj.weight``,
  ``block1.0.attn.q.weight``, ``block1.0.mlp.dwconv.dwconv.weight``, ``norm1.weight``, …), so the released
  ImageNet checkpoints (``mit_b*.pth``) load with :func:`load_mit_weights` — every key consumed, shapes
  checked, and the ImageNet classifier ``head.*`` the only keys deliberately dropped.

:class:`GridTokenizer` maps any encoder's maps to ``n = gh·gw`` tokens of width D in raster order: each map
is average-pooled to the (gh, gw) grid and projected by a 1×1 conv, and the projections are summed. The grid
does not depend on the input size, so training crops and full-resolution evaluation give the same token
count (the flow G and LICA's mixer need a fixed L).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: ImageNet statistics the MiT checkpoints were trained with (inputs in [0, 1])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class MiTSize:
    """One MiT variant: per-stage widths, depths, heads and spatial-reduction ratios (SegFormer Table 6)."""

    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4


MIT_SIZES: dict[str, MiTSize] = {
    "mit_b0": MiTSize((32, 64, 160, 256), (2, 2, 2, 2)),
    "mit_b1": MiTSize((64, 128, 320, 512), (2, 2, 2, 2)),
    "mit_b2": MiTSize((64, 128, 320, 512), (3, 4, 6, 3)),
    "mit_b3": MiTSize((64, 128, 320, 512), (3, 4, 18, 3)),
    "mit_b4": MiTSize((64, 128, 320, 512), (3, 8, 27, 3)),
    "mit_b5": MiTSize((64, 128, 320, 512), (3, 6, 40, 3)),
}

#: keys of a published ImageNet MiT checkpoint that have no place in an encoder (the 1000-way classifier)
MIT_DROPPED_KEYS = ("head.weight", "head.bias")


# -- conv patch encoder -------------------------------------------------------------------------------


class ConvPatchEncoder(nn.Module):
    """Strided 3×3 convs (GroupNorm, GELU) from ``in_channels`` to ``width`` at stride ``patch_size`` (a power of 2).

    (N, C, H, W) → ``[(N, width, H/p, W/p)]``. A final 3×3 conv at full stride mixes neighbouring patches.
    """

    def __init__(self, in_channels: int, width: int, patch_size: int):
        super().__init__()
        if patch_size < 1 or patch_size & (patch_size - 1):
            raise ValueError(f"ConvPatchEncoder: patch_size must be a power of 2; got {patch_size}")
        steps = int(math.log2(patch_size))
        layers: list[nn.Module] = []
        c = in_channels
        for i in range(steps):
            out = max(16, width // 2 ** (steps - 1 - i))
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.GroupNorm(_groups(out), out), nn.GELU()]
            c = out
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(_groups(width), width), nn.GELU()]
        self.net = nn.Sequential(*layers)
        self.out_channels = (width,)
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.net(x)]


def _groups(c: int) -> int:
    return next(g for g in (8, 4, 2, 1) if c % g == 0)


# -- MiT (SegFormer) ----------------------------------------------------------------------------------


class _DWConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        n, _, c = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(n, c, h, w)).flatten(2).transpose(1, 2)


class _MixFFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = _DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class _SRAttention(nn.Module):
    """Multi-head attention whose keys/values come from the map reduced by a strided conv (ratio ``sr``)."""

    def __init__(self, dim: int, heads: int, sr: int):
        super().__init__()
        self.heads, self.sr_ratio = heads, sr
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr, stride=sr)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        n, length, c = x.shape
        q = self.q(x).reshape(n, length, self.heads, c // self.heads).transpose(1, 2)
        src = x
        if self.sr_ratio > 1:
            src = self.norm(self.sr(x.transpose(1, 2).reshape(n, c, h, w)).flatten(2).transpose(1, 2))
        k, v = self.kv(src).reshape(n, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head dim), as SegFormer
        return self.proj(out.transpose(1, 2).reshape(n, length, c))


class _DropPath(nn.Module):
    """Stochastic depth on the residual branch (per sample), active only in training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class _MiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, sr: int, mlp_ratio: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _SRAttention(dim, heads, sr)
        self.drop_path = _DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _MixFFN(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class _OverlapPatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, kernel: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class MixVisionTransformer(nn.Module):
    """SegFormer's MiT encoder (3-channel input, ImageNet-normalised) → 4 maps at strides 4, 8, 16, 32.

    Submodule names follow the published checkpoints exactly: ``patch_embed{1..4}``, ``block{1..4}``,
    ``norm{1..4}``. ``drop_path_rate`` 0.1 as in SegFormer's training recipes.
    """

    def __init__(self, size: str, drop_path_rate: float = 0.1):
        super().__init__()
        if size not in MIT_SIZES:
            raise ValueError(f"MixVisionTransformer: unknown size {size!r}; use one of {list(MIT_SIZES)}")
        s = MIT_SIZES[size]
        self.size = size
        rates = torch.linspace(0, drop_path_rate, sum(s.depths)).tolist()
        c_in, at = 3, 0
        for i, (dim, depth) in enumerate(zip(s.embed_dims, s.depths), start=1):
            kernel, stride = (7, 4) if i == 1 else (3, 2)
            setattr(self, f"patch_embed{i}", _OverlapPatchEmbed(c_in, dim, kernel, stride))
            setattr(
                self,
                f"block{i}",
                nn.ModuleList(
                    _MiTBlock(dim, s.num_heads[i - 1], s.sr_ratios[i - 1], s.mlp_ratio, rates[at + j])
                    for j in range(depth)
                ),
            )
            setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=1e-6))
            c_in, at = dim, at + depth
        self.out_channels = s.embed_dims
        self.in_channels = 3
        self.apply(_init_mit)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                x = blk(x, h, w)
            x = getattr(self, f"norm{i}")(x)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
            outs.append(x)
        return outs


def _init_mit(m: nn.Module) -> None:
    # SegFormer's initialisation (truncated normal linears, fan-out normal convs), for training from scratch
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class WeightsMismatchError(ValueError):
    """A pretrained state dict that does not fit the encoder; the message names the offending keys."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a local ``.pth``/``.pt`` (plain, or under ``state_dict``/``model``) or ``.safetensors`` file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.encoder_weights: {path!r} is not a file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file  # optional: only when loading pretrained encoder weights

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsMismatchError(f"model.encoder_weights={path!r}: expected a mapping of parameter names to tensors")
    return dict(state)


def load_mit_weights(
    encoder: MixVisionTransformer, state: Mapping[str, torch.Tensor], source: str = "state dict"
) -> list[str]:
    """Copy a published MiT state dict into ``encoder``: every key consumed, every shape checked.

    Keys in :data:`MIT_DROPPED_KEYS` (the ImageNet classifier) are dropped and returned; any other key that
    the encoder lacks, any encoder key the state dict lacks, and any shape difference raise
    :class:`WeightsMismatchError` listing them all (nothing is copied then).
    """
    own = encoder.state_dict()
    dropped = sorted(k for k in state if k in MIT_DROPPED_KEYS)
    given = {k: v for k, v in state.items() if k not in MIT_DROPPED_KEYS}
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    shapes = sorted(
        f"{k}: file {tuple(given[k].shape)} vs {encoder.size} {tuple(own[k].shape)}"
        for k in set(own) & set(given)
        if tuple(given[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                more = f" (+{len(items) - 8} more)" if len(items) > 8 else ""
                parts.append(f"{label} [{len(items)}]: {', '.join(items[:8])}{more}")
        raise WeightsMismatchError(f"{source} does not fit {encoder.size}: " + "; ".join(parts))
    with torch.no_grad():
        for k, v in given.items():
            own[k].copy_(v.to(own[k].dtype))
    return dropped


# -- grid tokenizer -----------------------------------------------------------------------------------


class GridTokenizer(nn.Module):
    """Feature maps → (N, gh·gw, D) tokens in raster order (pool each map to the grid, 1×1 project, sum)."""

    def __init__(self, in_channels: Sequence[int], dim: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = tuple(grid)
        self.proj = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in in_channels)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        total = None
        for proj, m in zip(self.proj, maps, strict=True):
            t = proj(F.adaptive_avg_pool2d(m, self.grid))
            total = t if total is None else total + t
        return total.flatten(2).transpose(1, 2)


class ImageEncoder(nn.Module):
    """One image modality: integer image (N, C, H, W) → normalised float → encoder → grid tokens (N, n, D).

    ``bits`` 8 → value/255; 16 (depth) → value/``depth_max`` clipped to [0, 1]. The conv encoder sees
    ``2x − 1``; the MiT encoder sees ImageNet-normalised 3-channel input (a 1-channel modality such as depth is
    repeated to 3 channels, as TokenFusion feeds depth to its shared backbone).
    """

    def __init__(
        self, kind: str, channels: int, bits: int, dim: int, grid: tuple[int, int], patch_size: int, depth_max: float
    ):
        super().__init__()
        if bits not in (8, 16):
            raise ValueError(f"ImageEncoder: an image modality must be 8- or 16-bit; got {bits} bits")
        self.kind, self.channels, self.bits, self.depth_max = kind, channels, bits, float(depth_max)
        if kind == "conv":
            self.encoder = ConvPatchEncoder(channels, max(dim, 32), patch_size)
        else:
            if channels not in (1, 3):
                raise ValueError(
                    f"ImageEncoder: {kind} takes 3-channel (or 1-channel, repeated) images; got {channels}"
                )
            self.encoder = MixVisionTransformer(kind)
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.tokenizer = GridTokenizer(self.encoder.out_channels, dim, grid)

    def scaled(self, img: torch.Tensor) -> torch.Tensor:
        """Integer image → float in [0, 1] (see the class docstring)."""
        x = img.float() if img.dtype != torch.uint16 else img.to(torch.int32).float()
        return x / 255.0 if self.bits == 8 else (x / self.depth_max).clamp(0.0, 1.0)

    def features(self, img: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's feature maps (finest first: MiT strides 4, 8, 16, 32; conv one map at ``patch_size``)."""
        if img.dim() != 4 or img.shape[1] != self.channels:
            raise ValueError(f"ImageEncoder: expected (N, {self.channels}, H, W); got {tuple(img.shape)}")
        x = self.scaled(img)
        if self.kind == "conv":
            x = 2.0 * x - 1.0
        else:
            x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        return self.encoder(x)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.tokenizer(self.features(img))
