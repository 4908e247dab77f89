"""Helpers run inside a rank (in-process at world size 1, or under torchrun) by the fault suite.

``adam_matches(tag_dir)``: build the engine the training loop builds for the checkpoint's config, load the
checkpoint at *this* world size, and compare the optimizer's state (Adam's step, exp_avg, exp_avg_sq) and
the scheduler position bit for bit with what the checkpoint file holds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline import dist
from pipeline.config import from_dict
from pipeline.models import build_model
from pipeline.train import checkpoint as ckpt
from pipeline.train.engine import build_engine


def adam_matches(tag_dir: Path) -> dict:
    tag_dir = Path(tag_dir)
    state = ckpt.read_state(tag_dir)
    cfg = from_dict(state["config"])
    info = dist.init_distributed(dist.world_info_from_env(), backend="gloo", use_deepspeed=True)
    specs = [(n, tuple(s), int(b)) for n, s, b in state["modalities"]]
    model = build_model(cfg, specs)
    engine, optimizer, scheduler = build_engine(model, cfg, info.world_size)
    ckpt.load(engine, tag_dir)
    saved = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=True, map_location="cpu")
    loaded = engine.optimizer.state_dict()
    want, got = saved["optimizer"]["state"], loaded["state"]
    same = set(want) == set(got) and all(
        torch.equal(want[i][k], got[i][k]) for i in want for k in ("step", "exp_avg", "exp_avg_sq"))
    steps = sorted({int(v["step"]) for v in got.values()})
    return {"world_size": info.world_size, "same": same, "params": len(got), "adam_steps": steps,
            "scheduler_epoch": scheduler.last_epoch, "saved_scheduler_epoch": saved["lr_scheduler"]["last_epoch"]}
