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
from .base import InvertibleModule, compute_dtype, in_block_checkpoint, logdet_dtype, no_autocast
from .lica import LUTokenMixer
from .partitions import PARTITIONS, partition_index

FORMS = ("gated", "paper")
#: forward attention path: ``fused`` = flipped causal SDPA for ``A x2`` + chunked diagonal log-probs
#: (:mod:`pipeline.flows.attention`, no n×n tensor kept for backward); ``plain`` = A materialised (the
#: :class:`GatedICACore` node; the composed reference path under autocast or ZeRO-3); ``auto`` = fused from
#: ``FUSED_MIN_TOKENS`` tokens per half up: there the training step (forward + backward) measured faster on CPU
#: (benchmarks/scaling.py, against the composed plain path: 1.33x at n=1024, 1.79x at 4096, parity at 256) and
#: saves 2-6x activation memory; a no-grad forward alone is faster only at n of a few thousand. Against the
#: GatedICACore node (row-blocked A) the CPU picture changed: benchmarks/scaling.py, 1 thread, batch 4, D 64,
#: plain/fused training-step time 0.44 / 0.41 / 0.49 / 0.53 / 0.56 at n = 256 / 512 / 1024 / 2048 / 4096 (plain
#: faster everywhere) at 0.7 / 0.9 / 1.2 / 1.9 / 3.2x the fused path's saved bytes. The threshold is kept: it
#: sets the GPU recipe (mango_256, n = 4096 and 1024 fused), where SDPA's kernels were not re-measured.
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


class GatedUpperAttention(torch.autograd.Function):
    """``(y2, a_diag)`` of the gated ICA update with the masked softmax materialised once.

    Forward, for q (pre-scaled), k (N, n, E), x2 (N, n, D), α (D,) and the additive mask ``bias`` (n, n)
    (0 on and above the diagonal, −inf below)::

        A = softmax(bias + q kᵀ);  y2 = x2 + A (x2 ⊙ α);  a_diag = diag(A)

    (α scales channels and A mixes tokens, so ``α ⊙ (A x2) = A (x2 ⊙ α)`` and the residual add fuses into one
    ``baddbmm``.) Saves A, q, k, x2, α. The hand-written backward adds the diagonal's gradient onto dA in place
    (autograd would scatter it into a dense n×n zero tensor and add that), and A = 0 below the diagonal makes
    the softmax backward zero there, so the mask needs no backward pass of its own. The composed reference,
    :func:`gated_upper_attention_reference`, is what the tests compare it with (values and gradients).
    """

    @staticmethod
    def forward(ctx, q, k, x2, alpha, bias):
        a = torch.softmax(torch.baddbmm(bias, q, k.transpose(-1, -2)), dim=-1)
        y2 = torch.baddbmm(x2, a, x2 * alpha)
        ctx.save_for_backward(a, q, k, x2, alpha)
        return y2, a.diagonal(dim1=-2, dim2=-1).clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_y, g_diag):
        a, q, k, x2, alpha = ctx.saved_tensors
        need_q, need_k, need_x, need_alpha = ctx.needs_input_grad[:4]
        dq = dk = dx = dalpha = None
        if g_y is None:
            g_y = torch.zeros_like(x2)
        with no_autocast(a.device.type):  # the gradients stay in the compute dtype, like the forward
            if need_x or need_alpha:
                at_g = a.transpose(-1, -2) @ g_y  # Aᵀ g_y (N, n, D)
                if need_x:
                    dx = torch.addcmul(g_y, at_g, alpha)
                if need_alpha:
                    dalpha = (at_g * x2).sum(dim=(0, 1))
            if need_q or need_k:
                da = (g_y * alpha) @ x2.transpose(-1, -2)  # (N, n, n)
                if g_diag is not None:
                    da.diagonal(dim1=-2, dim2=-1).add_(g_diag)
                ds = torch._softmax_backward_data(da, a, -1, a.dtype)  # A ⊙ (dA − rowsum(dA ⊙ A)); 0 where masked
                if need_q:
                    dq = ds @ k
                if need_k:
                    dk = ds.transpose(-1, -2) @ q
        return dq, dk, dx, dalpha, None


_layer_norm_backward = torch.ops.aten.native_layer_norm_backward.default


#: query rows per block of the fused ICA node's attention: A is upper triangular, so row block [r0, r1) only
#: needs the key columns [r0, n) — with 4 blocks the n×n work (scores, softmax, the products with A) is 5/8 of
#: the dense matrix. Below 2 blocks' worth of tokens it is one dense block.
ROW_BLOCK = 64


