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

from .base import (
    InvertibleModule,
    compute_dtype,
    current_mask,
    fused_path_ok,
    in_block_checkpoint,
    logdet_dtype,
    no_autocast,
)
from .gated_solve import solve_gated_upper
from .kernels import native, upper_attention_lse, upper_attention_lse_reference
from .kernels.attention import diag_log_softmax, upper_attention
from .kernels.ica_nodes import (  # noqa: F401  (re-exported: the layer's fast autograd nodes and their reference)
    GATE_MARGIN,
    ROW_BLOCK,
    GatedICACore,
    GatedUpperAttention,
    gated_upper_attention_reference,
)
from .lica import LUTokenMixer
from .partitions import PARTITIONS, partition_index

FORMS = ("gated", "paper")
#: forward attention path: ``fused`` = flipped causal SDPA for ``A x2`` + chunked diagonal log-probs
#: (:mod:`pipeline.flows.kernels.attention`, no n×n tensor kept for backward); ``plain`` = A materialised (the
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
        #: under bf16/fp16 autocast, run q/k/v and the attention in that dtype through one attention pass that
        #: also yields the log-det's diagonal (:meth:`_forward_lowp`); False = the fp32 attention (set by the plan)
        self.lowp_attention = True
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
        self.register_buffer(
            "mask_bias", torch.zeros(n, n).masked_fill_(self.below_diag, float("-inf")), persistent=False
        )

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

    def _lowp_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        """The autocast dtype when this forward runs its attention in low precision (:meth:`_forward_lowp`), else None."""
        dev = x.device.type
        if not (self.lowp_attention and torch.is_autocast_enabled(dev) and x.dtype != torch.float64):
            return None
        dt = torch.get_autocast_dtype(dev)
        return dt if dt in (torch.bfloat16, torch.float16) else None

    def _forward_lowp(self, x1: torch.Tensor, x2: torch.Tensor, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward ``(y2, logdet)`` with q, k, v and the attention in ``dt`` (bf16 tensor-core work on a GPU):
        one attention pass gives ``A x2`` and the row log-sum-exp; ``log a_ii = s_ii − lse_i`` and the log-det
        are fp32 (the update's residual add too, so y2 keeps x2's precision where α·A x2 is small)."""
        ct = compute_dtype(x1)
        q = self.norm_q(self.proj_q(x1))
        k = self.norm_k(self.proj_k(x1))
        with no_autocast(x1.device.type):
            qs = (q.to(ct) * self.log_temperature.to(ct).exp()).to(dt)
            kl = k.to(dt)
            attention = upper_attention_lse_reference if self.kernels == "reference" else upper_attention_lse
            ax, lse = attention(qs, kl, x2.to(dt))
            diag = (qs.to(ct) * kl.to(ct)).sum(-1) - lse.to(ct)  # log a_ii, from the same scores as A
            if self.form == "gated":
                alpha = self.gate(ct)
                return x2.to(ct) + alpha * ax.to(ct), torch.log1p(alpha * diag.exp().unsqueeze(-1)).sum(dim=(1, 2))
            return ax.to(ct), self.dim * diag.sum(dim=-1)

    def _fast_path(self, x: torch.Tensor, path_ok: bool | None = None) -> bool:
        """Whether the forward can be one :class:`GatedICACore` node: gated form, materialised attention, no
        autocast (bf16 projections take the composed path, as before) and ordinary parameters (DeepSpeed
        ZeRO-3 flags partitioned ones with ``ds_id`` and gathers them only inside each submodule's forward).
        ``path_ok``: :func:`~pipeline.flows.base.fused_path_ok` already evaluated by the caller for this input."""
        return (
            self.form == "gated"
            and self.attention == "plain"
            and self.kernels != "reference"
            and (fused_path_ok(x, self.proj_q.weight) if path_ok is None else path_ok)
        )

    def _node_tensors(self, norm=None) -> list[torch.Tensor]:
        """The node's weights (Wq, Wk, the two LayerNorms' affines, log τ, β, the mask; with ``norm`` the ActNorm's
        loc and log-scale), read from the module dicts: nn.Module.__getattr__ costs ~0.5 µs a lookup and the
        node needs a dozen per call. Anything else (a parametrisation, a swapped-in attribute) takes getattr."""
        try:
            mods, own = self._modules, self._parameters
            norm_q, norm_k = mods["norm_q"], mods["norm_k"]
            out = [mods["proj_q"]._parameters["weight"], mods["proj_k"]._parameters["weight"]]
            out += [norm_q._parameters["weight"], norm_q._parameters["bias"]]
            out += [norm_k._parameters["weight"], norm_k._parameters["bias"]]
            log_tau = own["log_temperature"] if "log_temperature" in own else self._buffers["log_temperature"]
            out += [log_tau, own["beta"], self._buffers["mask_bias"]]
            if norm is not None:
                out += [norm._parameters["loc"], norm._parameters["log_scale"]]
            if all(isinstance(t, torch.Tensor) for t in out):
                return out
        except KeyError:
            pass
        out = [self.proj_q.weight, self.proj_k.weight, self.norm_q.weight, self.norm_q.bias]
        out += [self.norm_k.weight, self.norm_k.bias, self.log_temperature, self.beta, self.mask_bias]
        return out + ([norm.loc, norm.log_scale] if norm is not None else [])

    def _core(self, z: torch.Tensor, gather, scatter, swap: bool, norm=None) -> tuple[torch.Tensor, torch.Tensor]:
        ct = z.dtype
        params = self._node_tensors(norm)
        if any(t.dtype != ct for t in params):  # a no-op .to() per tensor still costs a call: only when needed
            params = [t.to(ct) for t in params]
        loc, log_scale = (None, None) if norm is None else params[9:]
        return native.gated_ica_core(
            z,
            gather,
            scatter,
            swap,
            *params[:9],
            self.norm_q.eps,
            self.norm_k.eps,
            self.recompute_attention and not in_block_checkpoint(),
            self.row_block,
            loc,
            log_scale,
            allow_native=self.kernels == "auto",
        )

    def takes_norm(self, x: torch.Tensor, path_ok: bool | None = None) -> bool:
        """Whether :meth:`forward_normed` can fuse a preceding ActNorm into this layer's node for input ``x``:
        the fast path, x already in the compute dtype, and for LICA the C++ mixer node (the norm goes into its
        first node, before the token mixer). ``path_ok`` as in :meth:`_fast_path`."""
        return (
            x.dtype == compute_dtype(x)
            and self._fast_path(x, path_ok)
            and (self.partition != "lica" or (self.kernels == "auto" and native.load() is not None))
        )

    def forward_normed(self, x: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``self(norm(x))`` with the ActNorm inside this layer's first node (log-dets summed); only where
        :meth:`takes_norm`. Called by :class:`~pipeline.flows.MangoBlock` on validated input (no checks of its own)."""
        if self.partition == "lica":
            y, logdet = self._forward_fast(x, norm)
            return y, logdet + x.shape[1] * norm.log_scale.to(logdet.dtype).sum()
        if self.partition in ("mmca1", "mmca2"):
            y, logdet = self._core(x, None, None, self.partition == "mmca2", norm)
        else:
            y, logdet = self._core(x, self.gather, self.scatter, False, norm)
        return y, logdet.to(logdet_dtype(x))

    def _forward_fast(self, x: torch.Tensor, norm: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward through :class:`GatedICACore` (LICA: between the mixer and its inverse; ``norm``, LICA only: a
        preceding ActNorm fused into the mixer's node — its log-det is the caller's)."""
        ct = compute_dtype(x)
        xc = x.to(ct)
        if self.partition == "lica":  # W's output gather and W⁻¹'s input gather are the core's partition step
            m = self.mixer
            w, w_inv = m.operators(ct)
            loc, log_scale = (None, None) if norm is None else (norm.loc.to(ct), norm.log_scale.to(ct))
            cpp = self.kernels == "auto"
            zm = native.block_mix(xc, w, m.gather_in, m.scatter_in, None, None, loc, log_scale) if cpp else None
            if zm is None:  # no C++ node (norm is None here: takes_norm said no)
                zm = m.apply_blocks(xc.index_select(1, m.gather_in), w)
            z, logdet = self._core(zm, m.gather_out, m.scatter_out, False)
            y = native.block_mix(z, w_inv, None, None, m.scatter_in, m.gather_in) if cpp else None
            if y is None:
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
            if self.kernels == "reference":
                y2, a_diag = gated_upper_attention_reference(q, k, x2.to(ct), alpha, self.below_diag)
            else:
                y2, a_diag = GatedUpperAttention.apply(q, k, x2.to(ct), alpha, self.mask_bias.to(ct))
            return y2, torch.log1p(alpha * a_diag.unsqueeze(-1)).sum(dim=(1, 2))

    def _split_mask(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The padding mask (N, L) split like the tokens: ``(m1, m2)``, each (N, n)."""
        if self.partition == "mmca2":
            m2, m1 = mask.chunk(2, dim=1)
            return m1, m2
        z = mask if self.partition == "mmca1" else mask.index_select(1, self.gather)
        m1, m2 = z.chunk(2, dim=1)
        return m1, m2

    def _forward_masked(self, x: torch.Tensor, mask: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer under a padding mask (:func:`~pipeline.flows.base.token_mask`), composed, A materialised.

        Row i (x2's token i) is updated only when x2's token i is real; column j is attended to only when both
        x1's token j (its key) and x2's token j (its value) are real — and every row keeps its own diagonal, so
        a row never has an empty softmax. Padded rows of A are zero: ``I + αA`` (gated; ``A + diag(pad)`` in the
        paper form) is the identity on padded tokens and still upper triangular on the real ones, so the log-det
        is the real rows' ``Σ_c log(1 + α_c a_ii)`` (paper: ``D · Σ log a_ii``) and the inverse the same solve.
        """
        if self.partition == "lica":
            raise ValueError(
                "ICA: a padding mask cannot run through a lica partition (its token mixer mixes padded tokens into "
                "real ones); use partitions without lica (e.g. mmca+imca) with model.pad_mask"
            )
        ct = compute_dtype(x)
        x1, x2 = self.split(x)
        m1, m2 = self._split_mask(mask)
        q, k = self.queries_keys(x1)
        with no_autocast(x.device.type):
            n = q.shape[1]
            eye = torch.eye(n, dtype=torch.bool, device=x.device)
            allowed = ~self.below_diag & ((m1 & m2).unsqueeze(1) | eye)
            logp = torch.log_softmax((q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf")), dim=-1)
            real = m2.unsqueeze(-1).to(ct)  # (N, n, 1)
            attn = logp.exp() * real
            x2c = x2.to(ct)
            if self.form == "gated":
                alpha = self.gate(ct)
                logdet = torch.log1p(alpha * attn.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)).sum(dim=(1, 2))
                if reverse:
                    y2 = solve_gated_upper(attn, alpha, x2c, self.solve_block, allow_native=False)
                else:
                    y2 = x2c + alpha * (attn @ x2c)
            else:
                logdet = self.dim * (logp.diagonal(dim1=-2, dim2=-1) * real.squeeze(-1)).sum(dim=-1)
                attn = attn + torch.diag_embed(1.0 - real.squeeze(-1))
                y2 = torch.linalg.solve_triangular(attn, x2c, upper=True) if reverse else attn @ x2c
        y = self.merge(x1, y2.to(x.dtype))
        logdet = logdet.to(logdet_dtype(x))
        return y, -logdet if reverse else logdet

    def _forward(self, x: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        mask = current_mask(x)
        if mask is not None:
            return self._forward_masked(x, mask, reverse)
        if not reverse and self._fast_path(x):
            return self._forward_fast(x)
        ct = compute_dtype(x)
        ops = self.mixer.operators(ct) if self.partition == "lica" else None
        x1, x2 = self.split(x, ops)
        lowp = None if reverse else self._lowp_dtype(x)
        if lowp is not None:
            y2, logdet = self._forward_lowp(x1, x2, lowp)
            return self.merge(x1, y2.to(x.dtype), ops), logdet.to(logdet_dtype(x))
        fused = self.attention == "fused" and self.kernels != "reference"
        if not reverse and (fused or self.form == "gated"):
            fwd = self._forward_fused if fused else self._forward_plain_gated
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
                y2 = solve_gated_upper(attn, alpha, x2c, self.solve_block, allow_native=self.kernels == "auto")
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
