"""The fast paths of the flow layers equal their composed (autograd) references in values and gradients.

- :class:`~pipeline.flows.ica.GatedICACore`: the whole gated ICA update as one autograd node with a
  hand-written backward, in both save modes (store q/k/A, or rebuild them in backward: ``memory=checkpoint``);
- :class:`~pipeline.flows.ica.GatedUpperAttention`: the composed path's masked softmax + update node;
- LICA's explicit inverse blocks (:meth:`LUTokenMixer.operators` / ``unmix``) against the two triangular
  solves on the data;
- ``memory=checkpoint`` (attention rebuilt in backward, conditioner recomputed) against ``memory=store``.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.flows import ICA, LUTokenMixer, MangoBlock, MangoFlow, MultiscaleMangoFlow, native
from pipeline.flows.base import FlowSequence
from pipeline.flows.ica import GatedICACore, GatedUpperAttention, gated_upper_attention_reference

from .checker import check_flow, randomise_parameters

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/flows/conftest.py


def _composed(layer: ICA, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's forward written with plain autograd ops (the reference the fast node must equal)."""
    x1, x2 = layer.split(x)
    q, k = layer.queries_keys(x1)
    alpha = layer.gate(x.dtype)
    y2, diag = gated_upper_attention_reference(q, k, x2, alpha, layer.below_diag)
    return layer.merge(x1, y2), torch.log1p(alpha * diag.unsqueeze(-1)).sum(dim=(1, 2))


CASES = {
    "mmca1": dict(partition="mmca1"),
    "mmca2-learned-tau-qk5": dict(partition="mmca2", learn_temperature=True, qk_dim=5),
    "imca3": dict(partition="imca3"),
    "lica-grouped": dict(partition="lica", lica_group=4),
}


