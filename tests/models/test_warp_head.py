"""The translation task's view-synthesis decoders (``model.decoder=warp``: one regressed shift per pixel and
grid_sample; ``select``: Deep3D's selection layer) and the stereo held-out options they are measured on: exact
shifts, masking, gradients, forward/backward through every variant, and clear errors."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.data.sources import open_source
from pipeline.models import build_model
from pipeline.models.heads import SelectTranslationHead, WarpTranslationHead, warp_rows

from .test_latent_models import SEG_SPECS, TR_SPECS, N, S, batch, cfg_for, fit

WARP = ("model.target=right", "model.decoder=warp", "model.warp_range=4")
SELECT = ("model.target=right", "model.decoder=select", "model.warp_range=4")


def test_warp_rows_is_an_exact_integer_shift_inside_and_clamps_outside():
    src = torch.rand(2, 3, 5, 10)
    for k in (-3, 0, 2):
        out = warp_rows(src, torch.full((2, 5, 10), float(k)))
        cols = [x for x in range(10) if 0 <= x + k < 10]
        torch.testing.assert_close(out[..., cols], src[..., [x + k for x in cols]], atol=1e-6, rtol=0)
        edge = [x for x in range(10) if x + k >= 10]
        torch.testing.assert_close(out[..., edge], src[..., [9] * len(edge)], atol=1e-6, rtol=0)
    half = warp_rows(src, torch.full((2, 5, 10), 0.5))  # bilinear between neighbours
    torch.testing.assert_close(half[..., :9], 0.5 * (src[..., :9] + src[..., 1:]), atol=1e-6, rtol=0)
    shift = torch.zeros(2, 5, 10, requires_grad=True)
    warp_rows(torch.linspace(0, 1, 10).expand(2, 3, 5, 10), shift).sum().backward()
    assert float(shift.grad[..., 1:-1].abs().min()) > 0  # every inner pixel's shift gets a gradient (a ramp)


def test_warp_head_shift_is_bounded_and_generate_starts_mostly_warped():
    head = WarpTranslationHead(8, 3, 1, 4)
    assert head.decoder.out.out_channels == 1
    with torch.no_grad():
        head.decoder.out.bias.fill_(100.0)
        assert float(head.shifts(torch.randn(1, 8, 4, 4), (8, 8)).max()) <= 4.0
    gen = WarpTranslationHead(8, 3, 1, 4, generate=True)
    assert gen.decoder.out.out_channels == 5 and float(gen.decoder.out.bias[1].detach()) == -3.0
    with torch.no_grad():
        out = gen(torch.randn(2, 8, 4, 4), (8, 8), torch.rand(2, 3, 8, 8))
    assert out.shape == (2, 3, 8, 8) and 0 <= float(out.min()) and float(out.max()) <= 1
    with pytest.raises(ValueError, match="source"):
        head(torch.randn(1, 8, 4, 4), (8, 8), torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="max_shift"):
        WarpTranslationHead(8, 3, 1, 0)


def _pinned_head(choice: int, r: int = 3, c: int = 3, generate: bool = False) -> SelectTranslationHead:
    """A head whose decoder ignores its input and puts (almost) all mass on candidate ``choice``."""
    head = SelectTranslationHead(8, c, 1, r, generate=generate)
    with torch.no_grad():
        head.decoder.out.weight.zero_()
        head.decoder.out.bias.zero_()
        head.decoder.out.bias[choice] = 40.0
    return head


@pytest.mark.parametrize("shift, generate", [(-3, False), (-1, True), (0, False), (2, True), (3, False)])
def test_select_one_candidate_is_an_exact_shift_of_the_source_and_outside_columns_are_masked(shift, generate):
    r, w = 3, 10
    head = _pinned_head(shift + r, r, generate=generate)
    src = torch.rand(2, 3, 5, w)
    out = head(torch.randn(2, 8, 4, 4), (5, w), src)
    assert out.shape == src.shape
    cols = [x for x in range(w) if 0 <= x + shift < w]
    torch.testing.assert_close(out[..., cols], src[..., [x + shift for x in cols]], atol=1e-6, rtol=0)
    with torch.no_grad():
        p = head.shift_probs(torch.randn(2, 8, 4, 4), (5, w))
    assert p.shape == (2, 2 * r + 1 + generate, 5, w)
    torch.testing.assert_close(p.sum(1), torch.ones(2, 5, w))
    for j, k in enumerate(range(-r, r + 1)):  # a shift reading outside the image never gets probability
        outside = [x for x in range(w) if not 0 <= x + k < w]
        assert float(p[..., j, :, outside].abs().sum()) == 0.0


def test_select_generated_candidate_fills_in_and_source_is_checked():
    assert _pinned_head(0).decoder.out.out_channels == 7  # shifts only (the default): no generated image
    head = _pinned_head(2 * 3 + 1, generate=True)  # the "generate" logit
    with torch.no_grad():
        head.decoder.out.bias[-3:] = torch.tensor([-20.0, 0.0, 20.0])  # sigmoid → (0, 0.5, 1) per channel
    out = head(torch.randn(1, 8, 4, 4), (6, 6), torch.rand(1, 3, 6, 6))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.0, 0.5, 1.0]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="source"):
        head(torch.randn(1, 8, 4, 4), (6, 6), torch.rand(1, 1, 6, 6))
    with pytest.raises(ValueError, match="max_shift"):
        SelectTranslationHead(8, 3, 1, 0)


@pytest.mark.parametrize("decoder", [WARP, SELECT])
@pytest.mark.parametrize(
    "mods, specs, extra",
    [
        ("[rgb,depth,right]", TR_SPECS, ()),  # MANGO
        ("[rgb,right]", TR_SPECS[::2], ()),  # single modality
        ("[rgb,depth,right]", TR_SPECS, ("model.fusion=concat",)),  # concat, no flow
    ],
)
def test_warp_model_forward_backward_shapes_in_every_variant(mods, specs, extra, decoder):
    torch.manual_seed(0)
    model = build_model(cfg_for("translation", mods, *decoder, *extra), specs)
    kind = WarpTranslationHead if decoder is WARP else SelectTranslationHead
    assert type(model.head) is kind and model.source.key == "rgb.png"
    b = batch()
    out = model(b, mode="loss")
    out["loss"].backward()
    for name, enc in model.encoders.items():  # every input's encoder gets the task gradient (depth included)
        g = sum(float(p.grad.abs().sum()) for p in enc.parameters() if p.grad is not None)
        assert g > 0, name
    with torch.no_grad():
        pred = model(b, mode="predict")["pred"]
        sums = model(b, mode="eval")
    assert pred.shape == (N, 3, S, S) and float(pred.min()) >= 0 and float(pred.max()) <= 1
    assert float(sums["numel"]) == N * 3 * S * S and float(sums["count"]) == N


@pytest.mark.parametrize("decoder", [WARP, SELECT])
def test_warp_model_learns_a_depth_dependent_shift(decoder):
    # right[x] = left[x + d] with d = 1 px where the depth is near, 3 px where it is far: only depth tells which
    torch.manual_seed(0)
    model = build_model(cfg_for("translation", "[rgb,depth,right]", *decoder), TR_SPECS)
    b = batch()
    g = torch.Generator().manual_seed(1)  # smooth texture (a 4×4 random image upsampled), as photographs are
    coarse = torch.rand(N, 3, 4, 4, generator=g)
    b["rgb.png"] = (
        (255 * torch.nn.functional.interpolate(coarse, size=(S, S), mode="bicubic", align_corners=False).clamp(0, 1))
        .round()
        .to(torch.uint8)
    )
    near = torch.arange(N).view(N, 1, 1, 1) % 2 == 0
    b["depth.png"] = torch.where(near, 1500, 6000).expand(N, 1, S, S).to(torch.uint16).clone()
    left = b["rgb.png"]
    b["right.png"] = torch.where(near, torch.roll(left, -1, -1), torch.roll(left, -3, -1))
    losses = fit(model, b, steps=30)
    assert losses[-1] < 0.5 * losses[0], losses


def test_generated_candidate_is_a_config_choice():
    on = build_model(cfg_for("translation", "[rgb,depth,right]", *SELECT, "model.warp_generate=true"), TR_SPECS)
    assert on.head.generate and on.head.candidates == 10
    out = on(batch(), mode="loss")
    out["loss"].backward()
    assert float(on.head.decoder.out.weight.grad[-3:].abs().sum()) > 0  # the generated image is trained


def test_bad_decoder_values_fail_clearly():
    with pytest.raises(ConfigError, match=r"model\.decoder must be one of \['direct', 'warp', 'select'\]; got 'wrap'"):
        cfg_for("translation", "[rgb,depth,right]", "model.target=right", "model.decoder=wrap")
    with pytest.raises(ConfigError, match=r"model\.warp_range"):
        cfg_for("translation", "[rgb,depth,right]", "model.target=right", "model.decoder=warp", "model.warp_range=0")
    with pytest.raises(ConfigError, match=r"model\.decoder='warp' is a translation head"):
        build_model(
            cfg_for("segmentation", "[rgb,depth,label]", "model.num_classes=3", "model.decoder=warp"), SEG_SPECS
        )
    with pytest.raises(
        ConfigError, match="moves pixels of an input image like the target"
    ):  # depth → right: no RGB source
        build_model(cfg_for("translation", "[depth,right]", *WARP), TR_SPECS[1:])


def test_direct_stays_the_default_translation_head():
    model = build_model(cfg_for("translation", "[rgb,depth,right]", "model.target=right"), TR_SPECS)
    assert type(model.head).__name__ == "TranslationHead" and model.source is None


def test_stereo_holdout_and_val_stride_keep_the_regions_disjoint():
    # the translation demo's held-out set: right 35% of the columns, patches every 4 px (overlapping each other only)
    src = open_source("embedded", "stereo", patch=16, downscale=5, stride=2, holdout=0.35, val_stride=4)
    x_train = [int(k.split("-x")[1]) for k in src.keys("train")]
    x_val = [int(k.split("-x")[1]) for k in src.keys("val")]
    assert max(x_train) + 16 <= min(x_val) - 16
    assert len(x_val) == 132 and len(src.keys("train")) == 1763
    assert src.config()["holdout"] == 0.35 and src.config()["val_stride"] == 4
    default = open_source("embedded", "stereo", patch=16, downscale=5, stride=2)
    assert len(default.keys("val")) == 6 and "holdout" not in default.config()  # old shards keep their checksum
    with pytest.raises(ValueError, match="--holdout must be a fraction"):
        open_source("embedded", "stereo", holdout=1.5)
    with pytest.raises(ValueError, match="apply only to the other"):
        open_source("embedded", "scenes", val_stride=4)
