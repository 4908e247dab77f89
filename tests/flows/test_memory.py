"""Backprop by reconstruction (model.memory=invert) gives the stored-activation gradients and stores almost nothing."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.flows import MangoFlow, MultiscaleMangoFlow

from .checker import randomise_parameters

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/flows/conftest.py


def _grads(module, loss_fn, inputs):
    module.zero_grad(set_to_none=True)
    for t in inputs:
        t.grad = None
    loss_fn().backward()
    out = {n: p.grad.clone() for n, p in module.named_parameters()}
    out.update({f"input{i}": t.grad.clone() for i, t in enumerate(inputs)})
    return out


def _assert_rel_close(got: dict, want: dict, rtol: float) -> None:
    # Relative per tensor. LN_k's bias has an exactly-zero true gradient (a shift of every key by b adds
    # q_i·b to a whole score row, which the softmax ignores), so its reference is round-off; such tensors
    # are compared relative to the total gradient norm instead.
    assert got.keys() == want.keys()
    total = torch.sqrt(sum(w.pow(2).sum() for w in want.values()))
    for name in want:
        g, w = got[name], want[name]
        denom = max(w.norm(), 1e-6 * total)
        rel = ((g - w).norm() / denom).item()
        assert rel <= rtol, f"{name}: relative gradient error {rel:.2e} > {rtol:.0e} (|ref| {w.norm():.2e})"
    assert sum(w.norm() > 1e-6 * total for w in want.values()) > 0.8 * len(want), "most reference gradients vanish"


def _saved_bytes(fn) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(seen.values())


def test_invert_gradients_equal_stored_activation_gradients_across_blocks() -> None:
    tokens, dim = 16, 6
    ref = randomise_parameters(
        MangoFlow(dim, tokens, num_blocks=3, lica_group=4, learn_temperature=True), std=0.2
    ).double()
    inv = MangoFlow(dim, tokens, num_blocks=3, lica_group=4, learn_temperature=True, memory="invert").double()
    inv.load_state_dict(ref.state_dict())
    x = torch.randn(3, tokens, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    w = torch.randn(3, tokens, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def loss(flow):
        y, logdet = flow(x)
        return (w * y).sum() + 0.5 * y.pow(2).sum() - 0.7 * logdet.sum()

    g_ref, g_inv = _grads(ref, lambda: loss(ref), [x]), _grads(inv, lambda: loss(inv), [x])
    _assert_rel_close(g_inv, g_ref, 1e-6)
    with torch.no_grad():  # forward values are the same transform
        torch.testing.assert_close(inv(x)[0], ref(x)[0], atol=0, rtol=0)
    # only the output (and the loss's own tensors) are saved: far less than the stored graph
    assert _saved_bytes(lambda: loss(inv)) * 5 < _saved_bytes(lambda: loss(ref))


def test_invert_in_the_multiscale_flow_matches_store_and_stays_flat_in_depth() -> None:
    def flow(memory: str, blocks: int) -> MultiscaleMangoFlow:
        torch.manual_seed(0)
        f = MultiscaleMangoFlow(1, 8, 2, blocks, 8, patch_size=2, lica_group=4, memory=memory)
        return randomise_parameters(f, std=0.1).double()

    ref, inv = flow("store", 2), flow("invert", 2)
    a = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    g_ref = _grads(ref, lambda: -ref.log_prob(a, b).sum(), [a, b])
    g_inv = _grads(inv, lambda: -inv.log_prob(a, b).sum(), [a, b])
    _assert_rel_close(g_inv, g_ref, 1e-6)
    a_, b_ = a.detach(), b.detach()
    small = _saved_bytes(lambda: -flow("invert", 1).log_prob(a_, b_).sum())
    deep = _saved_bytes(lambda: -flow("invert", 6).log_prob(a_, b_).sum())
    assert deep <= 1.1 * small, (small, deep)


def test_invert_through_the_density_model_and_a_training_step() -> None:
    # the train loop's path: config → build_model (which maps model.memory onto the flow) → forward(batch, "loss")
    from pipeline.models import build_model

    tiny = [
        "model.image_size=8",
        "model.levels=2",
        "model.blocks_per_level=2",
        "model.dim=8",
        "model.lica_group=4",
        "model.channels=1",
    ]
    specs = [("rgb.png", (1, 8, 8), 8), ("right.png", (1, 8, 8), 8)]
    models = {}
    for memory in ("store", "invert"):
        torch.manual_seed(0)
        cfg = load_config(None, [*tiny, f"model.memory={memory}"])
        models[memory] = randomise_parameters(build_model(cfg, specs), std=0.1)
    assert all(f.memory == "invert" for f in models["invert"].flow.flows)
    batch = {
        "rgb.png": torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8),
        "right.png": torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8),
    }
    grads, losses = {}, {}
    for memory, model in models.items():
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        for step in range(2):
            torch.manual_seed(3 + step)  # same dequantisation noise
            opt.zero_grad()
            out = model(batch, mode="loss")
            out["loss"].backward()
            opt.step()
        grads[memory] = {n: p.grad for n, p in model.named_parameters()}
        losses[memory] = out["loss"].item()
    assert abs(losses["invert"] - losses["store"]) < 1e-5, losses
    for name, g in grads["store"].items():
        torch.testing.assert_close(grads["invert"][name], g, rtol=1e-4, atol=1e-6, msg=name)  # fp32, step 2


def test_invert_with_zero3_is_refused_before_launch() -> None:
    with pytest.raises(ConfigError, match=r"model.memory=invert.*deepspeed.zero_stage=3"):
        load_config(None, ["model.memory=invert", "deepspeed.zero_stage=3"])
    assert load_config(None, ["model.memory=invert", "deepspeed.zero_stage=2"]).model.memory == "invert"
