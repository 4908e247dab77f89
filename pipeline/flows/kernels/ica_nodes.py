"""The gated ICA's fast autograd nodes, each one node with a hand-written backward (used by
:class:`~pipeline.flows.ica.ICA`; the math is in that module's docstring).

- :class:`GatedUpperAttention` — the masked softmax and the gated update ``x2 + A (x2 ⊙ α)`` with ``diag(A)``;
- :class:`GatedICACore` — the whole gated layer (split, q/k projections and LayerNorms, row-blocked triangular
  attention, update, log-det terms, merge); with ``recompute`` it keeps only its input and rebuilds q, k and A
  in backward (``model.memory=checkpoint``);
- :func:`gated_upper_attention_reference` — the composed autograd form the tests hold the nodes to.

:class:`GatedICACore` also exists as a C++ node (``csrc/gated_ica_core.cpp``, :mod:`pipeline.flows.kernels.native`), which the
layer uses when it is built; this Python node is its tested reference and the fallback.
"""

from __future__ import annotations

import torch

from ..base import no_autocast

#: |α_c| ≤ 1 − GATE_MARGIN keeps every I + α_c A strictly diagonally dominant (a well-conditioned inverse)
GATE_MARGIN = 1e-4


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
    blocks = [
        torch.softmax(torch.baddbmm(bias[r0:r1, r0:], q[:, r0:r1], kn[:, r0:].transpose(-1, -2)), dim=-1)
        for r0, r1 in _row_blocks(q.shape[1], block)
    ]
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

        ``loc, log_scale`` fuse the ActNorm that precedes the layer in its block (``x = (x_in + loc)·exp(log_scale)``,
        log-det term ``L·Σ log_scale``): the node then saves the ActNorm's input and rebuilds its output in backward
        (one elementwise op), so the pair is one node instead of two (see :meth:`MangoBlock._forward`).

        ``recompute=True`` (``model.memory=checkpoint``) saves nothing else and rebuilds q, k and A inside the
        backward (two projections, two LayerNorms, one score matmul and a softmax — the only part of the layer
        whose activations are large) instead of saving the n×n attention and the q/k activations.
    """

    @staticmethod
    def forward(
        ctx,
        x,
        gather,
        scatter,
        swap,
        wq,
        wk,
        lnq_w,
        lnq_b,
        lnk_w,
        lnk_b,
        log_tau,
        beta,
        bias,
        eps_q,
        eps_k,
        recompute,
        block=ROW_BLOCK,
        loc=None,
        log_scale=None,
    ):
        x_in = x
        if loc is not None:  # the preceding ActNorm, fused: x = (x_in + loc)·exp(log_scale)
            x = (x_in + loc) * log_scale.exp()
        x1, x2 = _halves(x, gather, swap)
        pq, mq, rq, pk, mk, rk, tau, q, kn, a = _core_attention(
            x1, wq, wk, lnq_w, lnq_b, lnk_w, lnk_b, log_tau, bias, eps_q, eps_k, block
        )
        alpha = (1.0 - GATE_MARGIN) * torch.tanh(beta)
        xa = x2 * alpha
        rows = _row_blocks(x2.shape[1], block)
        y2 = _cat1([torch.baddbmm(x2[:, r0:r1], a_i, xa[:, r0:]) for (r0, r1), a_i in zip(rows, a)])
        diag = _cat1([a_i[:, :, : r1 - r0].diagonal(dim1=-2, dim2=-1) for (r0, r1), a_i in zip(rows, a)])
        logdet = torch.log1p(diag.unsqueeze(-1) * alpha).sum(dim=(1, 2))
        if loc is not None:
            logdet = logdet + x.shape[1] * log_scale.sum()
        out = torch.cat([y2, x1] if swap else [x1, y2], dim=1)  # the merge, in the same node
        out = out if scatter is None else out.index_select(1, scatter)
        # the mask and the permutations are buffers, not activations: held by reference, not saved
        ctx.eps, ctx.recompute, ctx.bias, ctx.swap, ctx.block = (eps_q, eps_k), recompute, bias, swap, block
        ctx.gather, ctx.scatter = gather, scatter
        ctx.norm = loc is not None
        params = (wq, wk, lnq_w, lnq_b, lnk_w, lnk_b, log_tau, beta) + ((loc, log_scale) if ctx.norm else ())
        if recompute:  # the layer's input only (the ActNorm's input when fused: its output is rebuilt)
            ctx.save_for_backward(x_in, *params)
        else:
            ctx.save_for_backward(x_in, *params, pq, mq, rq, pk, mk, rk, q, kn, *a)
        return out, logdet

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out, g_logdet):
        g_y1, g_y = _halves(g_out, ctx.gather, ctx.swap)
        wq, wk, lnq_w, lnq_b, lnk_w, lnk_b, log_tau, beta = ctx.saved_tensors[1:9]
        x, scale, x1, x2, (pq, mq, rq, pk, mk, rk, tau, q, kn, a) = _restored_activations(ctx)
        rows = _row_blocks(x2.shape[1], ctx.block)
        need = ctx.needs_input_grad
        dx2, dbeta, g_alpha, g_diag = _gate_backward(a, rows, g_y, g_logdet, x2, beta, need[11])
        dq, dkn = _softmax_backward(a, rows, g_alpha, g_diag, x2, q, kn)
        dlog_tau = (dq * q).sum().view_as(log_tau) if need[10] else None
        mask = [True, need[6] or need[7], need[6] or need[7]]
        e, d = wq.shape
        dpq, dlnq_w, dlnq_b = _layer_norm_backward(dq * tau, pq, (e,), mq, rq, lnq_w, lnq_b, mask)
        dpk, dlnk_w, dlnk_b = _layer_norm_backward(dkn, pk, (e,), mk, rk, lnk_w, lnk_b, mask)
        flat_x1 = x1.reshape(-1, d)
        dwq = dpq.reshape(-1, e).t() @ flat_x1 if need[4] else None
        dwk = dpk.reshape(-1, e).t() @ flat_x1 if need[5] else None
        dx = dloc = dlog_scale = None
        if need[0] or (ctx.norm and (need[17] or need[18])):
            dx1 = (dpq @ wq).add_(dpk @ wk).add_(g_y1)
            dx, dloc, dlog_scale = _input_backward(ctx, dx1, dx2, x, scale, g_logdet)
        return (
            dx,
            None,
            None,
            None,
            dwq,
            dwk,
            dlnq_w,
            dlnq_b,
            dlnk_w,
            dlnk_b,
            dlog_tau,
            dbeta,
            None,
            None,
            None,
            None,
            None,
            dloc,
            dlog_scale,
        )


def _restored_activations(ctx):
    """What :meth:`GatedICACore.backward` needs from the forward: ``(x, scale, x1, x2, attention)``.

    ``x`` is the layer's input (with a fused ActNorm: its output, rebuilt from the saved input, and ``scale`` =
    ``exp(log_scale)``, else None); ``attention`` is ``(pq, mq, rq, pk, mk, rk, tau, q, kn, a)`` as
    :func:`_core_attention` returns it — saved, or rebuilt from ``x1`` with ``recompute``.
    """
    saved = ctx.saved_tensors
    x, wq, wk, lnq_w, lnq_b, lnk_w, lnk_b, log_tau, beta = saved[:9]
    np_ = 11 if ctx.norm else 9
    scale = None
    if ctx.norm:
        loc, log_scale = saved[9:11]
        scale = log_scale.exp()
        x = (x + loc) * scale  # the fused ActNorm's output, rebuilt from its saved input
    x1, x2 = _halves(x, ctx.gather, ctx.swap)
    if ctx.recompute:
        attention = _core_attention(x1, wq, wk, lnq_w, lnq_b, lnk_w, lnk_b, log_tau, ctx.bias, *ctx.eps, ctx.block)
    else:
        pq, mq, rq, pk, mk, rk, q, kn = saved[np_ : np_ + 8]
        attention = (pq, mq, rq, pk, mk, rk, log_tau.exp(), q, kn, saved[np_ + 8 :])
    return x, scale, x1, x2, attention


def _gate_backward(a, rows, g_y, g_logdet, x2, beta, need_beta):
    """Back through ``y2 = x2 + A (x2 ⊙ α)`` and ``logdet = Σ log1p(α_c a_ii)``, with ``α = (1 − margin) tanh β``.

    Returns ``(dx2, dbeta, g_alpha, g_diag)``: the gradients of x2 and β (None unless ``need_beta``), and what
    A's entries receive — ``g_y ⊙ α`` (to be multiplied by x2ᵀ) and the log-det's term on the diagonal.
    """
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
    dbeta = dalpha * ((1.0 - GATE_MARGIN) * (1.0 - th * th)) if need_beta else None
    g_alpha, g_diag = g_y * alpha, (w * alpha).sum(dim=-1)
    return dx2, dbeta, g_alpha, g_diag


def _softmax_backward(a, rows, g_alpha, g_diag, x2, q, kn):
    """Back through A's row blocks ``softmax(bias + q knᵀ)``: ``(dq, dkn)`` from dA = g_alpha x2ᵀ (+ g_diag on
    the diagonal)."""
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
    return _cat1(dq), dkn


def _input_backward(ctx, dx1, dx2, x, scale, g_logdet):
    """``(dx, dloc, dlog_scale)``: the halves' gradients merged and put back in token order; with a fused ActNorm,
    carried through ``x = (x_in + loc)·s`` (the last two are None without one or when not needed)."""
    need = ctx.needs_input_grad
    dz = torch.cat([dx2, dx1] if ctx.swap else [dx1, dx2], dim=1)
    dx = dz if ctx.scatter is None else dz.index_select(1, ctx.scatter)
    dloc = dlog_scale = None
    if ctx.norm:  # through x = (x_in + loc)·s: ∂/∂x_in = s, ∂/∂loc = Σ s, ∂/∂log_s = Σ x (+ the log-det's L)
        dlog_scale = (dx * x).sum(dim=(0, 1)) + x.shape[1] * g_logdet.sum() if need[18] else None
        dx = dx * scale
        dloc = dx.sum(dim=(0, 1)) if need[17] else None
    return dx, dloc, dlog_scale


def _cat1(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _halves(x: torch.Tensor, gather: torch.Tensor | None, swap: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if gather is None:
        first, second = x.chunk(2, dim=1)
    else:  # each half gathered on its own: contiguous halves (gather + chunk left strided ones to copy)
        n = gather.shape[0] // 2
        first, second = x.index_select(1, gather[:n]), x.index_select(1, gather[n:])
    return (second, first) if swap else (first, second)


def gated_upper_attention_reference(q, k, x2, alpha, below_diag):
    """The composed (autograd) form of :class:`GatedUpperAttention`, kept as its tested reference."""
    a = torch.softmax((q @ k.transpose(-1, -2)).masked_fill(below_diag, float("-inf")), dim=-1)
    return x2 + alpha * (a @ x2), a.diagonal(dim1=-2, dim2=-1)
