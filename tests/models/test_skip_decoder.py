"""The pieces the paper protocols need: the skip decoder (``model.skips``), non-square crops
(``data.crop_width``) and the Table 4 flow layers (``model.flow_layer``)."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.models import build_model
from pipeline.models.augment import Augment
from pipeline.models.fusion import token_flow
from pipeline.models.heads import SkipDecoder

NYUDV2 = Path(__file__).resolve().parents[2] / "launch" / "configs" / "nyudv2.yaml"
SPECS = [("rgb.png", (3, 48, 64), 8), ("depth.png", (1, 48, 64), 16), ("label.png", (48, 64), 8)]
TINY = [
    "run.device=cpu",
    "model.dim=16",
    "model.num_blocks=1",
    "model.grid=[2,2]",
    "model.memory=store",
    "deepspeed.activation_checkpointing=false",
]


def _batch(h: int, w: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "rgb.png": torch.randint(0, 256, (2, 3, h, w), generator=g, dtype=torch.uint8),
        "depth.png": torch.randint(0, 9000, (2, 1, h, w), generator=g).to(torch.int32),
        "label.png": torch.randint(0, 40, (2, h, w), generator=g),
    }


def test_skip_decoder_output_follows_the_input_size_and_reads_every_level() -> None:
    dec = SkipDecoder(8, 5, [6, 10], refine=2)
    grid = torch.randn(1, 8, 2, 3)
    skips = [torch.randn(1, 6, 12, 16, requires_grad=True), torch.randn(1, 10, 6, 8, requires_grad=True)]
    out = dec(grid, (48, 64), skips)
    assert out.shape == (1, 5, 48, 64)
    out.square().sum().backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in skips)


def test_segmentation_with_skips_decodes_mit_maps_of_both_modalities_at_any_size() -> None:
    cfg = load_config(NYUDV2, [*TINY, "model.encoder=mit_b0"])
    assert cfg.model.skips
    model = build_model(cfg, SPECS)
    assert model.head.decoder.skip_channels == (64, 128, 320, 512)  # MiT-B0 widths × 2 modalities
    model.eval()
    with torch.no_grad():
        for h, w in ((48, 64), (40, 56)):
            assert model(_batch(h, w), mode="predict")["pred"].shape == (2, h, w)
    model.train()
    model(_batch(48, 64), mode="loss")["loss"].backward()
    assert model.encoders["depth"].encoder.patch_embed1.proj.weight.grad.abs().sum() > 0


def test_crop_width_gives_non_square_aligned_crops() -> None:
    aug = Augment(crop_size=24, crop_width=32, hflip=True)
    img = torch.arange(48 * 64, dtype=torch.float32).view(1, 1, 48, 64).expand(2, 1, 48, 64).contiguous()
    out = aug({"x": img, "y": img[:, 0].long()}, nearest=set())
    assert out["x"].shape == (2, 1, 24, 32) and out["y"].shape == (2, 24, 32)
    assert torch.equal(out["x"][:, 0].round().long(), out["y"])  # the same geometry for image and label


def test_table4_flow_layers_are_exact() -> None:
    torch.manual_seed(0)
    for layer in ("coupling", "glow"):
        flow = token_flow(layer, 6, 8, 3).double()
        for p in flow.parameters():  # move off the identity initialisation
            p.data.add_(0.05 * torch.randn_like(p))
        x = torch.randn(2, 8, 6, dtype=torch.float64)
        z, logdet = flow(x)
        back, _ = flow(z, reverse=True)
        assert torch.allclose(back, x, atol=1e-9)
        jac = torch.autograd.functional.jacobian(lambda v, f=flow: f(v.view(1, 8, 6))[0].flatten(), x[0].flatten())
        assert torch.allclose(logdet[0], torch.linalg.slogdet(jac)[1], atol=1e-8)
    cfg = load_config(NYUDV2, [*TINY, "model.encoder=mit_b0", "model.flow_layer=glow"])
    model = build_model(cfg, SPECS)
    assert not any(type(m).__name__ == "ICA" for m in model.modules())
    model(_batch(48, 64), mode="loss")["loss"].backward()
