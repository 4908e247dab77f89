"""A strong non-invertible fusion baseline: a stack of bidirectional cross-attention transformer blocks.

``model.fusion=xattn`` puts this where MANGO's flow G sits in the latent task models (same encoders, same token
grid, same fusion conv and head, no NLL): each block lets every modality's tokens attend to the other's, both
ways at once, then applies a per-token MLP — the ordinary multimodal transformer fusion a user would compare MANGO
against (pre-norm residual blocks, as in ViT / Perceiver-style cross-attention)::

    A ← A + MHA(LN(A), LN(B), LN(B));   B ← B + MHA(LN(B), LN(A), LN(A))     (both from the block's inputs)
    A ← A + MLP(LN(A));                 B ← B + MLP(LN(B))

With one input modality the blocks are self-attention blocks. Padded text tokens (mask False) are excluded as
keys. Depth = ``model.num_blocks``; the MLP width ``model.xattn_mlp_ratio · D`` is what the fusion study tunes to
match MANGO's parameter count.
"""

from __future__ import annotations

import torch
from torch import nn


class CrossBlock(nn.Module):
    """One bidirectional cross-attention block over two token sets of width ``dim``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = max(1, round(dim * mlp_ratio))
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def attend(self, x: torch.Tensor, other: torch.Tensor, other_mask: torch.Tensor | None) -> torch.Tensor:
        kv = self.norm_kv(other)
        pad = None if other_mask is None else ~other_mask.bool()
        out, _ = self.attn(self.norm_q(x), kv, kv, key_padding_mask=pad, need_weights=False)
        return x + out

    def forward(self, tokens: list[torch.Tensor], masks: list[torch.Tensor | None]) -> list[torch.Tensor]:
        if len(tokens) == 2:
            a, b = tokens
            tokens = [self.attend(a, b, masks[1]), self.attend(b, a, masks[0])]
        else:
            tokens = [self.attend(tokens[0], tokens[0], masks[0])]
        return [t + self.mlp(self.norm_mlp(t)) for t in tokens]


class CrossAttentionFusion(nn.Module):
    """``depth`` :class:`CrossBlock` s; ``forward(tokens, masks) -> tokens`` (each (N, n, D), same shapes)."""

    def __init__(self, dim: int, depth: int, *, heads: int = 4, mlp_ratio: float = 2.0):
        super().__init__()
        heads = heads if dim % heads == 0 else 1
        self.blocks = nn.ModuleList(CrossBlock(dim, heads, mlp_ratio) for _ in range(depth))

    def forward(self, tokens: list[torch.Tensor], masks: list[torch.Tensor | None]) -> list[torch.Tensor]:
        for block in self.blocks:
            tokens = block(tokens, masks)
        return tokens