def _row_blocks(n: int, block: int) -> list[tuple[int, int]]:
    return [(r0, min(n, r0 + block)) for r0 in range(0, n, block)]


def _core_attention(x1, wq, wk, lnq_w, lnq_b, lnk_w, lnk_b, log_tau, bias, eps_q, eps_k, block):
    """Queries, keys and A's row blocks of one gated ICA layer, with what their backward needs.

    A's row block ``[r0, r1)`` is ``softmax(bias[r0:r1, r0:] + q[r0:r1] k[r0:]ᵀ)`` (N, r1 − r0, n − r0): the
    columns left of r0 are masked for all its rows, so they are never formed (see :class:`GatedICACore`).
    """
    e = wq.shape[0]
    x1 = x1.contiguous()  # a half of x is a strided view: one copy here instead of one inside each matmul
    pq, pk = x1 @ wq.t(), x1 @ wk.t()
    qn, mq, rq = torch.native_layer_norm(pq, (e,), lnq_w, lnq_b, eps_q)
    kn, mk, rk = torch.native_layer_norm(pk, (e,), lnk_w, lnk_b, eps_k)
    tau = log_tau.exp()
    q = qn * tau
    blocks = [torch.softmax(torch.baddbmm(bias[r0:r1, r0:], q[:, r0:r1], kn[:, r0:].transpose(-1, -2)), dim=-1)
              for r0, r1 in _row_blocks(q.shape[1], block)]
    return pq, mq, rq, pk, mk, rk, tau, q, kn, blocks


