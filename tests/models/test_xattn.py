"""The cross-attention fusion baseline (``model.fusion=xattn``): trains, reads across modalities, ignores padding."""

from __future__ import annotations

import torch

from pipeline.models import build_model
from pipeline.models.xattn import CrossAttentionFusion

from .test_latent_models import CLS_SPECS, SEG_SPECS, batch, cfg_for, fit


def test_xattn_segmentation_learns_a_fixed_batch_without_a_flow_or_nll() -> None:
    torch.manual_seed(0)
    model = build_model(
        cfg_for("segmentation", "[rgb,depth,label]", "model.num_classes=3", "model.fusion=xattn", "model.num_blocks=2"),
        SEG_SPECS,
    )
    assert model.flow is None and len(model.xattn.blocks) == 2
    losses = fit(model, batch())
    assert losses[-1] < 0.7 * losses[0]
    assert "nll" not in model(batch(), mode="loss")


def test_xattn_classification_with_text_builds_and_runs() -> None:
    torch.manual_seed(0)
    model = build_model(
        cfg_for("classification", "[rgb,text,labels]", "model.num_classes=5", "model.fusion=xattn"), CLS_SPECS
    )
    out = model(batch(), mode="loss")
    assert torch.isfinite(out["loss"])


def test_each_modality_reads_the_others_content_and_padded_keys_are_ignored() -> None:
    torch.manual_seed(0)
    fusion = CrossAttentionFusion(8, depth=1, heads=2)
    a, b = torch.randn(2, 5, 8), torch.randn(2, 6, 8, requires_grad=True)
    mask_b = torch.ones(2, 6, dtype=torch.bool)
    mask_b[:, 4:] = False  # two padded tokens
    out_a, _ = fusion([a.requires_grad_(), b], [None, mask_b])
    (grad_b,) = torch.autograd.grad(out_a.sum(), b)
    assert grad_b[:, :4].abs().sum() > 0  # A's output reads B's real tokens ...
    assert grad_b[:, 4:].abs().sum() == 0  # ... and never the padded ones
    out_a2, out_b2 = fusion([a, b], [None, None])
    (grad_a,) = torch.autograd.grad(out_b2.sum(), a)
    assert grad_a.abs().sum() > 0  # and B reads A: both directions


def test_the_nll_lever_lets_the_nll_gradient_reach_the_encoders() -> None:
    from pipeline.flows import data_init

    from .test_latent_models import seg_model

    b = batch()
    grads = {}
    for lam, lever in ((0.0, "true"), (1.0, "true"), (1.0, "false")):
        model = seg_model(f"model.nll_weight={lam}", f"model.nll_to_encoders={lever}")
        data_init(model, b, mode="loss")
        model(b, mode="loss")["loss"].backward()
        grads[lam, lever] = {
            k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None and k.startswith("encoders.")
        }
    moved = max(float((grads[1.0, "true"][k] - grads[0.0, "true"][k]).abs().max()) for k in grads[0.0, "true"])
    stopped = max(float((grads[1.0, "false"][k] - grads[0.0, "true"][k]).abs().max()) for k in grads[0.0, "true"])
    assert moved > 1e-5 and stopped < 1e-7  # on: the NLL trains the encoders too; off (default): it does not
