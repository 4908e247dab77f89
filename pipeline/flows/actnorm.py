"""ActNorm with an explicit, rank-reduced data-dependent initialisation pass.

``y = (x + loc) · exp(log_scale)`` per channel on (N, L, D); log-det ``L · Σ_c log_scale_c`` per sample.

The data-dependent init (``loc = −mean``, ``log_scale = −log std`` over the first batch) is *not* done
lazily in ``forward``: under ZeRO-3 the parameters are partitioned and under activation checkpointing the
forward runs twice, so a lazy init would either see empty weights or initialise twice. Instead
:func:`data_init` runs one no-grad pass over a batch before the model is handed to DeepSpeed; each
uninitialised ActNorm sets itself from the statistics of its own input (Σx, Σx², count all-reduced across
ranks when a process group is up), so every later layer sees normalised activations and all ranks end
with identical parameters. ``initialized`` is a persistent buffer, so a loaded checkpoint never re-inits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .base import InvertibleModule, compute_dtype, current_mask, logdet_dtype, no_autocast


class ActNormAffine(torch.autograd.Function):
    """``y = (x + loc) · exp(log_scale)`` saving ``y`` (∂y/∂log_scale = y, ∂y/∂x = ∂y/∂loc = exp(log_scale))."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
        scale = torch.exp(log_scale)
        y = (x + loc) * scale
        ctx.save_for_backward(y, scale)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        y, scale = ctx.saved_tensors
        gx = grad * scale
        reduce = tuple(range(grad.ndim - 1))
        dloc = gx.sum(dim=reduce) if ctx.needs_input_grad[1] else None
        dlog = (grad * y).sum(dim=reduce) if ctx.needs_input_grad[2] else None
        return gx, dloc, dlog


class ActNorm(InvertibleModule):
    """Per-channel affine normalisation of (N, L, D) with a data-dependent init (see module docstring)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.loc = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.register_buffer("initialized", torch.tensor(False))
        self._collect_init = False

    @torch.no_grad()
    def initialize_from(self, x: torch.Tensor) -> None:
        """Set loc/log_scale from x's per-channel statistics, reduced over all ranks if distributed."""
        flat = x.detach().to(torch.float64).reshape(-1, self.dim)
        stats = torch.cat([flat.sum(0), (flat * flat).sum(0), flat.new_tensor([flat.shape[0]])])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # gloo has no fp64 restriction; nccl does support fp64 all_reduce.
            dist.all_reduce(stats)
        count = stats[-1]
        mean = stats[: self.dim] / count
        var = (stats[self.dim : 2 * self.dim] / count - mean * mean).clamp_min(0.0)
        self.loc.copy_((-mean).to(self.loc.dtype))
        self.log_scale.copy_((-0.5 * torch.log(var + self.eps)).to(self.log_scale.dtype))
        self.initialized.fill_(True)

    def _forward(self, x: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        mask = current_mask(x)
        if self._collect_init and not bool(self.initialized):
            self.initialize_from(x if mask is None else x[mask])  # statistics of the real tokens only
        if mask is not None:
            return self._forward_masked(x, mask, reverse)
        ct = compute_dtype(x)
        with no_autocast(x.device.type):
            loc, log_scale = self.loc.to(ct), self.log_scale.to(ct)
            logdet = (x.shape[1] * log_scale.sum()).to(logdet_dtype(x)).expand(x.shape[0])
            if reverse:
                y = x.to(ct) * torch.exp(-log_scale) - loc
                return y.to(x.dtype), -logdet
            if torch.is_grad_enabled() and x.dtype == ct and self.kernels != "reference":
                # one node that saves its output (which the next layer keeps anyway), not its shifted input
                return ActNormAffine.apply(x, loc, log_scale), logdet
            y = (x.to(ct) + loc) * torch.exp(log_scale)
            return y.to(x.dtype), logdet

    def _forward_masked(self, x: torch.Tensor, mask: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Real tokens normalised, padded ones unchanged; log-det ``(real tokens) · Σ_c log_scale_c``."""
        ct = compute_dtype(x)
        with no_autocast(x.device.type):
            loc, log_scale = self.loc.to(ct), self.log_scale.to(ct)
            logdet = mask.sum(1).to(logdet_dtype(x)) * log_scale.sum().to(logdet_dtype(x))
            xc = x.to(ct)
            y = xc * torch.exp(-log_scale) - loc if reverse else (xc + loc) * torch.exp(log_scale)
            y = torch.where(mask.unsqueeze(-1), y, xc)
            return y.to(x.dtype), -logdet if reverse else logdet


@contextlib.contextmanager
def _collecting(model: nn.Module) -> Iterator[list[ActNorm]]:
    norms = [m for m in model.modules() if isinstance(m, ActNorm)]
    for m in norms:
        m._collect_init = True
    try:
        yield norms
    finally:
        for m in norms:
            m._collect_init = False


@torch.no_grad()
def data_init(model: nn.Module, *args: Any, call: Callable[..., Any] | None = None, **kwargs: Any) -> int:
    """Initialise every not-yet-initialised ActNorm in ``model`` from one forward pass.

    Runs ``call(*args, **kwargs)`` (default ``model(*args, **kwargs)``) once without gradients. Must run
    on every rank with that rank's batch, before the model is wrapped by an engine. Returns the number of
    ActNorm layers initialised by this call (0 when all were already initialised, e.g. after loading).
    """
    with _collecting(model) as norms:
        before = sum(bool(m.initialized) for m in norms)
        (call or model)(*args, **kwargs)
        return sum(bool(m.initialized) for m in norms) - before
