"""One reusable checker for the flow contract (see ``pipeline.flows.base``); every layer, block and G pass it.

It randomises every parameter first: freshly built MANGO layers are the identity (zero-initialised gates
and conditioners), and an identity passes every invertibility check trivially.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def randomise_parameters(module: nn.Module, std: float = 0.2, seed: int = 0) -> nn.Module:
    """Draw every parameter i.i.d. N(0, std²) (deterministic in ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).mul_(std).to(p.dtype))
    return module


def jacobian_logdets(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """log|det J| per sample of ``fn`` (N, ...) → (N, ...), from the autograd Jacobian of the whole batch.

    Also asserts that samples do not interact (the off-diagonal sample blocks are zero): a flow's density
    is per sample, so one sample's output must not depend on another's input.
    """
    n = x.shape[0]
    per = x[0].numel()
    jac = torch.autograd.functional.jacobian(lambda z: fn(z.view_as(x)).reshape(-1), x.reshape(-1))
    jac = jac.view(n, per, n, per)
    out = []
    for i in range(n):
        for j in range(n):
            if i != j:
                assert jac[i, :, j].abs().max() == 0, f"sample {i}'s output depends on sample {j}'s input"
        out.append(torch.linalg.slogdet(jac[i, :, i])[1])
    return torch.stack(out)


def check_flow(
    module: nn.Module,
    x: torch.Tensor,
    *,
    roundtrip_tol: float | None = None,
    jacobian: bool = False,
    jacobian_tol: float = 1e-6,
) -> None:
    """Assert the flow contract on ``module`` for input ``x`` (N, L, D); parameters are used as they are."""
    tol = roundtrip_tol if roundtrip_tol is not None else (1e-10 if x.dtype == torch.float64 else 1e-5)
    with torch.no_grad():
        y, logdet = module(x)
        assert y.shape == x.shape and y.dtype == x.dtype, (
            f"shape/dtype changed: {x.shape}/{x.dtype} → {y.shape}/{y.dtype}"
        )
        assert logdet.shape == (x.shape[0],), f"log-det must be per sample (N,); got {tuple(logdet.shape)}"
        want = torch.float64 if x.dtype == torch.float64 else torch.float32
        assert logdet.dtype == want, f"log-det dtype {logdet.dtype}, want {want}"
        assert not torch.allclose(y, x), "randomised layer is still the identity: the checks would be vacuous"
        x_rev, logdet_rev = module(y, reverse=True)
        err = (x_rev - x).abs().max().item() / max(1.0, x.abs().max().item())
        assert err <= tol, f"round trip error {err:.3e} > {tol:.0e}"
        torch.testing.assert_close(logdet + logdet_rev, torch.zeros_like(logdet), atol=tol * 10, rtol=0)
    if jacobian:
        assert x.dtype == torch.float64, "Jacobian check needs fp64"
        expected = jacobian_logdets(lambda z: module(z)[0], x)
        torch.testing.assert_close(logdet, expected, atol=jacobian_tol, rtol=jacobian_tol)
