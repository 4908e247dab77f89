"""A latent task through the real training spine: shards → ActNorm init → DeepSpeed train_loop → validation
sums → consolidation → ``load_model`` predicting what the trained engine predicted; and every shipped task
recipe resolving to a buildable layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.data import build_eval_loader, load_manifest, write_split
from pipeline.models import _flow_kwargs, _grid, modality_specs, task_layout
from pipeline.train.consolidate import consolidate, load_model
from pipeline.train.loop import train_loop

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "launch" / "configs"


def test_segmentation_trains_consolidates_and_reloads(tmp_path):
    shards = tmp_path / "scenes"
    for split, n in (("train", 16), ("val", 4)):
        write_split(
            "embedded",
            "scenes",
            str(shards),
            split,
            options={"size": 16, "scenes": n, "view": "top"},
            samples_per_shard=8 if split == "train" else 2,
            progress=False,
        )
    cfg = load_config(
        CONFIGS / "segmentation_demo.yaml",
        [
            f"data.shards={shards}",
            f"run.dir={tmp_path / 'run'}",
            "model.image_size=16",
            "model.num_blocks=1",
            "model.dim=16",
            "train.max_steps=4",
            "optim.warmup_steps=1",
            "eval.every=4",
            "checkpoint.every=4",
            "train.log_every=2",
            "tracking.enabled=false",
            "data.batch_size=4",
        ],
    )
    result = train_loop(cfg)
    assert result["val_samples"] == 4.0 and 0.0 <= result["val_miou"] <= 1.0
    assert {"task_loss", "nll", "val_task_loss", "val_nll"} <= set(result)
    weights = consolidate(tmp_path / "run", tmp_path / "model.safetensors")
    model, loaded_cfg = load_model(weights)
    assert loaded_cfg.model.task == "segmentation"
    norms = [m for m in model.modules() if type(m).__name__ == "ActNorm"]
    assert norms and all(bool(m.initialized) for m in norms)  # data init happened before the engine, and was saved
    manifest = load_manifest(str(shards / "manifest-val.json"))
    batch = next(
        iter(
            build_eval_loader(
                manifest,
                4,
                rank=0,
                world_size=1,
                num_workers=0,
                modalities=tuple(s[0] for s in modality_specs(cfg, manifest)),
            )
        )
    )
    with torch.no_grad():
        pred = model(batch, mode="predict")["pred"]
        again = load_model(weights)[0](batch, mode="predict")["pred"]
    assert pred.shape == (4, 16, 16) and torch.equal(pred, again)


SPECS = {
    "nyudv2": [("rgb.png", (3, 480, 640), 8), ("depth.png", (1, 480, 640), 16), ("label.png", (480, 640), 8)],
    "sunrgbd": [("rgb.png", (3, None, None), 8), ("depth.png", (1, None, None), 16), ("label.png", (None, None), 8)],
    "taskonomy": [
        ("reshading.png", (3, None, None), 8),
        ("edge_texture.png", (1, None, None), 16),
        ("rgb.png", (3, None, None), 8),
    ],
    "mmimdb": [("rgb.png", (3, 256, 256), 8), ("text.txt", (), 0), ("labels.npy", (23,), 8)],
    "segmentation_demo": [("rgb.png", (3, 32, 32), 8), ("depth.png", (1, 32, 32), 16), ("label.png", (32, 32), 8)],
    "translation_demo": [("rgb.png", (3, 16, 16), 8), ("depth.png", (1, 16, 16), 16), ("right.png", (3, 16, 16), 8)],
    "classification_demo": [("rgb.png", (3, 32, 32), 8), ("text.txt", (), 0), ("labels.npy", (23,), 8)],
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_task_recipes_resolve_to_a_two_modality_layout(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    inputs, target = task_layout(cfg, SPECS[name])
    assert len(inputs) == 2 and target.key.split(".")[0] in cfg.data.modalities
    gh, gw = _grid(cfg)
    kwargs = _flow_kwargs(cfg, 2 * gh * gw, cfg.model.memory)
    assert kwargs["num_blocks"] == cfg.model.num_blocks
    assert cfg.eval.metric in {"val_miou", "val_mae", "val_macro_f1", "val_micro_f1"}
