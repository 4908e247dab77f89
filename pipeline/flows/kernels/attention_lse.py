"""ICA's masked attention and its row log-sum-exp from one attention pass, differentiable in both outputs.

For q (pre-scaled), k (N, n, E) and v (N, n, E), with the upper-triangular mask ``j ≥ i``::

    s = q kᵀ (masked);  lse_i = logsumexp_j s_ij;  out = softmax(s) v

The ICA log-det needs ``log a_ii = s_ii − lse_i``. The attention kernels compute ``lse`` anyway (it is what
their backward recomputes the probabilities from) but return it without a gradient. This autograd Function
returns it *with* one, so the log-det's diagonal costs no second pass over ``q kᵀ`` (the chunked
:func:`~pipeline.flows.kernels.attention.diag_log_softmax` did one in the forward and one in the backward).

Backward. ``∂lse_i/∂s_ij = p_ij``, so the lse gradient adds ``g_lse_i · p_ij`` to dS. The flash backward computes
``dS = P ∘ (dO Vᵀ − D)`` with ``D_i = Σ_c dO_ic · O_ic`` taken from the ``out`` it is given; the lse term is
``P ∘ g_lse`` = the same formula with ``D_i − g_lse_i``. So the kernel's own backward does it: append one zero
column to v (and to q, k: the kernels want equal head sizes; zero columns change no score), and one column
to ``out`` holding ``−g_lse`` with a matching column of ones in ``dO``; the extra column of dV is dropped.
One flash backward, no extra pass over P.

The mask "j ≥ i" is a causal mask on the reversed token order, so everything runs on flipped tokens with
``is_causal=True`` (the kernels skip the masked half).

Kernels: the CPU flash kernel (``_scaled_dot_product_flash_attention_for_cpu``, bf16 and fp32/fp64), CUDA's
flash kernel (bf16/fp16, head size padded to a multiple of 8); elsewhere, or where the CUDA kernel refuses
the shapes, :func:`upper_attention_lse_reference` (materialised, the tested reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

aten = torch.ops.aten


def upper_attention_lse_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The composed definition: ``(softmax(s) v, logsumexp(s))`` with s = q kᵀ masked to j ≥ i (n×n materialised)."""
    n = q.shape[-2]
    s = q @ k.transpose(-1, -2)
    below = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)
    s = s.masked_fill(below, float("-inf")).to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return torch.softmax(s, dim=-1).to(v.dtype) @ v, torch.logsumexp(s, dim=-1)


def _padded_width(e: int, device: torch.device) -> int:
    """Head size with room for the one lse column: +1 on CPU, rounded up to a multiple of 8 on CUDA."""
    return e + 1 if device.type != "cuda" else -(-(e + 1) // 8) * 8


#: largest head size a device's flash kernel takes (CUDA flash: 256); wider inputs take the reference
_MAX_HEAD = {"cuda": 256}


def _kernel_supported(q: torch.Tensor) -> bool:
    if q.device.type == "cpu":
        return q.dtype in (torch.float32, torch.float64, torch.bfloat16)
    return q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16)


class _UpperAttentionLSE(torch.autograd.Function):
    """Runs on reversed tokens, heads of width ``w`` (> E, zero columns), see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v):
        e, ev = q.shape[-1], v.shape[-1]
        c = max(e, ev)  # the lse column: zero in q, k and v
        w = _padded_width(c, q.device)
        qf, kf, vf = (F.pad(t.flip(1), (0, w - t.shape[-1])).unsqueeze(1) for t in (q, k, v))  # (N, 1, n, w)
        if q.device.type == "cpu":
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(qf, kf, vf, 0.0, True, scale=1.0)
            ctx.cuda_rest = None
        else:
            out, lse, *rest = aten._scaled_dot_product_flash_attention(qf, kf, vf, 0.0, True, False, scale=1.0)
            ctx.cuda_rest = rest[:6]  # cum_seq_q, cum_seq_k, max_q, max_k, philox seed, offset
        ctx.widths = (e, ev, c)
        ctx.save_for_backward(qf, kf, vf, out, lse)
        return out[..., :ev].squeeze(1).flip(1), lse.squeeze(1).flip(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out, g_lse):
        qf, kf, vf, out, lse = ctx.saved_tensors
        e, ev, c = ctx.widths
        go = torch.zeros_like(out)
        if g_out is not None:
            go[..., :ev] = g_out.flip(1).unsqueeze(1)
        if g_lse is not None:  # D_i − g_lse_i through column c (v's column c is zero, so dS gains P·g_lse)
            out = out.clone()
            out[..., c] = -g_lse.flip(1).unsqueeze(1).to(out.dtype)
            go[..., c] = 1.0
        if ctx.cuda_rest is None:
            dq, dk, dv = aten._scaled_dot_product_flash_attention_for_cpu_backward(
                go, qf, kf, vf, out, lse, 0.0, True, scale=1.0
            )
        else:
            cum_q, cum_k, max_q, max_k, seed, offset = ctx.cuda_rest
            dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
                go, qf, kf, vf, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset, scale=1.0
            )
        return tuple(t[..., :width].squeeze(1).flip(1) for t, width in ((dq, e), (dk, e), (dv, ev)))


def upper_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: out (N, n, Ev) in v's dtype, lse (N, n) fp32 (fp64 for fp64 input), both with gradients.

    q (pre-scaled, no further scaling), k: (N, n, E); v: (N, n, Ev); one dtype. The kernels see all three
    zero-padded to one head size (zero columns change neither the scores nor the kept output columns).
    """
    if not (q.shape == k.shape and q.shape[:-1] == v.shape[:-1] and q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"upper_attention_lse: q, k must share shape, v its first two dims, all one dtype; got "
            f"{tuple(q.shape)} {q.dtype}, {tuple(k.shape)} {k.dtype}, {tuple(v.shape)} {v.dtype}"
        )
    if not _kernel_supported(q) or max(q.shape[-1], v.shape[-1]) + 1 > _MAX_HEAD.get(q.device.type, 1 << 30):
        return upper_attention_lse_reference(q, k, v)
    return _UpperAttentionLSE.apply(q, k, v)
