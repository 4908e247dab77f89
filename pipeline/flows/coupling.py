"""Affine coupling over channels with a 1-D convolutional conditioner along tokens.

x (N, L, D) is split along channels into ``(xa, xb)`` (``swap`` exchanges the roles)::

    h = net(xa)                                  # Conv1d along tokens → GroupNorm → GELU → … → Conv1d
    log_s = bound · tanh(h_s / bound),  t = h_t   # bounded scale: one layer can change the scale by ≤ e^bound
    yb = xb · exp(log_s) + t,  ya = xa,  logdet = Σ log_s

The last conv is zero-initialised, so the coupling is the exact identity at init. The conditioner's norm is
``GroupNorm(1, ·)`` (statistics per sample): a batch-dependent norm would make one sample's transform depend
on the others, which breaks the per-sample density and the inverse.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .base import (
    InvertibleModule,
    compute_dtype,
    current_mask,
    in_block_checkpoint,
    logdet_dtype,
    native_ok,
    no_autocast,
)
from .kernels import native


class AffineCoupling(InvertibleModule):
    """Channel-split affine coupling on (N, L, dim); ``hidden`` is the conditioner width."""

    def __init__(self, dim: int, hidden: int, *, swap: bool = False, kernel_size: int = 3, scale_bound: float = 2.0):
        super().__init__()
        if dim < 2:
            raise ValueError(f"AffineCoupling: needs at least 2 channels to split; got dim={dim}")
        if kernel_size % 2 == 0:
            raise ValueError(f"AffineCoupling: kernel_size must be odd (same-length conv); got {kernel_size}")
        self.dim, self.swap, self.scale_bound = dim, swap, scale_bound
        self.cond_dim = dim // 2 if not swap else dim - dim // 2
        self.out_dim = dim - self.cond_dim
        pad = kernel_size // 2
        self.net = nn.Sequential(
            nn.Conv1d(self.cond_dim, hidden, kernel_size, padding=pad),
            nn.GroupNorm(1, hidden),
            nn.GELU(),
            nn.Conv1d(hidden, hidden, 1),
            nn.GroupNorm(1, hidden),
            nn.GELU(),
            nn.Conv1d(hidden, 2 * self.out_dim, kernel_size, padding=pad),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        #: keep only the conditioner's input and recompute it in backward (set by ``MangoFlow(memory="checkpoint")``)
        self.recompute_conditioner = False

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.swap:
            xb, xa = x[..., : self.out_dim], x[..., self.out_dim :]
        else:
            xa, xb = x[..., : self.cond_dim], x[..., self.cond_dim :]
        return xa, xb

    def _join(self, xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
        return torch.cat([xb, xa] if self.swap else [xa, xb], dim=-1)

    def _native_ok(self, x: torch.Tensor, reverse: bool) -> bool:
        """Whether the forward can be the C++ node (:func:`pipeline.flows.kernels.native.affine_coupling`): not under
        autocast (the module path runs the convolutions in bf16 there), ordinary parameters (ZeRO-3 gathers
        partitioned ones inside each submodule's forward) in x's dtype."""
        w = self.net[0].weight
        return not reverse and native_ok(self, x, w) and w.dtype == x.dtype == compute_dtype(x)

    def _forward(self, x: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self._native_ok(x, reverse):
            out = native.affine_coupling(self, x, self.recompute_conditioner and not in_block_checkpoint())
            if out is not None:
                return out
        xa, xb = self._split(x)
        if (
            self.recompute_conditioner
            and torch.is_grad_enabled()
            and not in_block_checkpoint()
            and not hasattr(self.net[0].weight, "ds_id")
            and (xa.requires_grad or self.net[0].weight.requires_grad)
        ):
            # torch's non-reentrant checkpoint: works with autograd.grad and with module-hook tools
            # (FlopCounterMode), unlike a Function that calls autograd.grad in its backward
            h = checkpoint(self.net, xa.transpose(1, 2), use_reentrant=False).transpose(1, 2)
        else:
            h = self.net(xa.transpose(1, 2)).transpose(1, 2)  # (N, L, 2·out_dim), may be bf16 under autocast
        ct = compute_dtype(x)
        with no_autocast(x.device.type):
            h = h.to(ct)
            raw_s, t = h[..., : self.out_dim], h[..., self.out_dim :]
            log_s = self.scale_bound * torch.tanh(raw_s / self.scale_bound)
            mask = current_mask(x)
            if mask is not None:  # padded tokens (token_mask): no update, nothing in the log-det
                keep = mask.unsqueeze(-1).to(ct)
                log_s, t = log_s * keep, t * keep
            logdet = log_s.sum(dim=(1, 2)).to(logdet_dtype(x))
            if reverse:
                yb = (xb.to(ct) - t) * torch.exp(-log_s)
                return self._join(xa, yb.to(x.dtype)), -logdet
            yb = xb.to(ct) * torch.exp(log_s) + t
            return self._join(xa, yb.to(x.dtype)), logdet
