"""The fused ICA forward (flipped causal SDPA + chunked diagonal log-probs) equals the plain reference path."""

from __future__ import annotations

import pytest
import torch

from pipeline.flows import ICA, MangoFlow
from pipeline.flows.ica import FUSED_MIN_TOKENS
from pipeline.flows.kernels.attention import diag_log_softmax, upper_attention

from .checker import check_flow, randomise_parameters

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/flows/conftest.py


def _reference(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    n = q.shape[1]
    s = (q @ k.transpose(-1, -2)).masked_fill(torch.ones(n, n, dtype=torch.bool).tril(-1), float("-inf"))
    return torch.log_softmax(s, dim=-1)


def _pair(tokens: int, dim: int, **kw) -> tuple[ICA, ICA]:
    plain = randomise_parameters(ICA(dim, tokens, attention="plain", **kw), std=0.3).double()
    fused = ICA(dim, tokens, attention="fused", **kw).double()
    fused.load_state_dict(plain.state_dict())
    return plain, fused


@pytest.mark.parametrize("chunk", [4, 7, 64], ids=lambda c: f"chunk{c}")
def test_chunked_diagonal_equals_log_softmax_diagonal(chunk: int) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(3, 19, 5, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2))
    g = torch.randn(3, 19, dtype=torch.float64, generator=gen)
    got = diag_log_softmax(q, k, chunk)
    want = _reference(q, k).diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    got_g = torch.autograd.grad(got, (q, k), g)
    want_g = torch.autograd.grad(want, (q, k), g)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_gradcheck_fused_pieces_in_fp64() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 9, 3, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 9, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: diag_log_softmax(a, b, 4), (q, k))  # 3 ragged chunks
    assert torch.autograd.gradcheck(upper_attention, (q, k, v))
    torch.testing.assert_close(upper_attention(q, k, v), _reference(q, k).exp() @ v, atol=1e-12, rtol=0)


CASES = {
    "gated-mmca1": dict(partition="mmca1"),
    "gated-imca3-learned-tau-qk5": dict(partition="imca3", learn_temperature=True, qk_dim=5),
    "gated-lica-grouped": dict(partition="lica", lica_group=4),
    "paper-imca2": dict(partition="imca2", form="paper"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_layer_equals_plain_in_values_and_gradients(case: str) -> None:
    plain, fused = _pair(20, 6, **CASES[case])
    x = torch.randn(3, 20, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    w = torch.randn(3, 20, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    outs = {}
    for name, layer in (("plain", plain), ("fused", fused)):
        y, logdet = layer(x)
        grads = torch.autograd.grad((w * y).sum() - logdet.sum(), [x, *layer.parameters()])
        outs[name] = (y, logdet, grads)
    torch.testing.assert_close(outs["fused"][0], outs["plain"][0], atol=1e-12, rtol=0)
    torch.testing.assert_close(outs["fused"][1], outs["plain"][1], atol=1e-10, rtol=1e-12)
    names = ["input"] + [n for n, _ in plain.named_parameters()]
    for name, a, b in zip(names, outs["fused"][2], outs["plain"][2]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=name)
    # the fused forward keeps the flow contract with the plain inverse (exact round trip, Jacobian log-det)
    check_flow(fused, x.detach()[:2], jacobian=True)


def test_fused_flow_under_bf16_autocast_matches_plain() -> None:
    torch.manual_seed(0)
    plain = randomise_parameters(MangoFlow(8, 16, num_blocks=1, attention="plain"), std=0.1)
    fused = MangoFlow(8, 16, num_blocks=1, attention="fused")
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (yp, lp), (yf, lf) = plain(x), fused(x)
    assert lf.dtype == torch.float32
    torch.testing.assert_close(yf, yp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lf, lp, atol=1e-4, rtol=1e-5)


def test_fused_keeps_no_n_by_n_tensor_for_backward() -> None:
    n = 256
    plain, fused = _pair(2 * n, 8)
    x = torch.randn(2, 2 * n, 8, dtype=torch.float64, requires_grad=True)
    saved = {}
    for name, layer in (("plain", plain), ("fused", fused)):
        sizes: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            y, logdet = layer(x)
        saved[name] = (sum(sizes), max(sizes))
    # plain keeps the attention (as row blocks over the columns each can see: 5/8 of N·n² at n = 256),
    # fused keeps nothing larger than a few (N, n, D) tensors
    assert saved["plain"][0] >= 0.5 * 2 * n * n and saved["fused"][1] < 2 * n * 8 * 4, saved


def test_auto_picks_fused_from_the_measured_size_and_bad_names_fail() -> None:
    assert ICA(4, 2 * FUSED_MIN_TOKENS).attention == "fused"
    assert ICA(4, 2 * FUSED_MIN_TOKENS - 4).attention == "plain"
    with pytest.raises(ValueError, match=r"unknown attention 'flash'"):
        ICA(4, 8, attention="flash")


@pytest.mark.parametrize("attention", ["fused", "plain"])
def test_model_attention_key_reaches_every_ica_layer(attention: str) -> None:
    # config → build_model → every ICA runs the chosen forward path
    from pipeline.config import load_config
    from pipeline.models import build_model

    density = build_model(
        load_config(
            None,
            [
                "model.image_size=8",
                "model.levels=1",
                "model.blocks_per_level=1",
                "model.dim=8",
                "model.lica_group=4",
                f"model.attention={attention}",
            ],
        ),
        [("rgb.png", (3, 8, 8), 8), ("right.png", (3, 8, 8), 8)],
    )
    layers = [m for m in density.modules() if isinstance(m, ICA)]
    assert layers and {m.attention for m in layers} == {attention}
