"""Memory-lean ICA attention: ``A v`` without the n×n matrix, and the diagonal log-probabilities in O(n).

ICA's attention is the masked softmax ``A = softmax(s)``, ``s_ij = q_i · k_j`` (q already scaled by τ),
masked to ``j ≥ i`` (upper triangular). Two things of it are needed in the forward direction:

- ``A v`` (N, n, Dv). Reversing the token order turns "``j ≥ i``" into "``j' ≤ i'``", a causal mask, so
  :func:`upper_attention` is ``flip(SDPA(flip q, flip k, flip v, is_causal=True))``: fused kernels (flash /
  memory-efficient on CUDA, the flash CPU kernel on CPU), no (N, n, n) tensor saved for backward.
- ``logp_ii = s_ii − logsumexp_{j ≥ i} s_ij`` (N, n), for the log-det. The row log-sum-exp runs over all
  keys, so :func:`diag_log_softmax` computes it in row chunks (transient memory N·chunk·n, saved memory
  O(N·n·E)) and its backward recomputes each chunk's probabilities from the saved log-sum-exp — the
  FlashAttention trick for this one output.

The plain reference (materialise ``log_softmax(s)``) stays in :class:`~pipeline.flows.ica.ICA`; the tests
compare the two paths in values and gradients and gradcheck :func:`diag_log_softmax` in fp64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: rows of the score matrix materialised at a time by :func:`diag_log_softmax`
DIAG_CHUNK = 256


def upper_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q kᵀ masked to j ≥ i) @ v`` for q, k (N, n, E) (q pre-scaled, no further scaling) and v (N, n, Dv)."""
    flip = [1]
    out = F.scaled_dot_product_attention(
        q.flip(flip).unsqueeze(1), k.flip(flip).unsqueeze(1), v.flip(flip).unsqueeze(1), is_causal=True, scale=1.0
    )
    return out.squeeze(1).flip(flip)


def _chunks(n: int, chunk: int):
    for r0 in range(0, n, chunk):
        yield r0, min(n, r0 + chunk)


def _masked_scores(q: torch.Tensor, k: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Scores of rows [r0, r1) against keys [r0, n) (the keys left of r0 are masked for every such row)."""
    s = q[:, r0:r1] @ k[:, r0:].transpose(-1, -2)  # (N, c, n − r0)
    c = r1 - r0
    below = torch.ones(c, c, dtype=torch.bool, device=q.device).tril(-1)
    s[:, :, :c].masked_fill_(below, float("-inf"))
    return s


class _DiagLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, chunk: int) -> torch.Tensor:
        n = q.shape[1]
        lse = q.new_empty(q.shape[0], n)
        for r0, r1 in _chunks(n, chunk):
            lse[:, r0:r1] = torch.logsumexp(_masked_scores(q, k, r0, r1), dim=-1)
        ctx.chunk = chunk
        ctx.save_for_backward(q, k, lse)
        return (q * k).sum(-1) - lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        # d logp_ii = d s_ii − Σ_j p_ij d s_ij:  dq_i = g_i (k_i − Σ_j p_ij k_j),  dk_j = g_j q_j − Σ_i g_i p_ij q_i
        q, k, lse = ctx.saved_tensors
        dq, dk = grad.unsqueeze(-1) * k, grad.unsqueeze(-1) * q
        for r0, r1 in _chunks(q.shape[1], ctx.chunk):
            p = torch.exp(_masked_scores(q, k, r0, r1) - lse[:, r0:r1, None])  # masked entries → 0
            gp = grad[:, r0:r1, None] * p  # (N, c, n − r0)
            dq[:, r0:r1] -= gp @ k[:, r0:]
            dk[:, r0:] -= gp.transpose(-1, -2) @ q[:, r0:r1]
        return dq, dk, None


def diag_log_softmax(q: torch.Tensor, k: torch.Tensor, chunk: int = DIAG_CHUNK) -> torch.Tensor:
    """``diag(log_softmax(q kᵀ masked to j ≥ i))`` (N, n) for q, k (N, n, E), q pre-scaled; O(N·n·E) saved memory."""
    return _DiagLogSoftmax.apply(q, k, chunk)
