"""Conformance: every fast implementation of every flow layer against the layer's composed reference.

Two levels:

- the layer suite: each layer family in each configuration, run with the plan's ``kernels`` = ``auto`` (C++ nodes
  where they apply) and ``python`` (the Python autograd nodes), against ``reference`` (the composed definitions,
  differentiated by autograd): outputs, log-dets and every gradient (input and parameters, the log-det's
  included) in fp64; the reverse direction; ZeRO-3-style flagged parameters (``ds_id``: the nodes step aside);
  and under bf16 autocast against the fp32 reference within the stated tolerance;
- the kernel suite: the attention + log-sum-exp kernel against its composed reference.

``test_every_cpp_entry_point_is_covered`` fails when a C++ entry point is added without a case here.

Tolerances: fp64 is held to 1e-10 (the kernels are the same arithmetic reordered); bf16 (8-bit mantissa,
rounding unit 2⁻⁸ ≈ 3.9e-3) to 3e-2 relative on outputs and gradients, which is a few rounding units of the
inputs' magnitude after one matmul and one softmax.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pipeline.flops import DtypeFlopCounter
from pipeline.flows import ICA, ActNorm, AffineCoupling, ChannelMixer, MangoBlock, MangoFlow, native
from pipeline.flows.kernels import upper_attention_lse, upper_attention_lse_reference
from pipeline.flows.plan import ExecutionPlan, decide_memory

from .checker import randomise_parameters

KERNELS = {"attention_lse": (upper_attention_lse, upper_attention_lse_reference)}
BF16_RTOL = 3e-2


def _grads(fn, q, k, v, g_out, g_lse):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.double() * g_out).sum() + (lse.double() * g_lse).sum()
    return (out, lse, *torch.autograd.grad(loss, (q, k, v)))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("n,e,ev", [(1, 4, 4), (7, 5, 5), (64, 16, 24), (130, 32, 8)])
def test_kernel_matches_its_reference_in_fp64_values_lse_and_every_gradient(kernel, n, e, ev) -> None:
    fast, ref = KERNELS[kernel]
    gen = torch.Generator().manual_seed(n)
    q, k = (torch.randn(3, n, e, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(3, n, ev, generator=gen, dtype=torch.float64)
    g_out, g_lse = (
        torch.randn(3, n, ev, generator=gen, dtype=torch.float64),
        torch.randn(3, n, generator=gen, dtype=torch.float64),
    )
    for got, want in zip(_grads(fast, q, k, v, g_out, g_lse), _grads(ref, q, k, v, g_out, g_lse)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernel_passes_gradcheck_through_both_outputs(kernel) -> None:
    fast, _ = KERNELS[kernel]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: fast(q, k, v), (q, k, v))


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernel_in_bf16_stays_within_the_stated_tolerance_of_the_fp64_reference(kernel) -> None:
    fast, ref = KERNELS[kernel]
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 96, 32, generator=gen, dtype=torch.float64) for _ in range(3))
    g_out, g_lse = (
        torch.randn(2, 96, 32, generator=gen, dtype=torch.float64),
        torch.randn(2, 96, generator=gen, dtype=torch.float64),
    )
    got = _grads(fast, *(t.bfloat16() for t in (q, k, v)), g_out, g_lse)
    want = _grads(ref, q, k, v, g_out, g_lse)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32  # out in bf16, lse in fp32
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert _rel(a, b) < BF16_RTOL, f"{name}: relative error {_rel(a, b):.3e}"


def _ica(partition: str, form: str, tokens: int = 24, dim: int = 8, qk_dim: int | None = None) -> ICA:
    layer = ICA(dim, tokens, partition, form=form, qk_dim=qk_dim, lica_group=0)
    return randomise_parameters(layer, std=0.3)


@pytest.mark.parametrize("form", ["gated", "paper"])
@pytest.mark.parametrize("partition,qk_dim", [("mmca1", None), ("imca2", None), ("lica", None), ("mmca2", 12)])
def test_ica_under_bf16_autocast_tracks_its_fp32_definition(partition, form, qk_dim) -> None:
    layer = _ica(partition, form, qk_dim=qk_dim)
    x = torch.randn(3, 24, 8, generator=torch.Generator().manual_seed(2))

    def run(autocast: bool):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, logdet = layer(xx)
        (y.square().mean() + logdet.sum()).backward()
        grads = [xx.grad] + [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad(set_to_none=True)
        return y, logdet, grads

    y32, ld32, g32 = run(False)
    y16, ld16, g16 = run(True)
    assert y16.dtype == torch.float32 and ld16.dtype == torch.float32
    assert _rel(y16, y32) < BF16_RTOL
    assert (ld16 - ld32).abs().max() < BF16_RTOL * ld32.abs().max().clamp_min(1.0)
    # all gradients as one vector (some are exactly 0 in fp32 — k's LayerNorm bias shifts a whole score row,
    # which softmax ignores — so a per-tensor relative error would divide bf16 noise by zero)
    g16, g32 = torch.cat([g.flatten() for g in g16]), torch.cat([g.flatten() for g in g32])
    assert ((g16 - g32).norm() / g32.norm()).item() < BF16_RTOL


def test_the_bf16_ica_runs_its_attention_in_bf16_with_no_second_score_pass() -> None:
    layer = _ica("imca1", "gated", tokens=64, dim=16)
    x = torch.randn(2, 64, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), DtypeFlopCounter() as c:
        y, logdet = layer(x.requires_grad_())
        (y.sum() + logdet.sum()).backward()
    fp32_ops = {op for (op, dt) in c.by_op if dt == torch.float32}
    assert not fp32_ops, f"fp32 matmul/attention work left in the bf16 ICA: {fp32_ops}"
    attention = {op for (op, dt) in c.by_op if "scaled_dot_product" in op}
    assert attention == {
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention_for_cpu_backward",
    }  # one pass each way
    # the plan can switch it back to the fp32 attention (the baseline of benchmarks/flops_dtype.py)
    layer.lowp_attention = False
    with torch.autocast("cpu", dtype=torch.bfloat16), DtypeFlopCounter() as c32:
        layer(x)[0].sum().backward()
    assert c32.share(torch.float32) > 0.5


def _flag_as_gathered_zero3(p: torch.nn.Parameter) -> None:
    """What a ZeRO-3 parameter looks like inside its module's forward: ``ds_id`` (partitioned by DeepSpeed) and
    status AVAILABLE (gathered). The status matters once any ZeRO-3 engine has run in the process: DeepSpeed then
    leaves its own ``F.linear`` in place, which reads it."""
    p.ds_id = 0
    p.ds_status = SimpleNamespace(name="AVAILABLE")


def test_the_bf16_path_works_with_zero3_style_gathered_parameters() -> None:
    # ZeRO-3 flags its partitioned parameters with ds_id (gathered inside each submodule's forward): the fp32
    # fused nodes step aside, the bf16 path must run and give the same numbers
    block = randomise_parameters(MangoBlock(8, 16), std=0.1)
    x = torch.randn(2, 16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, ld_ref = block(x)
    for p in block.parameters():
        _flag_as_gathered_zero3(p)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ld = block(x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(ld, ld_ref)


def test_the_plan_decides_memory_once_and_maps_the_deepspeed_switch_onto_it() -> None:
    assert decide_memory("store", False) == "store"
    assert decide_memory("store", True) == "checkpoint"  # deepspeed.activation_checkpointing keeps working
    assert decide_memory("invert", True) == "invert"  # an explicit model.memory wins
    flow = MangoFlow(8, 16, num_blocks=2)
    ExecutionPlan(precision="bf16", memory="checkpoint", lowp_attention=False).apply(flow)
    assert flow.memory == "checkpoint"
    assert all(not m.lowp_attention for m in flow.modules() if isinstance(m, ICA))


def test_the_plan_names_the_implementation_of_every_layer_family() -> None:
    flow = MangoFlow(8, 16, num_blocks=2)
    line = ExecutionPlan(precision="bf16", device="cuda", memory="checkpoint", zero_stage=2).describe(flow)
    assert line.startswith("plan: bf16 autocast")
    assert "16× bf16 flash attention + lse" in line  # 2 blocks × 8 partitions
    assert "memory checkpoint (torch per-block checkpoint)" in line
    for family in ("ica:", "channel_mix:", "coupling:", "lica_mixer:"):
        assert family in line
    fp32 = ExecutionPlan(precision="fp32", native=False).describe(flow)
    assert "16× Python GatedICACore node" in fp32 and "bf16" not in fp32
    ref = ExecutionPlan(precision="fp32", kernels="reference").describe(flow)
    assert "kernels reference" in ref and "16× composed fp32 reference" in ref


# ---------------------------------------------------------------------------------------------------------------
# the layer suite

LAYERS = {
    "actnorm": lambda: ActNorm(6),
    "channel_mix": lambda: ChannelMixer(6),
    "coupling_k3": lambda: AffineCoupling(6, 8),
    "coupling_k1_swap": lambda: AffineCoupling(6, 8, swap=True, kernel_size=1),
    "ica_mmca1_gated": lambda: ICA(6, 16, "mmca1"),
    "ica_mmca2_gated": lambda: ICA(6, 16, "mmca2"),
    "ica_imca3_gated": lambda: ICA(6, 16, "imca3"),
    "ica_lica_gated": lambda: ICA(6, 16, "lica", lica_group=8),
    "ica_imca1_gated_fused": lambda: ICA(6, 16, "imca1", attention="fused"),
    "ica_mmca1_paper": lambda: ICA(6, 16, "mmca1", form="paper"),
    "block": lambda: MangoBlock(6, 16, lica_group=8),
    "flow_checkpoint": lambda: MangoFlow(6, 16, num_blocks=2, memory="checkpoint", lica_group=8),
}
#: C++ entry points (pipeline/flows/kernels/csrc) and the cases above that run them under kernels=auto
CPP_COVERAGE = {
    "gated_ica_core": "ica_*_gated, block, flow_checkpoint",
    "block_mix": "ica_lica_gated, block",
    "channel_mix": "channel_mix, block",
    "affine_coupling": "coupling_*, block",
    "gated_solve": "reverse of every gated ICA case",
    # its CPU kernels (_gated_logdet, _qk_layer_norm, …) are exported underscored for test_native.py only
}


def _layer(name: str, kernels: str, dtype=torch.float64):
    torch.manual_seed(0)
    layer = randomise_parameters(LAYERS[name](), std=0.2).to(dtype)
    ExecutionPlan(kernels=kernels).apply(layer)
    layer.kernels = kernels  # the plan sets it on every InvertibleModule inside; the top layer too
    return layer


#: autograd node names of the hand-written backwards (Python Functions and the C++ nodes)
CUSTOM_NODES = (
    "GatedICACore",
    "GatedUpperAttention",
    "ActNormAffine",
    "CppFunction",
    "_UpperAttentionLSE",
    "_DiagLogSoftmax",
)
#: the hand-written node each case must actually run, per kernels setting (None: that layer has no such node)
FAST_NODE = {
    "auto": {
        "actnorm": "ActNormAffineBackward",
        "channel_mix": "CppFunction",
        "coupling": "CppFunction",
        "ica_imca1_gated_fused": "_DiagLogSoftmaxBackward",
        "ica_mmca1_paper": None,
        "ica": "CppFunction",
        "block": "CppFunction",
        "flow": "CppFunction",
    },
    "python": {
        "actnorm": "ActNormAffineBackward",
        "channel_mix": None,
        "coupling": None,
        "ica_imca1_gated_fused": "_DiagLogSoftmaxBackward",
        "ica_mmca1_paper": None,
        "ica": "GatedICACoreBackward",
        "block": "GatedICACoreBackward",
        "flow": "GatedICACoreBackward",
    },
}


def _fast_node(name: str, kernels: str) -> str | None:
    table = FAST_NODE[kernels]
    return table.get(name, table[next(k for k in table if name.startswith(k))])


def graph_nodes(t: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    return names


def _forward_and_grads(layer, x, g, h, autocast: bool = False):
    xx = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, logdet = layer(xx)
    custom = {n for n in graph_nodes(y) | graph_nodes(logdet) if any(c in n for c in CUSTOM_NODES)}
    if layer.kernels == "reference":
        assert not custom, f"the reference path ran hand-written backwards: {custom}"
    ((y.double() * g).sum() + (logdet.double() * h).sum()).backward()
    grads = {"x": xx.grad} | {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)
    return y.detach(), logdet.detach(), grads


def _case_inputs(dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 6, generator=gen, dtype=torch.float64)
    return (
        x.to(dtype),
        torch.randn(2, 16, 6, generator=gen, dtype=torch.float64),
        torch.randn(2, generator=gen, dtype=torch.float64),
    )


@pytest.mark.parametrize("kernels", ["auto", "python"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_kernels_match_the_reference_in_fp64_forward_reverse_and_every_gradient(name, kernels) -> None:
    x, g, h = _case_inputs()
    fast, ref = _layer(name, kernels), _layer(name, "reference")
    y, ld, grads = _forward_and_grads(fast, x, g, h)
    y_ref, ld_ref, grads_ref = _forward_and_grads(ref, x, g, h)
    node = _fast_node(name, kernels)
    if node is not None:  # the implementation under test really ran
        y_fast, ld_fast = fast(x.clone().requires_grad_())
        assert node in graph_nodes(y_fast) | graph_nodes(ld_fast), f"{node} did not run"
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-10, atol=1e-10)
    assert grads.keys() == grads_ref.keys()
    for key in grads:
        torch.testing.assert_close(grads[key], grads_ref[key], rtol=1e-9, atol=1e-9, msg=f"gradient of {key}")
    with torch.no_grad():
        x_rev, ld_rev = fast(y, reverse=True)
        x_rev_ref, ld_rev_ref = ref(y, reverse=True)
    torch.testing.assert_close(x_rev, x_rev_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld_rev, ld_rev_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x_rev, x, rtol=1e-9, atol=1e-9)  # and it is the inverse


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_with_zero3_flagged_parameters_matches_the_reference(name) -> None:
    x, g, h = _case_inputs()
    fast, ref = _layer(name, "auto"), _layer(name, "reference")
    for p in fast.parameters():
        _flag_as_gathered_zero3(p)
    y, ld, grads = _forward_and_grads(fast, x, g, h)
    y_ref, ld_ref, grads_ref = _forward_and_grads(ref, x, g, h)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-10, atol=1e-10)
    for key in grads:
        torch.testing.assert_close(grads[key], grads_ref[key], rtol=1e-9, atol=1e-9, msg=f"gradient of {key}")


@pytest.mark.parametrize("kernels", ["auto", "reference"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_under_bf16_autocast_stays_within_tolerance_of_the_fp32_reference(name, kernels) -> None:
    x, g, h = _case_inputs(torch.float32)
    fast, ref = _layer(name, kernels, torch.float32), _layer(name, "reference", torch.float32)
    y, ld, grads = _forward_and_grads(fast, x, g, h, autocast=True)
    y_ref, ld_ref, grads_ref = _forward_and_grads(ref, x, g, h)
    assert y.dtype == torch.float32 and ld.dtype == torch.float32  # state and log-dets stay fp32
    assert _rel(y, y_ref) < BF16_RTOL
    assert (ld - ld_ref).abs().max() < BF16_RTOL * ld_ref.abs().max().clamp_min(1.0)
    flat, flat_ref = (torch.cat([v.flatten() for v in d.values()]) for d in (grads, grads_ref))
    assert ((flat - flat_ref).norm() / flat_ref.norm()).item() < 5e-2


def test_every_cpp_entry_point_is_covered() -> None:
    mod = native.load()
    if mod is None:
        pytest.fail(f"the C++ nodes did not build: {native._STATE.get('error')!r}")
    exported = {n for n in dir(mod) if not n.startswith("_")}
    assert exported == set(CPP_COVERAGE), f"C++ entry points without a conformance case: {exported - set(CPP_COVERAGE)}"
