"""Invertible Cross-Attention (ICA), exact and O(n²D).

For x (N, L, D) split by a partition into x1, x2 (each N, n, D)::

    q = LN_q(x1 Wq), k = LN_k(x1 Wk)                  # single head; q/k width qk_dim (default D)
    s = q kᵀ · τ, masked to j ≥ i                      # upper triangular
    logp = log_softmax(s, -1);  A = exp(logp)          # a_ii ∈ (0, 1]
    gated (default):  y2[:, :, c] = x2[:, :, c] + α_c (A x2)[:, :, c],  α = (1 − 1e-4)·tanh(β), β = 0 at init
                      logdet = Σ_c Σ_i log(1 + α_c a_ii)
    paper form:       y2 = A x2,  logdet = D · Σ_i logp_ii
    y1 = x1

Why the gated form: ``x2 + A x2`` (the official code's "+I") and ``A x2`` are not the identity at init (A
averages tokens); with ``|α_c| < 1`` every ``I + α_c A`` is strictly row-diagonally dominant, so the inverse
solve is always well conditioned. The log-det factor is per channel (A acts on each of the D columns): the
official code's ``(L/2)·slogdet`` is right only when D = L/2. A is triangular, so the log-det is read off
``logp``'s diagonal in O(nD) and the inverse is a triangular solve — never ``slogdet``, ``pinv`` or
``inverse``. The gated inverse solves per channel with a blocked back-substitution: the off-diagonal work
is one shared matmul per block (BLAS3), only the b×b diagonal blocks are solved per channel.

Precision: q/k projections may run in bf16 under autocast (A is recomputed bit-identically from
``y1 == x1`` in the inverse); scores, softmax, the update, the solve and the log-det run in fp32 (fp64 for
fp64 input).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import diag_log_softmax, upper_attention
from .base import InvertibleModule, compute_dtype, logdet_dtype
from .lica import LUTokenMixer
from .partitions import PARTITIONS, partition_index

FORMS = ("gated", "paper")
#: forward attention path: ``fused`` = flipped causal SDPA for ``A x2`` + chunked diagonal log-probs
#: (:mod:`pipeline.flows.attention`, no n×n tensor kept for backward); ``plain`` = the materialised
#: reference; ``auto`` = fused from ``FUSED_MIN_TOKENS`` tokens per half up: there the training step
#: (forward + backward) measured faster on CPU (benchmarks/scaling.py: 1.33x at n=1024, 1.79x at 4096, parity
#: at 256) and saves 2-6x activation memory; a no-grad forward alone is faster only at n of a few thousand
ATTENTION = ("auto", "fused", "plain")
FUSED_MIN_TOKENS = 512
GATE_MARGIN = 1e-4


def solve_gated_upper(a: torch.Tensor, alpha: torch.Tensor, y: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Solve ``(I + α_c A) x[:, :, c] = y[:, :, c]`` for every channel c.

    a: (N, n, n) upper triangular; alpha: (D,); y: (N, n, D). Blocked back-substitution from the last row
    block up: the coupling to already-solved rows is one (N, b, rest) @ (N, rest, D) matmul shared by all
    channels; each b×b diagonal block is solved per channel as a batched triangular solve. Work O(n²D),
    extra memory O(N·D·b²).
    """
    n, d = a.shape[-1], y.shape[-1]
    # Without autograd, solved rows go straight into x and the per-channel diagonal blocks into one reused
    # buffer (building them dominated the solve). With autograd nothing may be written in place (the
    # matmuls save slices of x, the solves save their matrices), so blocks are collected and concatenated.
    reuse = not (torch.is_grad_enabled() and (a.requires_grad or alpha.requires_grad or y.requires_grad))
    size = min(block, n)
    x = torch.empty_like(y) if reuse else None
    buf = a.new_empty(a.shape[0], d, size, size) if reuse else None
    eye = torch.eye(size, dtype=a.dtype, device=a.device)
    solved: list[torch.Tensor] = []  # grad path: blocks from the bottom up
    for end in range(n, 0, -block):
        start = max(0, end - block)
        rhs = y[:, start:end]
        if end < n:
            tail = x[:, end:] if reuse else torch.cat(solved[::-1], dim=1)
            rhs = rhs - alpha * (a[:, start:end, end:] @ tail)
        b = end - start
        blk = a[:, None, start:end, start:end]
        if reuse:
            diag = torch.mul(alpha.view(1, d, 1, 1), blk, out=buf[:, :, :b, :b])  # (N, D, b, b)
            diag.diagonal(dim1=-2, dim2=-1).add_(1.0)
        else:
            diag = eye[:b, :b] + alpha.view(1, d, 1, 1) * blk
        sol = torch.linalg.solve_triangular(diag, rhs.transpose(1, 2).unsqueeze(-1), upper=True)
        sol = sol.squeeze(-1).transpose(1, 2)
        if reuse:
            x[:, start:end] = sol
        else:
            solved.append(sol)
    return x if reuse else torch.cat(solved[::-1], dim=1)


