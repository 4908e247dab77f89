"""Backprop by reconstruction (RevNet / i-RevNet style): activation memory that does not grow with depth.

Every MANGO block has an exact inverse, so the backward pass does not need the activations stored by the
forward: :class:`ReconstructBlocks` runs a stack of blocks forward *without* recording a graph and keeps
only the stack's output ``y`` (N, L, D). Its backward walks the blocks last to first; for block ``b`` with
output ``y_b`` and incoming gradients ``(g_y, g_logdet)``:

1. ``x_b = b⁻¹(y_b)`` — the exact inverse, no graph (``block(y_b, reverse=True)``);
2. recompute ``y_b', logdet_b = b(x_b)`` with a graph local to that one block;
3. ``torch.autograd.grad((y_b', logdet_b), (x_b, params_b), (g_y, g_logdet))`` gives ``g_x`` (the next
   ``g_y``) and the block's parameter gradients.

At any time only one block's local graph is alive, so the saved activations are O(one block), not
O(blocks). Cost: one inverse and one extra forward per block (the inverse solve is the expensive part).

Exactness: the gradients equal the stored-activation ones up to the reconstruction error of ``x_b``
(tested to 1e-6 relative in fp64). In fp32 the error of the inverse compounds over the blocks of one
level; under bf16 autocast (where the round trip is only ~1e-2 relative) prefer ``memory=checkpoint``.

Restrictions: autocast state is captured in forward and re-entered in backward (as torch's checkpoint
does). Under DeepSpeed ZeRO-3 the parameters handed to this Function are partitioned placeholders whose
gradients DeepSpeed reduces through its own hooks, so ``model.memory=invert`` with ``zero_stage=3`` is
refused in :mod:`pipeline.config`. Double backward is not supported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import inside_flow, logdet_dtype


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class ReconstructBlocks(torch.autograd.Function):
    """``(y, logdet) = blocks[-1](…blocks[0](x))`` whose backward rebuilds each block's input by inversion.

    Call through :func:`reconstruct_blocks`; ``params`` are every trainable parameter of ``blocks`` (so that
    autograd routes their gradients here), in the order of :func:`_block_params`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, blocks: Sequence[nn.Module], counts: Sequence[int], *params: torch.Tensor):
        ctx.blocks, ctx.counts = blocks, counts
        ctx.device_type = x.device.type
        ctx.autocast = _autocast_state(x.device.type)
        total = x.new_zeros(x.shape[0], dtype=logdet_dtype(x))
        with torch.no_grad(), inside_flow():
            for block in blocks:
                x, logdet = block(x)
                total = total + logdet
        ctx.save_for_backward(x)
        return x, total

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor, grad_logdet: torch.Tensor):
        (y,) = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        grads: list[torch.Tensor | None] = []  # per block, last block first
        offsets = [0]
        for c in ctx.counts:
            offsets.append(offsets[-1] + c)
        all_params = [p for b in ctx.blocks for p in _block_params(b)]
        for i in reversed(range(len(ctx.blocks))):
            block = ctx.blocks[i]
            params = all_params[offsets[i] : offsets[i + 1]]
            with inside_flow(), torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
                with torch.no_grad():
                    x, _ = block(y, reverse=True)
                x = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    y_re, logdet = block(x)
            outs, gouts = [y_re], [grad_y]
            if logdet.requires_grad:
                outs.append(logdet)
                gouts.append(grad_logdet.to(logdet.dtype))
            g = torch.autograd.grad(outs, [x, *params], gouts, allow_unused=True)
            grad_y = g[0]
            grads[:0] = list(g[1:])
            y = x.detach()
        return (grad_y, None, None, *grads)


def _block_params(block: nn.Module) -> list[torch.Tensor]:
    return [p for p in block.parameters() if p.requires_grad]


def reconstruct_blocks(blocks: Sequence[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``blocks`` on x (N, L, D) with backprop by reconstruction; returns ``(y, logdet (N,))``.

    Each block must keep the flow contract (``block(y, reverse=True)`` is its exact inverse).
    """
    per_block = [_block_params(b) for b in blocks]
    params = [p for ps in per_block for p in ps]
    return ReconstructBlocks.apply(x, list(blocks), [len(ps) for ps in per_block], *params)
