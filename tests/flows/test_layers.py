"""The flow layers keep the invertibility contract, are exact, start as the identity, and fail clearly."""

from __future__ import annotations

import io

import pytest
import torch

from pipeline.flows import (
    ICA,
    PARTITIONS,
    ActNorm,
    AffineCoupling,
    ChannelMixer,
    LUTokenMixer,
    MangoBlock,
    MangoFlow,
    data_init,
    partition_index,
    solve_gated_upper,
)

from .checker import check_flow, randomise_parameters

DTYPES = [torch.float32, torch.float64]
SHAPES = [(8, 4), (12, 6), (16, 3)]  # (tokens, dim); n = tokens/2 even for IMCA/LICA


def _layers(tokens: int, dim: int) -> dict[str, torch.nn.Module]:
    layers: dict[str, torch.nn.Module] = {f"ica-{p}": ICA(dim, tokens, p) for p in PARTITIONS}
    layers["ica-paper-imca2"] = ICA(dim, tokens, "imca2", form="paper")
    layers["ica-lica-grouped"] = ICA(dim, tokens, "lica", lica_group=4)
    layers["ica-learned-tau"] = ICA(dim, tokens, "mmca2", learn_temperature=True, qk_dim=5)
    layers["actnorm"] = ActNorm(dim)
    layers["channel-mix"] = ChannelMixer(dim)
    layers["coupling"] = AffineCoupling(dim, 8)
    layers["coupling-swap"] = AffineCoupling(dim, 8, swap=True)
    layers["block"] = MangoBlock(dim, tokens)
    layers["block-imca"] = MangoBlock(dim, tokens, "imca", lica_group=4)
    layers["block-paper-layout"] = MangoBlock(dim, tokens, channel_mix=False)
    layers["G"] = MangoFlow(dim, tokens, num_blocks=2)
    return layers


LAYER_NAMES = list(_layers(8, 4))


@pytest.mark.parametrize("name", LAYER_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"L{s[0]}D{s[1]}")
def test_contract(name: str, dtype: torch.dtype, shape: tuple[int, int]) -> None:
    tokens, dim = shape
    module = randomise_parameters(_layers(tokens, dim)[name]).to(dtype)
    x = torch.randn(3, tokens, dim, dtype=dtype, generator=torch.Generator().manual_seed(1))
    composite = name in ("block", "block-imca", "block-paper-layout", "G")
    tol = {torch.float32: 1e-4 if composite else 1e-5, torch.float64: 1e-9 if composite else 1e-10}[dtype]
    check_flow(module, x, roundtrip_tol=tol)


@pytest.mark.parametrize("name", LAYER_NAMES)
@pytest.mark.parametrize("shape", [(8, 4), (12, 3)], ids=["n=D", "n!=D"])
def test_logdet_equals_jacobian_slogdet(name: str, shape: tuple[int, int]) -> None:
    # (12, 3): n = L/2 = 6 ≠ D = 3, where the official (L/2)·slogdet factor and the per-channel one differ
    tokens, dim = shape
    module = randomise_parameters(_layers(tokens, dim)[name]).double()
    x = torch.randn(2, tokens, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    check_flow(module, x, jacobian=True, jacobian_tol=1e-6)


@pytest.mark.parametrize("name", [n for n in LAYER_NAMES if n != "ica-paper-imca2"])
def test_identity_at_init(name: str) -> None:
    module = _layers(8, 4)[name]
    x = torch.randn(2, 8, 4)
    y, logdet = module(x)
    torch.testing.assert_close(y, x, atol=0, rtol=0)
    torch.testing.assert_close(logdet, torch.zeros(2), atol=0, rtol=0)


def test_gradients_finite_and_nonzero_after_first_step() -> None:
    torch.manual_seed(0)
    flow = MangoFlow(6, 8, num_blocks=2, lica_group=4, learn_temperature=True)
    x = torch.randn(16, 8, 6)
    assert data_init(flow, x) == 2 * 8  # one ActNorm before each of the 8 ICAs, per block
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)

    def step() -> None:
        opt.zero_grad()
        y, logdet = flow(x)
        (0.5 * y.pow(2).sum(dim=(1, 2)) - logdet).mean().backward()

    step()
    opt.step()
    step()
    for pname, p in flow.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{pname} gets no gradient after the first step"