class GatedICACore(torch.autograd.Function):
    """The whole gated ICA layer ``x → (y, logdet)`` (split, update, merge) as one autograd node.

    ``x`` (N, L, D) is the layer's input (or, for LICA, the mixed tokens ``W x``); ``z = x[:, gather]`` (all of
    ``x`` when ``gather`` is None) holds ``[x1 ; x2]``, or ``[x2 ; x1]`` with ``swap`` (mmca2); the output is
``[x1 ; y2]`` (``[y2 ; x1]``) put back in token order by ``scatter``. Same arithmetic
    as the composed path (``queries_keys`` → masked softmax → ``x2 + α (A x2)``, log-det
    ``Σ log(1 + α_c a_ii)``), with a hand-written backward: a MANGO layer is a few hundred tiny ops, and on
    small token grids the per-op cost of autograd's graph (one node per op, dense n×n zeros for the
    diagonal's gradient, a masked_fill backward) was most of the training step. It saves ``x`` itself (which
    the preceding ActNorm keeps anyway), never a gathered copy. The tests compare it with the composed
    reference in values and gradients (fp64) and gradcheck it.

    A is kept as row blocks of ``block`` query rows (:data:`ROW_BLOCK`), each only over the key columns it can
    see, which skips the masked lower-left part of every product with A.

    ``recompute=True`` (``model.memory=checkpoint``) saves nothing else and rebuilds q, k and A inside the
    backward (two projections, two LayerNorms, one score matmul and a softmax — the only part of the layer
    whose activations are large) instead of saving the n×n attention and the q/k activations.
    """

    @staticmethod
    def forward(ctx, x, gather, scatter, swap, wq, wk, lnq_w, lnq_b, lnk_w, lnk_b, log_tau, beta, bias,
                eps_q, eps_k, recompute, block=ROW_BLOCK):
        x1, x2 = _halves(x, gather, swap)
        pq, mq, rq, pk, mk, rk, tau, q, kn, a = _core_attention(x1, wq, wk, lnq_w, lnq_b, lnk_w, lnk_b, log_tau,
                                                                bias, eps_q, eps_k, block)
        alpha = (1.0 - GATE_MARGIN) * torch.tanh(beta)
        xa = x2 * alpha
        rows = _row_blocks(x2.shape[1], block)
        y2 = _cat1([torch.baddbmm(x2[:, r0:r1], a_i, xa[:, r0:]) for (r0, r1), a_i in zip(rows, a)])
        diag = _cat1([a_i[:, :, : r1 - r0].diagonal(dim1=-2, dim2=-1) for (r0, r1), a_i in zip(rows, a)])
        logdet = torch.log1p(diag.unsqueeze(-1) * alpha).sum(dim=(1, 2))
        out = torch.cat([y2, x1] if swap else [x1, y2], dim=1)  # the merge, in the same node
        out = out if scatter is None else out.index_select(1, scatter)
        # the mask and the permutations are buffers, not activations: held by reference, not saved
        ctx.eps, ctx.recompute, ctx.bias, ctx.swap, ctx.block = (eps_q, eps_k), recompute, bias, swap, block
        ctx.gather, ctx.scatter = gather, scatter
        params = (wq, wk, lnq_w, lnq_b, lnk_w, lnk_b, log_tau, beta)
        if recompute:
            ctx.save_for_backward(x, *params)
        else:
            ctx.save_for_backward(x, *params, pq, mq, rq, pk, mk, rk, q, kn, *a)
        return out, logdet

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out, g_logdet):
        g_y1, g_y = _halves(g_out, ctx.gather, ctx.swap)
        saved = ctx.saved_tensors
        x, wq, wk, lnq_w, lnq_b, lnk_w, lnk_b, log_tau, beta = saved[:9]
        x1, x2 = _halves(x, ctx.gather, ctx.swap)
        if ctx.recompute:
            pq, mq, rq, pk, mk, rk, tau, q, kn, a = _core_attention(x1, wq, wk, lnq_w, lnq_b, lnk_w, lnk_b, log_tau,
                                                                    ctx.bias, *ctx.eps, ctx.block)
        else:
            pq, mq, rq, pk, mk, rk, q, kn = saved[9:17]
            a = saved[17:]
            tau = log_tau.exp()
        rows = _row_blocks(x2.shape[1], ctx.block)
        need = ctx.needs_input_grad
        th = torch.tanh(beta)
        alpha = (1.0 - GATE_MARGIN) * th
        diag = _cat1([a_i[:, :, : r1 - r0].diagonal(dim1=-2, dim2=-1) for (r0, r1), a_i in zip(rows, a)])  # (N, n)
        # y2 = x2 + A (x2 ⊙ α);  Aᵀ g_y: block 0 spans every column, the others add onto columns [r0, n)
        at_g = a[0].transpose(-1, -2) @ g_y[:, : rows[0][1]]
        for (r0, r1), a_i in zip(rows[1:], a[1:]):
            at_g[:, r0:].baddbmm_(a_i.transpose(-1, -2), g_y[:, r0:r1])
        dx2 = torch.addcmul(g_y, at_g, alpha)
        # logdet = Σ log1p(α_c a_ii): ∂/∂a_ii = Σ_c α_c / (1 + α_c a_ii), ∂/∂α_c = Σ_i a_ii / (1 + α_c a_ii)
        w = g_logdet.view(-1, 1, 1) / (1.0 + diag.unsqueeze(-1) * alpha)  # (N, n, D)
        dalpha = (at_g * x2).sum(dim=(0, 1)) + (w * diag.unsqueeze(-1)).sum(dim=(0, 1))
        dbeta = dalpha * ((1.0 - GATE_MARGIN) * (1.0 - th * th)) if need[11] else None
        g_alpha, g_diag = g_y * alpha, (w * alpha).sum(dim=-1)
        dq, dkn = [], None
        for (r0, r1), a_i in zip(rows, a):
            da = g_alpha[:, r0:r1] @ x2[:, r0:].transpose(-1, -2)
            da[:, :, : r1 - r0].diagonal(dim1=-2, dim2=-1).add_(g_diag[:, r0:r1])
            ds = torch._softmax_backward_data(da, a_i, -1, a_i.dtype)  # zero below the diagonal (A = 0 there)
            dq.append(ds @ kn[:, r0:])
            if dkn is None:
                dkn = ds.transpose(-1, -2) @ q[:, r0:r1]
            else:
                dkn[:, r0:].baddbmm_(ds.transpose(-1, -2), q[:, r0:r1])
        dq = _cat1(dq)
        dlog_tau = (dq * q).sum().view_as(log_tau) if need[10] else None
        mask = [True, need[6] or need[7], need[6] or need[7]]
        e, d = wq.shape
        dpq, dlnq_w, dlnq_b = _layer_norm_backward(dq * tau, pq, (e,), mq, rq, lnq_w, lnq_b, mask)
        dpk, dlnk_w, dlnk_b = _layer_norm_backward(dkn, pk, (e,), mk, rk, lnk_w, lnk_b, mask)
        flat_x1 = x1.reshape(-1, d)
        dwq = dpq.reshape(-1, e).t() @ flat_x1 if need[4] else None
        dwk = dpk.reshape(-1, e).t() @ flat_x1 if need[5] else None
        dx = None
        if need[0]:
            dx1 = (dpq @ wq).add_(dpk @ wk).add_(g_y1)
            dz = torch.cat([dx2, dx1] if ctx.swap else [dx1, dx2], dim=1)
            dx = dz if ctx.scatter is None else dz.index_select(1, ctx.scatter)
        return (dx, None, None, None, dwq, dwk, dlnq_w, dlnq_b, dlnk_w, dlnk_b, dlog_tau, dbeta,
                None, None, None, None, None)