@pytest.mark.parametrize("row_block", [64, 3], ids=["one-block", "row-blocks-of-3"])
@pytest.mark.parametrize("recompute", [False, True], ids=["store", "recompute"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_core_equals_composed_reference(case: str, recompute: bool, row_block: int) -> None:
    layer = randomise_parameters(ICA(6, 20, attention="plain", **CASES[case]), std=0.3).double()
    layer.recompute_attention, layer.row_block = recompute, row_block  # 10 rows per half: 4 ragged blocks of 3
    x = torch.randn(3, 20, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    w = torch.randn(3, 20, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    outs = {}
    for name, fn in (("fast", layer), ("reference", lambda z: _composed(layer, z))):
        y, logdet = fn(x)
        grads = torch.autograd.grad((w * y).sum() - 0.7 * logdet.sum(), [x, *layer.parameters()])
        outs[name] = (y, logdet, grads)
    torch.testing.assert_close(outs["fast"][0], outs["reference"][0], atol=1e-12, rtol=0)
    torch.testing.assert_close(outs["fast"][1], outs["reference"][1], atol=1e-11, rtol=1e-12)
    names = ["input"] + [n for n, _ in layer.named_parameters()]
    assert len(outs["fast"][2]) == len(names)
    for name, a, b in zip(names, outs["fast"][2], outs["reference"][2]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=name)
    check_flow(layer, x.detach()[:2], jacobian=True)


def test_gradcheck_fast_nodes_in_fp64() -> None:
    gen = torch.Generator().manual_seed(4)

    def r(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).mul_(0.5).requires_grad_()

    n, d, e = 6, 4, 3
    bias = torch.zeros(n, n, dtype=torch.float64).masked_fill_(
        torch.ones(n, n, dtype=torch.bool).tril(-1), float("-inf")
    )
    gather = torch.randperm(2 * n, generator=gen)
    for recompute, swap, index, block in ((False, False, None, 64), (True, True, None, 4), (False, False, gather, 2)):
        args = (r(2, 2 * n, d), r(e, d), r(e, d), r(e), r(e), r(e), r(e), r(()), r(d))
        perm = (index, None if index is None else torch.argsort(index), swap)
        assert torch.autograd.gradcheck(
            lambda x, *p: GatedICACore.apply(x, *perm, *p, bias, 1e-5, 1e-5, recompute, block), args
        )
    # with the preceding ActNorm fused in (loc, log_scale), stored and recomputed
    for recompute, index in ((False, None), (True, gather)):
        args = (r(2, 2 * n, d), r(e, d), r(e, d), r(e), r(e), r(e), r(e), r(()), r(d), r(d), r(d))
        perm = (index, None if index is None else torch.argsort(index), False)
        assert torch.autograd.gradcheck(
            lambda x, *p: GatedICACore.apply(x, *perm, *p[:8], bias, 1e-5, 1e-5, recompute, 3, *p[8:]), args
        )
    q, k, v, alpha = r(2, n, e), r(2, n, e), r(2, n, d), r(d)
    assert torch.autograd.gradcheck(lambda *a: GatedUpperAttention.apply(*a, bias), (q, k, v, alpha))


@pytest.mark.parametrize("recompute", [False, True], ids=["store", "recompute"])
def test_block_fusing_actnorm_into_ica_equals_the_layer_by_layer_forward(recompute: bool) -> None:
    block = randomise_parameters(MangoBlock(6, 16, lica_group=4), std=0.3).double()
    for m in block.modules():
        if isinstance(m, ICA):
            m.recompute_attention = recompute
    x = torch.randn(3, 16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
    w = torch.randn(3, 16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    outs = {}
    for name, fn in (("fused", block), ("layer by layer", lambda z: FlowSequence._forward(block, z, False))):
        y, logdet = fn(x)
        nodes = _graph_node_names(y)
        outs[name] = (y, logdet, torch.autograd.grad((w * y).sum() - 0.7 * logdet.sum(), [x, *block.parameters()]))
        # 8 ActNorm → ICA pairs: fused, none is a node of its own (the two before LICA go into the C++ mixer node,
        # or stay separate without it); layer by layer, all 8
        separate = 0 if native.load() is not None else 2
        assert nodes.count("ActNormAffineBackward") == (separate if name == "fused" else 8), nodes
        assert sum("GatedICACore" in n for n in nodes) == 8
    torch.testing.assert_close(outs["fused"][0], outs["layer by layer"][0], atol=1e-12, rtol=0)
    torch.testing.assert_close(outs["fused"][1], outs["layer by layer"][1], atol=1e-11, rtol=1e-12)
    names = ["input"] + [n for n, _ in block.named_parameters()]
    for name, a, b in zip(names, outs["fused"][2], outs["layer by layer"][2]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=name)


def _graph_node_names(t: torch.Tensor) -> list[str]:
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(fn.name())
        stack.extend(f for f, _ in fn.next_functions)
    return names


def test_composed_path_under_autocast_still_used_and_close() -> None:
    # under bf16 autocast the layer takes the composed path (projections in bf16), as before
    layer = randomise_parameters(ICA(8, 16, "imca1", attention="plain"), std=0.2)
    x = torch.randn(2, 16, 8)
    with torch.no_grad():
        y, logdet = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yb, lb = layer(x)
    assert lb.dtype == torch.float32 and yb.dtype == torch.float32
    torch.testing.assert_close(yb, y, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("group", [0, 4])
def test_lica_explicit_inverse_equals_triangular_solves(group: int) -> None:
    mixer = randomise_parameters(LUTokenMixer(16, group), std=0.3).double()
    x = torch.randn(3, 16, 5, dtype=torch.float64, requires_grad=True)
    w, w_inv = mixer.operators(torch.float64)
    torch.testing.assert_close(mixer.mix(x, w), mixer(x), atol=1e-13, rtol=0)
    torch.testing.assert_close(mixer.unmix(x, w_inv), mixer(x, reverse=True), atol=1e-12, rtol=0)
    torch.testing.assert_close(mixer.unmix(mixer.mix(x, w), w_inv), x, atol=1e-12, rtol=0)
    g = torch.randn(3, 16, 5, dtype=torch.float64)
    fast = torch.autograd.grad((g * mixer.unmix(x, mixer.operators(torch.float64)[1])).sum(), [x, *mixer.parameters()])
    ref = torch.autograd.grad((g * mixer(x, reverse=True)).sum(), [x, *mixer.parameters()])
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_checkpoint_memory_equals_store_in_values_and_gradients() -> None:
    torch.manual_seed(0)
    store = randomise_parameters(MangoFlow(6, 16, num_blocks=2, lica_group=4, learn_temperature=True), std=0.2).double()
    ckpt = MangoFlow(6, 16, num_blocks=2, lica_group=4, learn_temperature=True, memory="checkpoint").double()
    ckpt.load_state_dict(store.state_dict())
    x = torch.randn(3, 16, 6, dtype=torch.float64, requires_grad=True)
    outs = {}
    for name, flow in (("store", store), ("checkpoint", ckpt)):
        y, logdet = flow(x)
        grads = torch.autograd.grad(0.5 * y.pow(2).sum() - logdet.sum(), [x, *flow.parameters()])
        outs[name] = (y, logdet, grads)
    torch.testing.assert_close(outs["checkpoint"][0], outs["store"][0], atol=0, rtol=0)
    torch.testing.assert_close(outs["checkpoint"][1], outs["store"][1], atol=0, rtol=0)
    for a, b in zip(outs["checkpoint"][2], outs["store"][2]):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


def test_checkpoint_saves_at_least_3x_fewer_activation_bytes_than_store() -> None:
    def saved(memory: str) -> int:
        torch.manual_seed(0)
        flow = randomise_parameters(
            MultiscaleMangoFlow(3, 16, 1, 2, 32, patch_size=2, lica_group=16, memory=memory), std=0.05
        )
        return _saved_activation_bytes(flow, *(torch.rand(2, 4, 3, 16, 16) - 0.5))

    assert saved("store") >= 3 * saved("checkpoint")


def _saved_activation_bytes(flow, a, b, autocast: bool = False) -> int:
    params = {p.untyped_storage().data_ptr() for p in flow.parameters()}
    params |= {t.untyped_storage().data_ptr() for t in flow.buffers()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
    ):
        loss = -flow.log_prob(a, b).mean()
    loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize("case", ["bf16-autocast", "sdpa-attention"])
def test_checkpoint_falls_back_to_per_block_where_layers_cannot_recompute(case: str) -> None:
    # bf16 autocast and the SDPA path store the ICA activations; checkpoint must still save memory there
    # (per-block recompute, layers' own recompute off inside it) and keep the gradients
    attention = "fused" if case == "sdpa-attention" else "plain"
    autocast = case == "bf16-autocast"
    flows = {}
    for memory in ("store", "checkpoint"):
        torch.manual_seed(0)
        flows[memory] = randomise_parameters(
            MultiscaleMangoFlow(3, 16, 1, 2, 32, patch_size=2, lica_group=16, memory=memory, attention=attention),
            std=0.05,
        )
    a, b = torch.rand(2, 4, 3, 16, 16) - 0.5
    saved = {m: _saved_activation_bytes(f, a, b, autocast) for m, f in flows.items()}
    assert saved["store"] >= 5 * saved["checkpoint"], saved  # torch's checkpoint hides the block internals
    grads = {m: [p.grad.clone() for p in f.parameters()] for m, f in flows.items()}
    for g_c, g_s in zip(grads["checkpoint"], grads["store"]):
        torch.testing.assert_close(g_c, g_s, rtol=1e-4, atol=1e-6)