def test_bf16_autocast_roundtrip_and_fp32_logdet() -> None:
    block = randomise_parameters(MangoBlock(8, 16), std=0.1)
    x = torch.randn(2, 16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, logdet = block(x)
        x_rev, logdet_rev = block(y, reverse=True)
    assert y.dtype == torch.float32 and logdet.dtype == torch.float32
    rel = (x_rev - x).norm() / x.norm()
    assert rel <= 1e-2, f"bf16 round trip relative error {rel:.3e}"
    torch.testing.assert_close(logdet + logdet_rev, torch.zeros(2), atol=1e-3, rtol=0)


def test_actnorm_data_init_and_never_reinit_after_load() -> None:
    norm = ActNorm(4)
    x = torch.randn(64, 10, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0]) + 5.0
    assert data_init(norm, x) == 1
    y, _ = norm(x)
    torch.testing.assert_close(y.mean(dim=(0, 1)), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 1), unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    buf = io.BytesIO()
    torch.save(norm.state_dict(), buf)
    buf.seek(0)
    loaded = ActNorm(4)
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    assert bool(loaded.initialized)
    assert data_init(loaded, torch.randn(8, 10, 4) * 100) == 0
    torch.testing.assert_close(loaded.loc, norm.loc, atol=0, rtol=0)
    torch.testing.assert_close(loaded.log_scale, norm.log_scale, atol=0, rtol=0)


def test_partition_tables() -> None:
    # A = tokens 0..3, B = 4..7; ·1 = even, ·2 = odd indices within each modality
    expect = {
        "mmca1": [0, 1, 2, 3, 4, 5, 6, 7],
        "mmca2": [4, 5, 6, 7, 0, 1, 2, 3],
        "imca1": [0, 2, 4, 6, 1, 3, 5, 7],
        "imca2": [0, 2, 5, 7, 1, 3, 4, 6],
        "imca3": [1, 3, 4, 6, 0, 2, 5, 7],
        "imca4": [1, 3, 5, 7, 0, 2, 4, 6],
    }
    for name, idx in expect.items():
        assert partition_index(name, 8).tolist() == idx, name


@pytest.mark.parametrize("group", [0, 4, 8])
def test_lica_mixer_starts_as_imca1_and_inverts(group: int) -> None:
    mixer = LUTokenMixer(16, group)
    perm = torch.eye(16, dtype=torch.float64)[partition_index("imca1", 16)]
    torch.testing.assert_close(mixer.matrix(), perm)
    randomise_parameters(mixer, std=0.3)
    x = torch.randn(2, 16, 3, dtype=torch.float64)
    mixer.double()
    torch.testing.assert_close(mixer(x), torch.einsum("ij,njd->nid", mixer.matrix(), x))
    torch.testing.assert_close(mixer(mixer(x), reverse=True), x, atol=1e-10, rtol=0)
    g = group or 16
    assert sum(p.numel() for p in mixer.parameters()) == 16 * g * 2 + 16  # L·G lower + L·G upper + L log_s


