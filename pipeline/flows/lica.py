"""LICA's learned token mixer: an LU-parameterised invertible matrix over tokens.

``W = P_out · blockdiag_g((L_g + I)(U_g + diag(sign_g · exp(log_s_g)))) · P_in`` acts on the token axis of
``x`` (N, L, D), the same matrix for every channel. ``P_in`` gathers tokens into groups of ``G`` (the first
``G/2`` tokens of modality A's slice and the spatially matching ``G/2`` tokens of B, so every group mixes
both modalities); ``P_out`` is fixed so that at initialisation (``L = U = 0``, ``log_s = 0``) ``W`` is exactly
the imca1 partition permutation — LICA starts as IMCA. With ``G = L`` (``group=0``) this is the single full
``L × L`` LU matrix ``P · (L + I)(U + S)`` of the paper; a full W has ``L²`` parameters, so high-resolution
levels use token groups (``L · G`` parameters).

The inverse is two batched triangular solves and the inverse gathers — never ``torch.inverse``. The mixer
is always followed by its own inverse inside :class:`~pipeline.flows.ica.ICA`, so its log-det cancels and
is not computed. Arithmetic runs in fp32 (fp64 for fp64 input) even under autocast: the LU factors are
the buffers/parameters DeepSpeed's bf16 mode would otherwise truncate.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import compute_dtype, no_autocast
from .partitions import partition_index


class LUTokenMixer(nn.Module):
    """Invertible token mixer ``x -> W x`` on (N, L, D); ``group=0`` means one full L×L block."""

    def __init__(self, tokens: int, group: int = 0):
        super().__init__()
        g = tokens if group in (0, None) else int(group)
        if tokens % 2 or (tokens // 2) % 2:
            raise ValueError(f"LICA needs an even token count per modality (it starts as imca1); got tokens={tokens}")
        if g <= 0 or g % 2 or tokens % g:
            raise ValueError(f"LICA group size must be even and divide tokens={tokens}; got group={group}")
        self.tokens, self.group = tokens, g
        k, half, n = tokens // g, g // 2, tokens // 2
        self.lower = nn.Parameter(torch.zeros(k, g, g))
        self.upper = nn.Parameter(torch.zeros(k, g, g))
        self.log_s = nn.Parameter(torch.zeros(k, g))
        # Fixed parts are persistent buffers: they are part of the model (a consolidated checkpoint must
        # carry them) but are never trained.
        self.register_buffer("sign", torch.ones(k, g))
        a, b = torch.arange(n), torch.arange(n, tokens)
        gather_in = torch.cat(
            [torch.cat([a[i * half : (i + 1) * half], b[i * half : (i + 1) * half]]) for i in range(k)]
        )
        inv_in = torch.argsort(gather_in)
        gather_out = inv_in[partition_index("imca1", tokens)]
        self.register_buffer("gather_in", gather_in)
        self.register_buffer("gather_out", gather_out)
        self.register_buffer("scatter_in", inv_in, persistent=False)
        self.register_buffer("scatter_out", torch.argsort(gather_out), persistent=False)

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The unit-lower and upper triangular factors, each (K, G, G)."""
        eye = torch.eye(self.group, dtype=dtype, device=self.lower.device)
        low = torch.tril(self.lower.to(dtype), -1) + eye
        up = torch.triu(self.upper.to(dtype), 1) + torch.diag_embed(self.sign.to(dtype) * self.log_s.to(dtype).exp())
        return low, up

    def matrix(self) -> torch.Tensor:
        """The dense L×L matrix W (for tests and inspection; O(L²) memory)."""
        low, up = self.factors(torch.float64)
        blocks = torch.block_diag(*(low @ up))
        eye = torch.eye(self.tokens, dtype=torch.float64, device=blocks.device)
        return eye[self.gather_out] @ blocks @ eye[self.gather_in]

    def operators(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The group blocks of W and of W⁻¹, each (K, G, G), in ``dtype``.

        ``W⁻¹ = U⁻¹ L⁻¹`` comes from two triangular solves against the identity (K·G³ work, independent of
        the batch), so applying it is one batched matmul like W itself; :class:`~pipeline.flows.ica.ICA`
        builds both once per layer call for its split and merge.

        Without autograd (evaluation, sampling, serving) the pair is kept and reused until a factor changes:
        the key holds the factors' identities, storages and in-place version counters (an optimizer step,
        ``copy_`` or ``load_state_dict`` bumps them), the dtype and the device. With autograd, and for DeepSpeed
        ZeRO-3's partitioned parameters (``ds_id``: gathered into place without a version bump), it is rebuilt
        every call.
        """
        if torch.is_grad_enabled() or hasattr(self.lower, "ds_id"):
            self._cached_ops = None
            return self._operators(dtype)
        params = (self.lower, self.upper, self.log_s, self.sign)
        key = (dtype, self.lower.device, *((id(t), t.data_ptr(), t._version) for t in params))
        cached = getattr(self, "_cached_ops", None)
        if cached is None or cached[0] != key:
            cached = self._cached_ops = (key, self._operators(dtype))
        return cached[1]

    def _operators(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        with no_autocast(self.lower.device.type):
            low, up = self.factors(dtype)
            eye = torch.eye(self.group, dtype=dtype, device=low.device).expand_as(low)
            inv = torch.linalg.solve_triangular(low, eye, upper=False, unitriangular=True)
            return low @ up, torch.linalg.solve_triangular(up, inv, upper=True)

    def _blockwise(
        self, x: torch.Tensor, blocks: torch.Tensor, gather: torch.Tensor, scatter: torch.Tensor
    ) -> torch.Tensor:
        with no_autocast(x.device.type):
            return (
                self.apply_blocks(x.to(blocks.dtype).index_select(1, gather), blocks)
                .index_select(1, scatter)
                .to(x.dtype)
            )

    def apply_blocks(self, z: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """The block-diagonal part alone on tokens already in group order: (N, L, D) → (N, L, D), blocks (K, G, G).

        ``W x = apply_blocks(x[:, gather_in], w)[:, gather_out]``; :class:`~pipeline.flows.ica.ICA` folds the
        outer gathers into its own partition step.
        """
        n, length, d = z.shape
        return torch.einsum("kij,nkjd->nkid", blocks, z.view(n, blocks.shape[0], self.group, d)).reshape(n, length, d)

    def mix(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``W x`` for x (N, L, D), with ``w`` the first of :meth:`operators`."""
        return self._blockwise(x, w, self.gather_in, self.gather_out)

    def unmix(self, x: torch.Tensor, w_inv: torch.Tensor) -> torch.Tensor:
        """``W⁻¹ x`` for x (N, L, D), with ``w_inv`` the second of :meth:`operators`."""
        return self._blockwise(x, w_inv, self.scatter_out, self.scatter_in)

    def forward(self, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """``W x`` (or ``W⁻¹ x`` with ``reverse=True``) for x (N, L, D); returns x's dtype.

        The reverse direction here is the reference: two triangular solves on the data (the flow itself
        uses :meth:`operators` with :meth:`unmix`; the tests check that the two agree).
        """
        n, length, d = x.shape
        ct = compute_dtype(x)
        with no_autocast(x.device.type):
            low, up = self.factors(ct)
            k, g = low.shape[0], self.group
            if not reverse:
                return self.mix(x, low @ up)
            z = x.to(ct)[:, self.scatter_out].reshape(n, k, g, d).permute(1, 2, 0, 3).reshape(k, g, n * d)
            z = torch.linalg.solve_triangular(low, z, upper=False, unitriangular=True)
            z = torch.linalg.solve_triangular(up, z, upper=True)
            z = z.reshape(k, g, n, d).permute(2, 0, 1, 3).reshape(n, length, d)
            return z[:, self.scatter_in].to(x.dtype)