class ICA(InvertibleModule):
    """Invertible cross-attention on (N, tokens, dim) for one partition (see module docstring).

    Args:
        dim: token width D.
        tokens: L = 2n, both modalities' tokens ``[A ; B]``.
        partition: one of ``PARTITIONS``.
        form: ``"gated"`` (exact identity at init) or ``"paper"`` (``y2 = A x2``, for ablations).
        qk_dim: width of queries/keys (default D); τ = 1/√qk_dim.
        learn_temperature: make log τ a parameter initialised at log(1/√qk_dim).
        lica_group: LICA token-group size (0 = one full L×L mixer).
        solve_block: row-block size of the gated inverse solve.
        attention: forward attention path, one of ``ATTENTION`` (the inverse always uses the plain ``A``).
    """

    def __init__(
        self,
        dim: int,
        tokens: int,
        partition: str = "mmca1",
        *,
        form: str = "gated",
        qk_dim: int | None = None,
        learn_temperature: bool = False,
        lica_group: int = 0,
        solve_block: int = 64,
        attention: str = "auto",
    ):
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"ICA: unknown attention '{attention}'; use one of {list(ATTENTION)}")
        if partition not in PARTITIONS:
            raise ValueError(f"ICA: unknown partition '{partition}'; use one of {list(PARTITIONS)}")
        if form not in FORMS:
            raise ValueError(f"ICA: unknown form '{form}'; use one of {list(FORMS)}")
        if tokens % 2:
            raise ValueError(f"ICA: token count must be even ([A ; B], n each); got tokens={tokens}")
        self.dim, self.tokens, self.partition, self.form = dim, tokens, partition, form
        self.solve_block = solve_block
        self.attention = attention if attention != "auto" else ("fused" if tokens // 2 >= FUSED_MIN_TOKENS else "plain")
        qk_dim = qk_dim or dim
        self.proj_q = nn.Linear(dim, qk_dim, bias=False)
        self.proj_k = nn.Linear(dim, qk_dim, bias=False)
        self.norm_q = nn.LayerNorm(qk_dim)
        self.norm_k = nn.LayerNorm(qk_dim)
        log_tau = torch.tensor(-0.5 * math.log(qk_dim))
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_temperature", log_tau)
        if form == "gated":
            self.beta = nn.Parameter(torch.zeros(dim))  # α = tanh(β) = 0: exact identity at init
        if partition == "lica":
            self.mixer = LUTokenMixer(tokens, lica_group)
        else:
            index = partition_index(partition, tokens)
            self.register_buffer("gather", index, persistent=False)
            self.register_buffer("scatter", torch.argsort(index), persistent=False)
        n = tokens // 2
        self.register_buffer("below_diag", torch.ones(n, n, dtype=torch.bool).tril(-1), persistent=False)

    # -- partition ------------------------------------------------------------------------------------
    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, L, D) → (x1, x2), each (N, L/2, D)."""
        z = self.mixer(x) if self.partition == "lica" else x[:, self.gather]
        return z.chunk(2, dim=1)

    def merge(self, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        """Exact inverse of :meth:`split`."""
        z = torch.cat([y1, y2], dim=1)
        return self.mixer(z, reverse=True) if self.partition == "lica" else z[:, self.scatter]

    def gate(self, dtype: torch.dtype) -> torch.Tensor:
        """α = (1 − 1e-4)·tanh(β), (D,). The factor keeps |α| < 1 in floating point: plain tanh rounds to
        exactly ±1 in fp32 once |β| ≳ 9, and α = −1 with a_nn = 1 would make I + αA singular (log-det −inf)."""
        return (1.0 - GATE_MARGIN) * torch.tanh(self.beta.to(dtype))

    # -- attention ------------------------------------------------------------------------------------
    def queries_keys(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q·τ, k)``, each (N, n, qk_dim) in the compute dtype (projections may run under autocast)."""
        q = self.norm_q(self.proj_q(x1))
        k = self.norm_k(self.proj_k(x1))
        ct = compute_dtype(x1)
        with torch.autocast(x1.device.type, enabled=False):
            return q.to(ct) * self.log_temperature.to(ct).exp(), k.to(ct)

    def log_attention(self, x1: torch.Tensor) -> torch.Tensor:
        """``logp`` (N, n, n) in the compute dtype: masked log-softmax of the scores (−inf below the diagonal)."""
        q, k = self.queries_keys(x1)
        with torch.autocast(x1.device.type, enabled=False):
            s = (q @ k.transpose(-1, -2)).masked_fill_(self.below_diag, float("-inf"))
            return torch.log_softmax(s, dim=-1)

    def attention_matrix(self, x1: torch.Tensor) -> torch.Tensor:
        """``A`` (N, n, n) in the compute dtype: the masked softmax (one n×n pass fewer than ``exp(log_attention)``;
        the gated form needs only ``a_ii`` itself, never its log, so nothing underflows)."""
        q, k = self.queries_keys(x1)
        with torch.autocast(x1.device.type, enabled=False):
            return torch.softmax((q @ k.transpose(-1, -2)).masked_fill_(self.below_diag, float("-inf")), dim=-1)

    def _forward_fused(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward ``(y2, logdet)`` without an n×n tensor: SDPA for ``A x2``, chunked ``logp_ii``."""
        q, k = self.queries_keys(x1)
        ct = compute_dtype(x1)
        with torch.autocast(x1.device.type, enabled=False):
            x2c = x2.to(ct)
            diag = diag_log_softmax(q, k)  # (N, n)
            ax = upper_attention(q, k, x2c)
            if self.form == "gated":
                alpha = self.gate(ct)
                return x2c + alpha * ax, torch.log1p(alpha * diag.exp().unsqueeze(-1)).sum(dim=(1, 2))
            return ax, self.dim * diag.sum(dim=-1)

    def _forward(self, x: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = self.split(x)
        if not reverse and self.attention == "fused":
            y2, logdet = self._forward_fused(x1, x2)
            return self.merge(x1, y2.to(x.dtype)), logdet.to(logdet_dtype(x))
        ct = compute_dtype(x)
        if self.form == "gated":
            attn = self.attention_matrix(x1)
        else:  # the paper form's log-det needs log a_ii, which exp(log_softmax) keeps exact for tiny a_ii
            logp = self.log_attention(x1)
        with torch.autocast(x.device.type, enabled=False):
            x2c = x2.to(ct)
            if self.form == "gated":
                alpha = self.gate(ct)
                a_diag = attn.diagonal(dim1=-2, dim2=-1)  # (N, n) = a_ii
                logdet = torch.log1p(alpha * a_diag.unsqueeze(-1)).sum(dim=(1, 2))
                if reverse:
                    y2 = solve_gated_upper(attn, alpha, x2c, self.solve_block)
                else:
                    y2 = x2c + alpha * (attn @ x2c)
            else:
                attn = logp.exp()
                logdet = self.dim * logp.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
                if reverse:
                    y2 = torch.linalg.solve_triangular(attn, x2c, upper=True)
                else:
                    y2 = attn @ x2c
        y = self.merge(x1, y2.to(x.dtype))
        logdet = logdet.to(logdet_dtype(x))
        return y, -logdet if reverse else logdet
