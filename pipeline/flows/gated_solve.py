"""The gated ICA's inverse: solve ``(I + α_c A) x[:, :, c] = y[:, :, c]`` for every channel (the math is in
:mod:`pipeline.flows.ica`); the C++ back-substitution takes it on the CPU without autograd."""

from __future__ import annotations

import torch

from .kernels import native


def solve_gated_upper(
    a: torch.Tensor, alpha: torch.Tensor, y: torch.Tensor, block: int = 64, allow_native: bool = True
) -> torch.Tensor:
    """Solve ``(I + α_c A) x[:, :, c] = y[:, :, c]`` for every channel c.

    a: (N, n, n) upper triangular; alpha: (D,); y: (N, n, D). Blocked back-substitution from the last row
    block up: the coupling to already-solved rows is one (N, b, rest) @ (N, rest, D) matmul shared by all
    channels; each b×b diagonal block is solved per channel as a batched triangular solve. Work O(n²D),
    extra memory O(N·D·b²).
    """
    n, d = a.shape[-1], y.shape[-1]
    if allow_native and not (torch.is_grad_enabled() and (a.requires_grad or alpha.requires_grad or y.requires_grad)):
        x = native.gated_solve(a, alpha, y)  # C++ back-substitution on the CPU (sampling, reconstruction)
        if x is not None:
            return x
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
