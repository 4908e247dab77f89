"""The latent task models: forward/backward, shapes, learning on a fixed batch, the NLL's stopped gradient,
exact eval sums under ``__valid__``, layout errors, and the baselines (single modality, concat fusion)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.flows import data_init, token_mask
from pipeline.models import LatentTaskModel, build_model

N, S = 4, 16  # batch, image side

SEG_SPECS = [("rgb.png", (3, S, S), 8), ("depth.png", (1, S, S), 16), ("label.png", (S, S), 8)]
TR_SPECS = [("rgb.png", (3, S, S), 8), ("depth.png", (1, S, S), 16), ("right.png", (3, S, S), 8)]
CLS_SPECS = [("rgb.png", (3, S, S), 8), ("text.txt", (), 0), ("labels.npy", (5,), 8)]
TEXTS = ["a drama about a family", "an action film with car chases and explosions in a big city", "comedy", "war"]


def cfg_for(task: str, modalities: str, *extra: str):
    return load_config(
        None,
        [
            f"model.task={task}",
            f"data.modalities={modalities}",
            "model.dim=16",
            f"model.image_size={S}",
            "model.patch_size=4",
            "model.num_blocks=1",
            "model.lica_group=0",
            *extra,
        ],
    )


def seg_model(*extra: str) -> LatentTaskModel:
    torch.manual_seed(0)
    return build_model(cfg_for("segmentation", "[rgb,depth,label]", "model.num_classes=3", *extra), SEG_SPECS)


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    depth = torch.randint(500, 9000, (N, 1, S, S), generator=g)
    label = (depth[:, 0] > 4000).long() + (torch.arange(S) > S // 2).long().view(1, 1, S)  # needs depth and position
    label[:, 0, :] = 255
    return {
        "rgb.png": torch.randint(0, 256, (N, 3, S, S), dtype=torch.uint8, generator=g),
        "depth.png": depth.to(torch.uint16),
        "label.png": label,
        "right.png": torch.randint(0, 256, (N, 3, S, S), dtype=torch.uint8, generator=g),
        "text.txt": list(TEXTS),
        "labels.npy": torch.randint(0, 2, (N, 5), dtype=torch.uint8, generator=g),
        "__key__": [f"k{i}" for i in range(N)],
    }


def fit(model, b, steps: int = 12, lr: float = 1e-2) -> list[float]:
    data_init(model, b, mode="loss")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        out = model(b, mode="loss")
        assert torch.isfinite(out["loss"]) and set(out) >= {"loss", "task_loss"}
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["task_loss"]))
    return losses


@pytest.fixture(scope="module")
def cls_model():
    torch.manual_seed(0)
    return build_model(cfg_for("classification", "[rgb,text,labels]", "model.num_classes=5"), CLS_SPECS)


def test_segmentation_learns_and_predicts_full_resolution():
    model, b = seg_model(), batch()
    losses = fit(model, b)
    assert losses[-1] < 0.7 * losses[0], losses
    with torch.no_grad():
        pred = model(b, mode="predict")["pred"]
    assert pred.shape == (N, S, S) and pred.dtype == torch.int64 and int(pred.max()) < 3


def test_translation_learns_with_gan_and_outputs_unit_range():
    torch.manual_seed(0)
    model = build_model(
        cfg_for("translation", "[rgb,depth,right]", "model.target=right", "model.gan_weight=0.05"), TR_SPECS
    )
    b = batch()
    ramp = torch.linspace(0, 255, S).view(1, 1, 1, S) * torch.ones(N, 3, S, 1)
    b["right.png"] = ramp.round().to(torch.uint8)  # smooth and learnable from the grid
    losses = fit(model, b, steps=15)
    assert losses[-1] < 0.8 * losses[0], losses
    out = model(b, mode="loss")
    assert {"gan_g", "gan_d", "nll"} <= set(out)
    with torch.no_grad():
        pred = model(b, mode="predict")["pred"]
    assert pred.shape == (N, 3, S, S) and float(pred.min()) >= 0.0 and float(pred.max()) <= 1.0


def test_classification_with_text_learns(cls_model):
    b = batch()
    losses = fit(cls_model, b, steps=12, lr=5e-3)
    assert losses[-1] < 0.7 * losses[0], losses
    with torch.no_grad():
        probs = cls_model(b, mode="predict")["probs"]
    assert probs.shape == (N, 5) and float(probs.min()) >= 0 and float(probs.max()) <= 1
    assert not any(p.requires_grad for p in cls_model.encoders["text"].bert.parameters())  # frozen by default


def test_nll_gradient_is_stopped_into_the_encoders():
    b = batch()
    grads = {}
    for lam in (0.0, 1.0):
        model = seg_model(f"model.nll_weight={lam}")
        data_init(model, b, mode="loss")
        model(b, mode="loss")["loss"].backward()
        grads[lam] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    enc = [k for k in grads[0.0] if k.startswith("encoders.")]
    flow = [k for k in grads[0.0] if k.startswith("flow.")]
    assert enc and flow
    for k in enc:  # the NLL term adds nothing to any encoder gradient
        torch.testing.assert_close(grads[1.0][k], grads[0.0][k], rtol=0, atol=1e-7)
    assert max(float((grads[1.0][k] - grads[0.0][k]).abs().max()) for k in flow) > 1e-4  # ... but trains the flow
    # the test can fail: the same NLL without the stop does reach the encoders
    model = seg_model()
    data_init(model, b, mode="loss")
    tokens, _ = model._encode(b)
    z, logdet = model.flow(torch.cat(tokens, 1))
    model.nll_per_dim(z, logdet).mean().backward()
    assert max(float(p.grad.abs().max()) for k, p in model.named_parameters() if k.startswith("encoders.")) > 1e-6


def test_eval_sums_count_only_valid_samples():
    model, b = seg_model(), batch()
    data_init(model, b, mode="loss")
    model.eval()
    with torch.no_grad():
        full = model({**b, "__valid__": torch.tensor([True, True, False, False])}, mode="eval")
        head = model({k: (v[:2] if not k.startswith("__") else v[:2]) for k, v in b.items()}, mode="eval")
    assert full["confusion"].shape == (3, 3) and full["confusion"].dtype == torch.int64
    assert int(full["confusion"].sum()) == int((b["label.png"][:2] != 255).sum())
    assert float(full["count"]) == 2.0
    for k in ("confusion", "task_loss_sum", "nll_sum", "count"):
        torch.testing.assert_close(full[k].double(), head[k].double())


def test_translation_and_classification_eval_sums(cls_model):
    torch.manual_seed(0)
    tr = build_model(cfg_for("translation", "[rgb,depth,right]", "model.target=right"), TR_SPECS).eval()
    b = batch()
    valid = torch.tensor([True, False, True, True])
    with torch.no_grad():
        out = tr({**b, "__valid__": valid}, mode="eval")
        pred = tr(b, mode="predict")["pred"]
    target = b["right.png"].float() / 255
    assert float(out["numel"]) == 3 * 3 * S * S
    torch.testing.assert_close(out["abs_err_sum"], (pred - target).abs()[valid].sum().double())
    cls_model.eval()
    with torch.no_grad():
        sums = cls_model({**b, "__valid__": valid}, mode="eval")
    assert sums["tp"].shape == sums["fp"].shape == sums["fn"].shape == (5,)
    assert int((sums["tp"] + sums["fn"]).sum()) == int(b["labels.npy"][valid].sum())
    assert float(sums["count"]) == 3.0


def test_single_modality_and_concat_baselines():
    b = batch()
    torch.manual_seed(0)
    single = build_model(cfg_for("segmentation", "[rgb,label]", "model.num_classes=3"), SEG_SPECS[::2])
    assert single.flow.tokens == 16 and len(single.encoders) == 1
    assert fit(single, b, steps=2)
    concat = seg_model("model.fusion=concat")
    assert concat.flow is None and "nll" not in concat(b, mode="loss")
    with torch.no_grad():
        assert "nll_sum" not in concat(b, mode="eval")


def test_partitions_and_training_augmentation_apply():
    model = seg_model("model.partitions=mmca", "data.crop_size=12", "data.scale_range=[0.75,1.25]", "data.hflip=true")
    names = [type(m).__name__ for m in model.flow.blocks[0].layers]
    assert names.count("ICA") == 2  # mmca1, mmca2 only
    b = batch()
    fit(model, b, steps=1)
    torch.manual_seed(1)
    aug = model._augmented(b, with_target=True)
    assert aug["rgb.png"].shape == (N, 3, 12, 12) and aug["label.png"].shape == (N, 12, 12)
    assert set(aug["label.png"].unique().tolist()) <= {0, 1, 2, 255}


@pytest.mark.parametrize(
    "mods, extra, match",
    [
        ("[rgb,depth]", ("model.num_classes=3",), "exactly one label"),
        ("[rgb,depth,label]", (), "num_classes"),
        ("[rgb,depth,right]", (), "model.target"),
    ],
)
def test_layout_errors_are_config_errors(mods, extra, match):
    task = "translation" if "right" in mods else "segmentation"
    specs = TR_SPECS if "right" in mods else SEG_SPECS[:2] if "label" not in mods else SEG_SPECS
    with pytest.raises(ConfigError, match=match):
        build_model(cfg_for(task, mods, *extra), specs)


def test_gan_with_zero3_and_gan_outside_translation_are_refused():
    with pytest.raises(ConfigError, match="zero_stage=3"):
        build_model(
            cfg_for(
                "translation",
                "[rgb,depth,right]",
                "model.target=right",
                "model.gan_weight=0.1",
                "deepspeed.zero_stage=3",
            ),
            TR_SPECS,
        )
    with pytest.raises(ConfigError, match="translation task"):
        build_model(
            cfg_for("segmentation", "[rgb,depth,label]", "model.num_classes=3", "model.gan_weight=0.1"), SEG_SPECS
        )


def test_manifest_modalities_are_checked_against_the_config():
    from types import SimpleNamespace

    from pipeline.data.manifest import ModalitySpec
    from pipeline.models import modality_specs

    manifest = SimpleNamespace(
        modalities={
            "rgb.png": ModalitySpec("uint8", "image", (S, S, 3)),
            "depth.png": ModalitySpec("uint16", "depth", (S, S)),
            "label.png": ModalitySpec("uint8", "label", (S, S), "class index", ("a", "b", "c", "d"), 255),
            "json": ModalitySpec("json", "meta"),
        }
    )
    ok = cfg_for("segmentation", "[rgb,depth,label]", "model.num_classes=4")
    assert modality_specs(ok, manifest) == SEG_SPECS
    with pytest.raises(ConfigError, match="num_classes=3 but the shards' label.png has 4 classes"):
        modality_specs(cfg_for("segmentation", "[rgb,depth,label]", "model.num_classes=3"), manifest)
    with pytest.raises(ConfigError, match="'right' is not in the shards"):
        modality_specs(cfg_for("segmentation", "[rgb,right,label]", "model.num_classes=4"), manifest)


def test_pad_mask_holds_padded_text_tokens_and_leaves_them_out_of_the_nll():
    """model.pad_mask: padded text tokens stay zero through G and the NLL covers the real tokens only."""
    torch.manual_seed(0)
    extra = ("model.num_classes=5", "model.partitions=mmca+imca", "model.pad_mask=true", "model.nll_weight=1")
    model = build_model(cfg_for("classification", "[rgb,text,labels]", *extra), CLS_SPECS)
    b = batch()
    data_init(model, b, mode="loss")
    tokens, masks = model._encode(b)
    text_mask = masks[1]
    assert text_mask is not None and not text_mask.all() and text_mask.any(1).all(), "the short texts are padded"
    (z_img, z_txt), nll = model._flow(tokens, stop_into_encoders=False, masks=masks)
    assert torch.equal(z_txt[~text_mask], torch.zeros_like(z_txt[~text_mask])), "padded tokens stay zero"
    mask = torch.cat([torch.ones_like(text_mask), text_mask], dim=1)
    with token_mask(mask):
        z, logdet = model.flow(torch.cat(tokens, 1))
    real = mask.unsqueeze(-1).float()
    dims = mask.sum(1).float() * z.shape[2]
    want = (0.5 * (z * z * real).flatten(1).sum(1) + 0.5 * dims * math.log(2 * math.pi) - logdet) / dims
    torch.testing.assert_close(nll, want)
    loss = model(b, mode="loss")["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(ConfigError, match="model.pad_mask: partitions 'all' include lica"):
        cfg_for("classification", "[rgb,text,labels]", "model.num_classes=5", "model.pad_mask=true")
