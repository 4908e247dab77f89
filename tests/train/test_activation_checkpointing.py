"""Activation checkpointing wraps each MANGO block: it recomputes in backward and leaves gradients unchanged."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.flows import MangoBlock, MultiscaleMangoFlow, data_init


def _flow(memory: str) -> MultiscaleMangoFlow:
    torch.manual_seed(0)
    return MultiscaleMangoFlow(3, 16, 2, 2, 16, patch_size=2, lica_group=0, memory=memory)


def _grads(flow: MultiscaleMangoFlow, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
    flow.zero_grad()
    (-flow.log_prob(a, b)).mean().backward()
    return {n: p.grad.clone() for n, p in flow.named_parameters()}


def test_checkpointing_recomputes_blocks_and_keeps_gradients() -> None:
    a, b = torch.rand(2, 4, 3, 16, 16) - 0.5
    store, ckpt = _flow("store"), _flow("checkpoint")
    data_init(store, a, b)
    ckpt.load_state_dict(store.state_dict())
    # warm-up step so every gate (α) and conditioner is non-zero and every parameter gets a gradient
    with torch.no_grad():
        for p_s, p_c in zip(store.parameters(), ckpt.parameters()):
            p_s.add_(0.05 * torch.randn_like(p_s))
            p_c.copy_(p_s)

    calls = {"store": 0, "checkpoint": 0}
    for name, flow in (("store", store), ("checkpoint", ckpt)):
        for m in flow.modules():
            if isinstance(m, MangoBlock):
                m.register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    g_store, g_ckpt = _grads(store, a, b), _grads(ckpt, a, b)
    blocks = 2 * 2
    assert calls == {"store": blocks, "checkpoint": 2 * blocks}, calls  # each block ran again in backward
    for n in g_store:
        torch.testing.assert_close(g_ckpt[n], g_store[n], rtol=1e-5, atol=1e-7, msg=n)

    def flops(flow: MultiscaleMangoFlow) -> int:
        with FlopCounterMode(display=False) as counter:
            (-flow.log_prob(a, b)).mean().backward()
        return counter.get_total_flops()

    f_store, f_ckpt = flops(store), flops(ckpt)
    assert f_ckpt > 1.2 * f_store, (f_store, f_ckpt)  # the recomputed forward shows up as extra FLOPs