def test_gated_solve_matches_dense_solve() -> None:
    torch.manual_seed(0)
    n, d = 150, 5  # not a multiple of the block size
    logits = torch.randn(2, n, n, dtype=torch.float64).masked_fill(
        torch.ones(n, n, dtype=torch.bool).tril(-1), -torch.inf
    )
    a = logits.softmax(-1)
    alpha = torch.tanh(torch.randn(d, dtype=torch.float64))
    y = torch.randn(2, n, d, dtype=torch.float64)
    x = solve_gated_upper(a, alpha, y, block=64)
    for c in range(d):
        dense = torch.eye(n, dtype=torch.float64) + alpha[c] * a
        torch.testing.assert_close(dense @ x[:, :, c : c + 1], y[:, :, c : c + 1], atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "make, x, match",
    [
        (lambda: ICA(4, 8, "mmca1"), torch.randn(8, 4), r"3-D tensor of shape \(N, 8, 4\); got shape \(8, 4\)"),
        (lambda: ICA(4, 8, "mmca1"), torch.randn(2, 10, 4), r"expected shape \(N, 8, 4\); got \(2, 10, 4\)"),
        (lambda: MangoBlock(4, 8), torch.randn(2, 8, 5), r"expected shape \(N, 8, 4\); got \(2, 8, 5\)"),
        (lambda: MangoFlow(4, 8, 1), torch.full((2, 8, 4), float("nan")), r"non-finite"),
        (lambda: ActNorm(4), torch.tensor([[[1.0, float("inf"), 0.0, 0.0]]]), r"1 non-finite"),
        (lambda: ICA(4, 8, "mmca1"), torch.zeros(2, 8, 4, dtype=torch.long), r"floating-point"),
    ],
)
def test_bad_input_is_a_clear_error(make, x, match) -> None:
    with pytest.raises(ValueError, match=match):
        make()(x)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ICA(4, 6, "imca1"), r"IMCA needs an even token count per modality.*n=3"),
        (lambda: ICA(4, 7, "mmca1"), r"token count must be even"),
        (lambda: ICA(4, 8, "xmca"), r"unknown partition 'xmca'"),
        (lambda: ICA(4, 8, "mmca1", form="plain"), r"unknown form"),
        (lambda: ICA(4, 12, "lica", lica_group=5), r"group size must be even and divide tokens=12"),
        (lambda: MangoBlock(4, 8, "mmca+nope"), r"unknown partition"),
        (lambda: MangoFlow(4, 8, memory="disk"), r"memory must be one of"),
    ],
)
def test_bad_configuration_is_a_clear_error(make, match) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_gated_solve_is_differentiable_and_matches_the_no_grad_path() -> None:
    torch.manual_seed(1)
    n, d = 70, 3
    a = torch.randn(2, n, n, dtype=torch.float64).masked_fill(torch.ones(n, n, dtype=torch.bool).tril(-1), -torch.inf)
    a = a.softmax(-1).requires_grad_()
    alpha = torch.tanh(torch.randn(d, dtype=torch.float64)).requires_grad_()
    y = torch.randn(2, n, d, dtype=torch.float64, requires_grad=True)
    x = solve_gated_upper(a, alpha, y, block=32)
    with torch.no_grad():
        torch.testing.assert_close(solve_gated_upper(a, alpha, y, block=32), x)
    assert torch.autograd.gradcheck(
        lambda a_, al, y_: solve_gated_upper(a_, al, y_, block=4),  # 3 blocks
        (a[:1, :12, :12].detach().clone().requires_grad_(), alpha, y[:1, :12].detach().clone().requires_grad_()),
    )


def test_gate_stays_inside_the_unit_interval_for_huge_beta() -> None:
    layer = randomise_parameters(ICA(4, 8, "mmca1"))
    with torch.no_grad():
        layer.beta.fill_(-50.0)  # tanh rounds to exactly -1 in fp32 here
    x = torch.randn(2, 8, 4)
    y, logdet = layer(x)
    assert torch.isfinite(logdet).all() and torch.isfinite(y).all()
    torch.testing.assert_close(layer(y, reverse=True)[0], x, atol=1e-2, rtol=1e-2)


def test_channel_mixer_is_its_dense_matrix_with_either_sign() -> None:
    mixer = randomise_parameters(ChannelMixer(5)).double()
    mixer.sign.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0], dtype=torch.float64))
    x = torch.randn(2, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y, logdet = mixer(x)
    w = mixer.matrix()
    torch.testing.assert_close(y, x @ w.t())
    # log|det| of the whole (L·D) map is L · log|det W|, whatever the signs
    torch.testing.assert_close(logdet, torch.full((2,), 7 * torch.linalg.slogdet(w)[1].item(), dtype=torch.float64))
    back, logdet_rev = mixer(y, reverse=True)
    torch.testing.assert_close(back, x)
    torch.testing.assert_close(logdet_rev, -logdet)


def test_lica_operators_are_reused_without_autograd_until_a_factor_changes() -> None:
    mixer = LUTokenMixer(16, 8)
    with torch.no_grad():
        for p in (mixer.lower, mixer.upper, mixer.log_s):
            p.normal_(0, 0.2)
        first = mixer.operators(torch.float32)
        assert mixer.operators(torch.float32)[0] is first[0]  # evaluation and sampling: built once
        assert mixer.operators(torch.float64)[0].dtype == torch.float64  # another dtype: its own pair
        mixer.upper.add_(0.1)  # an optimizer step / load_state_dict writes in place: the pair is rebuilt
        fresh = mixer.operators(torch.float32)
        assert fresh[0] is not first[0]
        for got, want in zip(fresh, mixer._operators(torch.float32)):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    w, w_inv = mixer.operators(torch.float32)  # with autograd: rebuilt, on the graph
    assert w.requires_grad and w_inv.requires_grad
