"""The C++ ICA node (pipeline/flows/native.py) equals the Python node, and a failed build falls back clearly."""

from __future__ import annotations

import pytest
import torch

from pipeline.flows import ICA, AffineCoupling, ChannelMixer, LUTokenMixer, MangoBlock, native
from pipeline.flows.kernels.ica_nodes import GatedICACore

from .checker import randomise_parameters

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/flows/conftest.py


@pytest.fixture(scope="module")
def cpp():
    mod = native.load()
    if mod is None:  # the suite must exercise the node it ships: a broken build is a failure here, not a skip
        pytest.fail(f"the C++ ICA node did not build: {native._STATE.get('error')!r}")
    return mod


def _args(gen: torch.Generator, n: int, d: int, e: int, norm: bool):
    def r(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen).mul_(0.5).requires_grad_()

    return [r(3, 2 * n, d), r(e, d), r(e, d), r(e), r(e), r(e), r(e), r(()), r(d)], (
        [r(d), r(d)] if norm else [None, None]
    )


# (recompute, swap, gathered, row block, fused ActNorm)
CASES = [
    (False, False, False, 64, False),
    (True, True, False, 3, True),
    (False, False, True, 4, True),
    (True, False, True, 64, False),
    (False, True, False, 4, False),
]


@pytest.mark.parametrize("recompute, swap, gathered, block, norm", CASES)
def test_cpp_node_equals_the_python_node_in_values_and_gradients(cpp, recompute, swap, gathered, block, norm) -> None:
    gen = torch.Generator().manual_seed(0)
    n, d, e = 10, 6, 5
    bias = torch.zeros(n, n, dtype=torch.float64).masked_fill_(
        torch.ones(n, n, dtype=torch.bool).tril(-1), float("-inf")
    )
    index = torch.randperm(2 * n, generator=gen) if gathered else None
    perm = (index, None if index is None else torch.argsort(index), swap)
    args, extra = _args(gen, n, d, e, norm)
    inputs = args + [t for t in extra if t is not None]
    w = torch.randn(3, 2 * n, d, dtype=torch.float64, generator=gen)
    outs = []
    for fn in (GatedICACore.apply, cpp.gated_ica_core):
        y, logdet = fn(args[0], *perm, *args[1:], bias, 1e-5, 1e-5, recompute, block, *extra)
        outs.append((y, logdet, torch.autograd.grad((w * y).sum() - 0.7 * logdet.sum(), inputs)))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-13, rtol=0)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-12, rtol=0)
    for a, b in zip(outs[1][2], outs[0][2]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # and the C++ node's own gradients are right (not only equal to the Python ones)
    assert torch.autograd.gradcheck(
        lambda x, *p: cpp.gated_ica_core(
            x, *perm, *p[:8], bias, 1e-5, 1e-5, recompute, block, *(p[8:] if norm else (None, None))
        )[0].sum(),
        tuple(inputs),
    )


@pytest.mark.parametrize("swap, gathered, norm", [(False, True, True), (True, False, True), (False, False, False)])
def test_cpp_node_on_its_aten_path_equals_the_python_node(cpp, swap, gathered, norm) -> None:
    """bf16 tensors take the node's ATen branch (the one CUDA runs): same values and gradients as the Python node in
    bf16, up to bf16 rounding, and both near the fp64 result."""
    gen = torch.Generator().manual_seed(1)
    n, d, e = 8, 6, 5
    bias = torch.zeros(n, n, dtype=torch.float64).masked_fill_(
        torch.ones(n, n, dtype=torch.bool).tril(-1), float("-inf")
    )
    index = torch.randperm(2 * n, generator=gen) if gathered else None
    perm = (index, None if index is None else torch.argsort(index), swap)
    args, extra = _args(gen, n, d, e, norm)
    w = torch.randn(3, 2 * n, d, dtype=torch.float64, generator=gen)
    results = {}
    for name, fn, dt in (
        ("truth", GatedICACore.apply, torch.float64),
        ("python", GatedICACore.apply, torch.bfloat16),
        ("cpp", cpp.gated_ica_core, torch.bfloat16),
    ):
        a = [t.detach().to(dt).requires_grad_() for t in args]
        x = [t.detach().to(dt).requires_grad_() if t is not None else None for t in extra]
        y, logdet = fn(a[0], *perm, *a[1:], bias.to(dt), 1e-5, 1e-5, False, 64, *x)
        inputs = a + [t for t in x if t is not None]
        grads = torch.autograd.grad((w.to(dt) * y).sum() - 0.7 * logdet.sum(), inputs)
        results[name] = [y, logdet, *grads]
    for got, py, truth in zip(results["cpp"], results["python"], results["truth"]):
        scale = max(truth.abs().max().item(), 1.0)  # floored: some gradients are sums that cancel to ~0
        assert (got.double() - truth).abs().max().item() <= 0.15 * scale  # bf16 level (the Python node's is the same)
        assert (got.double() - py.double()).abs().max().item() <= 0.02 * scale


def test_cpp_node_only_computes_gradients_that_are_asked_for(cpp) -> None:
    gen = torch.Generator().manual_seed(1)
    n, d, e = 6, 4, 3
    bias = torch.zeros(n, n, dtype=torch.float64).masked_fill_(
        torch.ones(n, n, dtype=torch.bool).tril(-1), float("-inf")
    )
    args, extra = _args(gen, n, d, e, True)
    x = args[0].detach()  # the flow's first layer: data needs no gradient
    y, logdet = cpp.gated_ica_core(x, None, None, False, *args[1:], bias, 1e-5, 1e-5, False, 64, *extra)
    (y.sum() + logdet.sum()).backward()
    assert x.grad is None and all(t.grad is not None for t in args[1:] + extra)


@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_a_block_runs_the_selected_ica_node(cpp, monkeypatch, backend: str) -> None:
    monkeypatch.setenv("MANGO_NATIVE", "1" if backend == "cpp" else "0")
    block = randomise_parameters(MangoBlock(6, 16, lica_group=4), std=0.3)
    y, _ = block(torch.randn(2, 16, 6))
    names, seen, stack = [], set(), [y.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            names.append(fn.name())
            stack.extend(f for f, _ in fn.next_functions)
    cpp_nodes = sum("GatedICACoreNative" in n for n in names)
    py_nodes = names.count("GatedICACoreBackward")
    assert (cpp_nodes, py_nodes) == ((8, 0) if backend == "cpp" else (0, 8)), names


def test_a_failed_build_warns_once_and_falls_back_to_the_python_node(tmp_path, monkeypatch) -> None:
    broken = tmp_path / "broken.cpp"
    broken.write_text("#error this source is deliberately broken\n")
    monkeypatch.setattr(native, "_SOURCE", broken)
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("MANGO_NATIVE", "1")
    layer = randomise_parameters(ICA(4, 8, "imca1", attention="plain"), std=0.3)
    x = torch.randn(2, 8, 4)
    with pytest.warns(RuntimeWarning, match=r"C\+\+ ICA node could not be built .*using the Python node"):
        y, logdet = layer(x)
    assert y.grad_fn.name() == "GatedICACoreBackward"  # the Python node did the work
    assert native.load() is None and "error" in native._STATE  # remembered: no second build, no second warning
    monkeypatch.setenv("MANGO_NATIVE", "0")
    y0, logdet0 = layer(x)
    torch.testing.assert_close(y, y0, atol=0, rtol=0)
    torch.testing.assert_close(logdet, logdet0, atol=0, rtol=0)


@pytest.mark.parametrize(
    "machine, capability, vector_build",
    [("x86_64", "AVX512", True), ("x86_64", "AVX2", True), ("x86_64", "DEFAULT", False), ("aarch64", "SVE256", False)],
)
def test_the_build_targets_avx2_only_where_aten_runs_avx2(monkeypatch, machine, capability, vector_build) -> None:
    monkeypatch.setattr(native.platform, "machine", lambda: machine)
    monkeypatch.setattr(native.torch.backends.cpu, "get_cpu_capability", lambda: capability)
    name, flags = native.build_target()
    assert ("-mavx2" in flags and "-mfma" in flags) == vector_build
    assert name.endswith("_avx2") == vector_build  # its own cache entry: never loaded on a CPU without AVX2
    assert "-O3" in flags and not any(f.startswith("-march") for f in flags)


def _without_native(layer, x):
    """``layer(x)`` on the Python / module path (what the C++ nodes must equal)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MANGO_NATIVE", "0")
        return layer(x)


@pytest.mark.parametrize("swap", [False, True], ids=["plain", "swap"])
@pytest.mark.parametrize("recompute", [False, True], ids=["store", "recompute"])
@pytest.mark.parametrize("dim, kernel", [(6, 3), (7, 5), (5, 1)])
def test_cpp_coupling_equals_the_module_path_in_values_and_gradients(cpp, swap, recompute, dim, kernel) -> None:
    layer = randomise_parameters(AffineCoupling(dim, 8, swap=swap, kernel_size=kernel), std=0.4).double()
    layer.recompute_conditioner = recompute
    x = torch.randn(3, 9, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(7), requires_grad=True)
    w = torch.randn(3, 9, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    outs = {}
    for name, fn in (("cpp", layer), ("modules", lambda z: _without_native(layer, z))):
        y, logdet = fn(x)
        outs[name] = (
            y,
            logdet,
            torch.autograd.grad((w * y).sum() - 0.7 * logdet.sum(), [x, *layer.parameters()]),
            y.grad_fn.name(),
        )
    assert "AffineCouplingNative" in outs["cpp"][3] and "AffineCouplingNative" not in outs["modules"][3]
    torch.testing.assert_close(outs["cpp"][0], outs["modules"][0], atol=1e-12, rtol=0)
    torch.testing.assert_close(outs["cpp"][1], outs["modules"][1], atol=1e-11, rtol=0)
    names = ["input"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, outs["cpp"][2], outs["modules"][2]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=name)
    params = list(layer.parameters())

    def through_node(z, *ps):
        conv0, norm0, act0, conv1, norm1, _, conv2 = layer.net
        return cpp.affine_coupling(
            z, *ps, swap, layer.cond_dim, layer.scale_bound, norm0.eps, norm1.eps, act0.approximate, recompute
        )

    assert torch.autograd.gradcheck(
        lambda z, *ps: through_node(z, *ps)[0].sum() + through_node(z, *ps)[1].sum(),
        (x.detach()[:1].requires_grad_(), *[p.detach().requires_grad_() for p in params]),
    )


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "fused-actnorm"])
def test_cpp_block_mix_equals_the_lica_mixer_in_values_and_gradients(cpp, norm: bool) -> None:
    mixer = randomise_parameters(LUTokenMixer(16, 4), std=0.3).double()
    x = torch.randn(3, 16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9), requires_grad=True)
    loc, log_scale = (torch.randn(5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(3, 16, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(10))

    def both_ways(use_cpp: bool) -> torch.Tensor:
        xn = (x + loc) * log_scale.exp() if norm and not use_cpp else x
        ops = mixer.operators(torch.float64)
        if use_cpp:
            mixed = native.block_mix(
                x, ops[0], mixer.gather_in, mixer.scatter_in, None, None, *((loc, log_scale) if norm else (None, None))
            )
            mixed = mixed.index_select(1, mixer.gather_out)
            return (
                native.block_mix(
                    mixed.index_select(1, mixer.scatter_out), ops[1], None, None, mixer.scatter_in, mixer.gather_in
                )
                + mixed
            )
        mixed = mixer.mix(xn, ops[0])
        return mixer.unmix(mixed, ops[1]) + mixed

    inputs = [x, *mixer.parameters()] + ([loc, log_scale] if norm else [])
    outs = []
    for use_cpp in (True, False):
        y = both_ways(use_cpp)
        outs.append((y, torch.autograd.grad((w * y).sum(), inputs)))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-12, rtol=0)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    wb = mixer.operators(torch.float64)[0].detach().requires_grad_()
    args = (x.detach()[:1].requires_grad_(), wb)
    assert torch.autograd.gradcheck(lambda z, m: native.block_mix(z, m, mixer.gather_in, mixer.scatter_in), args)
    assert torch.autograd.gradcheck(
        lambda z, m: native.block_mix(z, m, None, None, mixer.scatter_in, mixer.gather_in), args
    )


def test_cpp_channel_mixer_equals_the_python_path_with_either_sign(cpp) -> None:
    mixer = randomise_parameters(ChannelMixer(5)).double()
    mixer.sign.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0], dtype=torch.float64))
    x = torch.randn(3, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(11), requires_grad=True)
    w = torch.randn(3, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    outs = {}
    for name, fn in (("cpp", mixer), ("python", lambda z: _without_native(mixer, z))):
        y, logdet = fn(x)
        outs[name] = (
            y,
            logdet,
            torch.autograd.grad((w * y).sum() - 0.7 * logdet.sum(), [x, *mixer.parameters()]),
            y.grad_fn.name(),
        )
    assert "ChannelMixerNative" in outs["cpp"][3] and "ChannelMixerNative" not in outs["python"][3]
    torch.testing.assert_close(outs["cpp"][0], outs["python"][0], atol=1e-12, rtol=0)
    torch.testing.assert_close(outs["cpp"][1], outs["python"][1], atol=1e-12, rtol=0)
    for a, b in zip(outs["cpp"][2], outs["python"][2]):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-10)
    args = (x.detach()[:1].requires_grad_(), *[p.detach().requires_grad_() for p in mixer.parameters()])
    assert torch.autograd.gradcheck(
        lambda z, lu, log_s: sum(t.sum() for t in cpp.channel_mix(z, lu, log_s, mixer.sign)), args
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [1, 5, 130])
def test_cpp_gated_solve_equals_the_blocked_solve_and_inverts_the_update(cpp, dtype, n) -> None:
    from pipeline.flows.ica import solve_gated_upper

    gen = torch.Generator().manual_seed(n)
    d = 7
    a = (
        torch.randn(3, n, n, generator=gen, dtype=dtype)
        .masked_fill(torch.ones(n, n, dtype=torch.bool).tril(-1), -torch.inf)
        .softmax(-1)
    )
    alpha = torch.tanh(torch.randn(d, generator=gen, dtype=dtype)) * 0.99
    y = torch.randn(3, n, d, generator=gen, dtype=dtype)
    x = native.gated_solve(a, alpha, y)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(x + alpha * (a @ x), y, atol=tol, rtol=0)  # (I + α_c A) x = y, every channel
    with torch.enable_grad():  # the autograd path is the blocked Python solve
        ref = solve_gated_upper(a, alpha, y.clone().requires_grad_(), block=4)
    torch.testing.assert_close(x, ref.detach(), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d", [7, 48, 192])
def test_cpu_kernels_of_the_ica_node_equal_their_composed_forms(cpp, dtype, d) -> None:
    """The CPU kernels inside gated_ica_core (the product-form log-det and its backward, the q/k LayerNorm, the
    fused ActNorm + gather) against the ATen compositions they replace; fp32 against the fp64 truth."""
    gen = torch.Generator().manual_seed(d)
    n, e = 33, d
    diag = torch.rand(4, n, generator=gen, dtype=torch.float64).clamp_min(1e-3)
    diag[0, :3] = 1.0  # a_ii = 1 (the first token of a row block) with α at the margin: the factor's smallest value
    alpha = torch.tanh(torch.randn(d, generator=gen, dtype=torch.float64) * 3) * (1 - 1e-4)
    alpha[:2] = torch.tensor([-(1 - 1e-4), 1 - 1e-4], dtype=torch.float64)
    g = torch.randn(4, generator=gen, dtype=torch.float64)
    diag, alpha = diag.to(dtype).double(), alpha.to(dtype).double()  # inputs exact in both dtypes
    # truth in fp64 with autograd (the factor at α → −1, a = 1 amplifies input rounding by 1e4: same inputs for all)
    dref, aref = diag.clone().requires_grad_(), alpha.clone().requires_grad_()
    ref = torch.log1p(dref.unsqueeze(-1) * aref).sum(dim=(1, 2))
    gd_ref, ga_ref = torch.autograd.grad((ref * g).sum(), (dref, aref))
    tol = {"atol": 1e-11, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 2e-4, "rtol": 2e-6}
    torch.testing.assert_close(cpp._gated_logdet(diag.to(dtype), alpha.to(dtype)).double(), ref.detach(), **tol)
    gd, ga = cpp._gated_logdet_backward(diag.to(dtype), alpha.to(dtype), g.to(dtype))
    gtol = {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-3, "rtol": 1e-4}
    torch.testing.assert_close(gd.double(), gd_ref, **gtol)
    torch.testing.assert_close(ga.double(), ga_ref, **gtol)

    pq, pk = (torch.randn(4, n, e, generator=gen, dtype=dtype) * 3 + 1 for _ in range(2))
    wq, bq, wk, bk = (torch.randn(e, generator=gen, dtype=dtype) for _ in range(4))
    tau = torch.tensor(0.37, dtype=dtype)
    q, kn, mq, rq, mk, rk = cpp._qk_layer_norm(torch.cat([pq, pk], -1), wq, bq, wk, bk, tau, 1e-5, 1e-6)
    lt = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}
    for got, want in zip(
        (q, mq, rq, kn, mk, rk),
        (*torch.native_layer_norm(pq, (e,), wq, bq, 1e-5), *torch.native_layer_norm(pk, (e,), wk, bk, 1e-6)),
    ):
        torch.testing.assert_close(got, want * tau if got is q else want, **lt)
    # its backward against autograd through F.layer_norm (q = LN(pq)·τ with τ = e^log_tau, and the keys)
    leaves = [t.clone().requires_grad_() for t in (pq, pk, wq, bq, wk, bk)]
    log_tau = tau.log().clone().requires_grad_()
    qr = torch.nn.functional.layer_norm(leaves[0], (e,), leaves[2], leaves[3], 1e-5) * log_tau.exp()
    kr = torch.nn.functional.layer_norm(leaves[1], (e,), leaves[4], leaves[5], 1e-6)
    dq, dk = torch.randn_like(qr), torch.randn_like(kr)
    want = torch.autograd.grad((qr * dq).sum() + (kr * dk).sum(), [*leaves, log_tau])
    dpqk, dwq, dbq, dwk, dbk, dlt = cpp._qk_layer_norm_backward(
        dq, dk, torch.cat([pq, pk], -1), mq, rq, mk, rk, wq, wk, tau, q
    )
    dpqk = dpqk.view(4, n, 2 * e)
    for got, w in zip((dpqk[..., :e], dpqk[..., e:], dwq, dbq, dwk, dbk, dlt), want):
        bt = {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-3, "rtol": 1e-4}
        torch.testing.assert_close(got, w, **bt)

    x = torch.randn(4, 2 * n, d, generator=gen, dtype=dtype)
    index = torch.randperm(2 * n, generator=gen)[:n]
    loc, scale = torch.randn(d, generator=gen, dtype=dtype), torch.rand(d, generator=gen, dtype=dtype) + 0.5
    torch.testing.assert_close(cpp._take_rows(x, index, loc, scale), ((x + loc) * scale).index_select(1, index))
    torch.testing.assert_close(cpp._take_rows(x, index, None, None), x.index_select(1, index), atol=0, rtol=0)


def _gathered_case(seed: int, n: int, d: int, e: int, norm: bool, batch: int = 3):
    """A gathered-partition node case: (mask bias, (gather, scatter, swap), args, extra, inputs, output weights)."""
    gen = torch.Generator().manual_seed(seed)
    bias = torch.zeros(n, n, dtype=torch.float64).masked_fill_(
        torch.ones(n, n, dtype=torch.bool).tril(-1), float("-inf")
    )
    index = torch.randperm(2 * n, generator=gen)
    args, extra = _args(gen, n, d, e, norm)
    args[0] = torch.randn(batch, 2 * n, d, dtype=torch.float64, generator=gen).mul_(0.5).requires_grad_()
    inputs = args + [t for t in extra if t is not None]
    w = torch.randn(batch, 2 * n, d, dtype=torch.float64, generator=gen)
    return bias, (index, torch.argsort(index), False), args, extra, inputs, w


@pytest.mark.parametrize("norm", [False, True], ids=["plain", "actnorm"])
def test_cpp_node_in_fp32_tracks_the_fp64_truth(cpp, norm) -> None:
    """The node as training runs it (fp32, a gathered partition, 64 tokens per half, D = 48): values and every
    gradient within fp32 tolerance of the Python node in fp64."""
    bias, perm, args, extra, inputs, w = _gathered_case(5, 64, 48, 48, norm)
    y, logdet = GatedICACore.apply(args[0], *perm, *args[1:], bias, 1e-5, 1e-5, False, 64, *extra)
    want = [y, logdet, *torch.autograd.grad((w * y).sum() - 0.7 * logdet.sum(), inputs)]
    f32 = [t.detach().float().requires_grad_() for t in inputs]
    ex32 = f32[len(args) :] if norm else [None, None]
    y, logdet = cpp.gated_ica_core(f32[0], *perm, *f32[1 : len(args)], bias.float(), 1e-5, 1e-5, False, 64, *ex32)
    got = [y, logdet, *torch.autograd.grad((w.float() * y).sum() - 0.7 * logdet.sum(), f32)]
    for a, b in zip(got, want):
        scale = b.abs().max().item() + 1.0
        torch.testing.assert_close(a.double(), b.detach(), atol=2e-5 * scale, rtol=1e-4)


def test_the_node_reads_a_parametrised_weight_like_the_reference_does(cpp) -> None:
    """The node reads its weights from the module dicts for speed; a parametrisation (weight as a computed
    property) must still reach it."""
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    layer = randomise_parameters(ICA(6, 16, "imca1", attention="plain"), std=0.3).double()
    parametrize.register_parametrization(layer.proj_q, "weight", Double())
    x = torch.randn(2, 16, 6, dtype=torch.float64)
    y, logdet = layer(x)
    layer.kernels = "reference"
    y_ref, logdet_ref = layer(x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(logdet, logdet_ref)


def test_the_cpu_kernels_sum_per_thread_partials_to_the_one_thread_result(cpp) -> None:
    """The row kernels split rows over threads and sum per-thread partials (the α, LayerNorm-affine and ActNorm
    gradients): two threads give the one-thread values and gradients (fp64, large enough to split)."""
    bias, perm, args, extra, inputs, w = _gathered_case(3, 64, 24, 24, True, batch=32)
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)  # the one_thread fixture restores the count afterwards
        y, logdet = cpp.gated_ica_core(args[0], *perm, *args[1:], bias, 1e-5, 1e-5, False, 64, *extra)
        outs.append([y, logdet, *torch.autograd.grad((w * y).sum() - 0.7 * logdet.sum(), inputs)])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
