"""The padding mask (pipeline.flows.base.token_mask): padded tokens held fixed, the flow an exact bijection of
the real tokens with the real tokens' log-det, under every layer family and every memory policy."""

from __future__ import annotations

import pytest
import torch

from pipeline.flows import ICA, ActNorm, AffineCoupling, ChannelMixer, MangoBlock, MangoFlow, data_init, token_mask

from .checker import randomise_parameters

N, L, D = 3, 8, 4
REAL_B = (4, 2, 3)  # real tokens of modality B per sample (B's tokens are the second half; pads trail)


def _mask() -> torch.Tensor:
    mask = torch.ones(N, L, dtype=torch.bool)
    for i, real in enumerate(REAL_B):
        mask[i, L // 2 + real :] = False
    return mask


def _input(mask: torch.Tensor, seed: int = 0) -> torch.Tensor:
    x = torch.randn(N, L, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x * mask.unsqueeze(-1)  # padded tokens are exact zeros, as the text encoder emits them


def _real_jacobian_logdets(fn, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log|det| of the Jacobian of the real tokens' outputs w.r.t. the real tokens' inputs, per sample."""
    out = []
    for i in range(N):
        keep = mask[i].repeat_interleave(D)

        def one(flat, i=i):
            xi = x.clone()
            xi[i] = flat.view(L, D)
            with token_mask(mask):
                return fn(xi)[0][i].reshape(-1)

        jac = torch.autograd.functional.jacobian(one, x[i].reshape(-1))
        out.append(torch.linalg.slogdet(jac[keep][:, keep])[1])
    return torch.stack(out)


def _layers():
    yield "actnorm", ActNorm(D)
    yield "channel_mix", ChannelMixer(D)
    yield "coupling", AffineCoupling(D, 8)
    for part in ("mmca1", "mmca2", "imca1", "imca2", "imca3", "imca4"):
        yield f"ica-{part}", ICA(D, L, part)
    yield "ica-paper", ICA(D, L, "imca1", form="paper")
    yield "block", MangoBlock(D, L, "mmca+imca")


@pytest.mark.parametrize("name,layer", list(_layers()), ids=lambda v: v if isinstance(v, str) else "")
def test_each_layer_is_exact_on_the_real_tokens_and_holds_pads(name: str, layer: torch.nn.Module) -> None:
    layer = randomise_parameters(layer.double(), std=0.3, seed=1)
    mask = _mask()
    x = _input(mask)
    with token_mask(mask), torch.no_grad():
        y, logdet = layer(x)
        back, logdet_rev = layer(y, reverse=True)
    pads = ~mask
    assert torch.equal(y[pads], x[pads]), "a padded token changed"
    assert not torch.allclose(y[mask], x[mask]), "the layer must act on the real tokens"
    torch.testing.assert_close(back, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(logdet_rev, -logdet, atol=1e-10, rtol=0)
    torch.testing.assert_close(logdet, _real_jacobian_logdets(layer, x, mask), atol=1e-8, rtol=0)


def test_ica_ignores_the_content_of_padded_tokens() -> None:
    """A padded value never enters a real token's update (its key and value are excluded)."""
    ica = randomise_parameters(ICA(D, L, "mmca1").double(), std=0.3, seed=2)
    mask = _mask()
    x = _input(mask)
    noisy = x + torch.randn_like(x) * (~mask).unsqueeze(-1)
    with token_mask(mask), torch.no_grad():
        y, ld = ica(x)
        y2, ld2 = ica(noisy)
    torch.testing.assert_close(y[mask], y2[mask], atol=1e-12, rtol=0)
    torch.testing.assert_close(ld, ld2, atol=1e-12, rtol=0)


@pytest.mark.parametrize("memory", ["checkpoint", "invert"])
def test_memory_policies_carry_the_mask_into_the_recompute(memory: str) -> None:
    mask = _mask()
    x = _input(mask)
    ref = randomise_parameters(MangoFlow(D, L, 2, partitions="mmca+imca").double(), std=0.3, seed=3)
    other = MangoFlow(D, L, 2, partitions="mmca+imca", memory=memory).double()
    other.load_state_dict(ref.state_dict())
    grads = []
    for flow in (ref, other):
        xi = x.clone().requires_grad_()
        with token_mask(mask):
            z, logdet = flow(xi)
        (z.square().sum() - logdet.sum()).backward()
        grads.append((z.detach(), xi.grad, [p.grad for p in flow.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-12, rtol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-10, rtol=0)
    for a, b in zip(grads[0][2], grads[1][2]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_actnorm_data_init_uses_the_real_tokens_only() -> None:
    mask = _mask()
    x = _input(mask) + 3.0 * mask.unsqueeze(-1)
    norm = ActNorm(D).double()
    with token_mask(mask):
        data_init(norm, x)
        y, _ = norm(x)
    real = y[mask]
    torch.testing.assert_close(real.mean(0), torch.zeros(D, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(real.std(0, unbiased=False), torch.ones(D, dtype=torch.float64), atol=1e-5, rtol=0)


def test_lica_and_a_wrong_shape_are_refused() -> None:
    mask = _mask()
    with token_mask(mask), pytest.raises(ValueError, match="lica partition"):
        ICA(D, L, "lica").double()(_input(mask))
    with token_mask(mask[:, :4]), pytest.raises(ValueError, match="the mask has shape"):
        ActNorm(D).double()(_input(mask))
    with pytest.raises(ValueError, match="bool tensor"):
        with token_mask(mask.float()):
            pass