def _cat1(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _halves(x: torch.Tensor, gather: torch.Tensor | None, swap: bool) -> tuple[torch.Tensor, torch.Tensor]:
    z = x if gather is None else x.index_select(1, gather)
    first, second = z.chunk(2, dim=1)
    return (second, first) if swap else (first, second)


def gated_upper_attention_reference(q, k, x2, alpha, below_diag):
    """The composed (autograd) form of :class:`GatedUpperAttention`, kept as its tested reference."""
    a = torch.softmax((q @ k.transpose(-1, -2)).masked_fill(below_diag, float("-inf")), dim=-1)
    return x2 + alpha * (a @ x2), a.diagonal(dim1=-2, dim2=-1)


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
        #: rebuild q, k and A in the backward instead of saving them (set by ``MangoFlow(memory="checkpoint")``)
        self.recompute_attention = False
        #: query rows per block of the fused node's triangular attention (:data:`ROW_BLOCK`)
        self.row_block = ROW_BLOCK
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
        # additive form of the mask for the fused score matmul (baddbmm): 0 on/above the diagonal, −inf below
        self.register_buffer("mask_bias", torch.zeros(n, n).masked_fill_(self.below_diag, float("-inf")),
                             persistent=False)

    # -- partition ------------------------------------------------------------------------------------
    # mmca1 is the identity permutation and mmca2 swaps the halves: both are views (no gather); imca uses one
    # index_select each way (a quarter of advanced indexing's cost on small tensors). LICA's mixer factors and
    # their inverse are built once per layer call and shared by split and merge (``ops``).
    def split(self, x: torch.Tensor, ops=None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, L, D) → (x1, x2), each (N, L/2, D)."""
        if self.partition == "lica":
            z = self.mixer.mix(x, (ops or self.mixer.operators(compute_dtype(x)))[0])
        elif self.partition == "mmca1":
            z = x
        elif self.partition == "mmca2":
            x2, x1 = x.chunk(2, dim=1)
            return x1, x2
        else:
            z = x.index_select(1, self.gather)
        return z.chunk(2, dim=1)

    def merge(self, y1: torch.Tensor, y2: torch.Tensor, ops=None) -> torch.Tensor:
        """Exact inverse of :meth:`split`."""
        if self.partition == "mmca2":
            return torch.cat([y2, y1], dim=1)
        z = torch.cat([y1, y2], dim=1)
        if self.partition == "lica":
            return self.mixer.unmix(z, (ops or self.mixer.operators(compute_dtype(z)))[1])
        return z if self.partition == "mmca1" else z.index_select(1, self.scatter)

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
        with no_autocast(x1.device.type):
            return q.to(ct) * self.log_temperature.to(ct).exp(), k.to(ct)

    def log_attention(self, x1: torch.Tensor) -> torch.Tensor:
        """``logp`` (N, n, n) in the compute dtype: masked log-softmax of the scores (−inf below the diagonal)."""
        q, k = self.queries_keys(x1)
        with no_autocast(x1.device.type):
            s = (q @ k.transpose(-1, -2)).masked_fill_(self.below_diag, float("-inf"))
            return torch.log_softmax(s, dim=-1)

    def attention_matrix(self, x1: torch.Tensor) -> torch.Tensor:
        """``A`` (N, n, n) in the compute dtype: the masked softmax (one n×n pass fewer than ``exp(log_attention)``;
        the gated form needs only ``a_ii`` itself, never its log, so nothing underflows)."""
        q, k = self.queries_keys(x1)
        with no_autocast(x1.device.type):
            return torch.softmax((q @ k.transpose(-1, -2)).masked_fill_(self.below_diag, float("-inf")), dim=-1)

    def _forward_fused(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward ``(y2, logdet)`` without an n×n tensor: SDPA for ``A x2``, chunked ``logp_ii``."""
        q, k = self.queries_keys(x1)
        ct = compute_dtype(x1)
        with no_autocast(x1.device.type):
            x2c = x2.to(ct)
            diag = diag_log_softmax(q, k)  # (N, n)
            ax = upper_attention(q, k, x2c)
            if self.form == "gated":
                alpha = self.gate(ct)
                return x2c + alpha * ax, torch.log1p(alpha * diag.exp().unsqueeze(-1)).sum(dim=(1, 2))
            return ax, self.dim * diag.sum(dim=-1)

    def _fast_path(self, x: torch.Tensor) -> bool:
        """Whether the forward can be one :class:`GatedICACore` node: gated form, materialised attention, no
        autocast (bf16 projections take the composed path, as before) and ordinary parameters (DeepSpeed
        ZeRO-3 flags partitioned ones with ``ds_id`` and gathers them only inside each submodule's forward)."""
        return (self.form == "gated" and self.attention == "plain" and not torch.is_autocast_enabled(x.device.type)
                and not hasattr(self.proj_q.weight, "ds_id"))

    def _core(self, z: torch.Tensor, gather, scatter, swap: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ct = z.dtype
        return GatedICACore.apply(
            z, gather, scatter, swap, self.proj_q.weight.to(ct), self.proj_k.weight.to(ct),
            self.norm_q.weight.to(ct), self.norm_q.bias.to(ct), self.norm_k.weight.to(ct), self.norm_k.bias.to(ct),
            self.log_temperature.to(ct), self.beta.to(ct), self.mask_bias.to(ct), self.norm_q.eps, self.norm_k.eps,
            self.recompute_attention and not in_block_checkpoint(), self.row_block)

    def _forward_fast(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward through :class:`GatedICACore` (LICA: between the mixer and its inverse)."""
        ct = compute_dtype(x)
        xc = x.to(ct)
        if self.partition == "lica":  # W's output gather and W⁻¹'s input gather are the core's partition step
            m = self.mixer
            w, w_inv = m.operators(ct)
            z, logdet = self._core(m.apply_blocks(xc.index_select(1, m.gather_in), w), m.gather_out, m.scatter_out,
                                   False)
            y = m.apply_blocks(z, w_inv).index_select(1, m.scatter_in)
        elif self.partition in ("mmca1", "mmca2"):
            y, logdet = self._core(xc, None, None, self.partition == "mmca2")
        else:
            y, logdet = self._core(xc, self.gather, self.scatter, False)
        return y.to(x.dtype), logdet.to(logdet_dtype(x))

    def _forward_plain_gated(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Composed forward ``(y2, logdet)`` of the gated form with A materialised (autocast / ZeRO-3 path)."""
        ct = compute_dtype(x1)
        q, k = self.queries_keys(x1)
        with no_autocast(x1.device.type):
            alpha = self.gate(ct)
            y2, a_diag = GatedUpperAttention.apply(q, k, x2.to(ct), alpha, self.mask_bias.to(ct))
            return y2, torch.log1p(alpha * a_diag.unsqueeze(-1)).sum(dim=(1, 2))

    def _forward(self, x: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not reverse and self._fast_path(x):
            return self._forward_fast(x)
        ct = compute_dtype(x)
        ops = self.mixer.operators(ct) if self.partition == "lica" else None
        x1, x2 = self.split(x, ops)
        if not reverse and (self.attention == "fused" or self.form == "gated"):
            fwd = self._forward_fused if self.attention == "fused" else self._forward_plain_gated
            y2, logdet = fwd(x1, x2)
            return self.merge(x1, y2.to(x.dtype), ops), logdet.to(logdet_dtype(x))
        if self.form == "gated":
            attn = self.attention_matrix(x1)
        else:  # the paper form's log-det needs log a_ii, which exp(log_softmax) keeps exact for tiny a_ii
            logp = self.log_attention(x1)
        with no_autocast(x.device.type):
            x2c = x2.to(ct)
            if self.form == "gated":  # reverse: the blocked per-channel solve
                alpha = self.gate(ct)
                a_diag = attn.diagonal(dim1=-2, dim2=-1)  # (N, n) = a_ii
                logdet = torch.log1p(alpha * a_diag.unsqueeze(-1)).sum(dim=(1, 2))
                y2 = solve_gated_upper(attn, alpha, x2c, self.solve_block)
            else:
                attn = logp.exp()
                logdet = self.dim * logp.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
                if reverse:
                    y2 = torch.linalg.solve_triangular(attn, x2c, upper=True)
                else:
                    y2 = attn @ x2c
        y = self.merge(x1, y2.to(x.dtype), ops)
        logdet = logdet.to(logdet_dtype(x))
        return y, -logdet if reverse else logdet
