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
    engine, _, scheduler = build_engine(model, cfg, info.world_size)
    ckpt.load(engine, tag_dir)
    saved = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=True, map_location="cpu")
    loaded = engine.optimizer.state_dict()
    want, got = saved["optimizer"]["state"], loaded["state"]
    same = set(want) == set(got) and all(
        torch.equal(want[i][k], got[i][k]) for i in want for k in ("step", "exp_avg", "exp_avg_sq")
    )
    steps = sorted({int(v["step"]) for v in got.values()})
    return {
        "world_size": info.world_size,
        "same": same,
        "params": len(got),
        "adam_steps": steps,
        "scheduler_epoch": scheduler.last_epoch,
        "saved_scheduler_epoch": saved["lr_scheduler"]["last_epoch"],
    }


def adam_matches_universal(tag_dir: Path) -> dict:
    """ZeRO 1–3 at any world size: convert ``tag_dir`` (once) to a universal checkpoint, load it through the
    training loop's path, and compare each parameter's Adam state (gathered from this rank's partitions)
    with the converter's per-parameter files, which hold the state the checkpoint saved."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    tag_dir = Path(tag_dir)
    state = ckpt.read_state(tag_dir)
    cfg = from_dict(state["config"])
    info = dist.init_distributed(dist.world_info_from_env(), backend="gloo", use_deepspeed=True)
    if info.rank == 0:
        ckpt.universal_checkpoint(tag_dir)
    dist.barrier()
    specs = [(n, tuple(s), int(b)) for n, s, b in state["modalities"]]
    engine, _, scheduler = build_engine(build_model(cfg, specs), cfg, info.world_size)
    client = ckpt.load_universal(engine, tag_dir)
    zero = tag_dir.parent / ckpt.UNIVERSAL / tag_dir.name / "zero"
    compared, same, steps = 0, True, set()
    for name, p in engine.module.named_parameters():
        for key in ("exp_avg", "exp_avg_sq", "fp32"):
            f = zero / name / f"{key}.pt"
            if not f.exists():
                continue
            want = _tensor(f).reshape(-1)
            got = (safe_get_full_fp32_param(p) if key == "fp32" else safe_get_full_optimizer_state(p, key)).reshape(-1)
            same = same and torch.equal(want, got.to(want.dtype))
            compared += 1
        if (zero / name / "step.pt").exists():
            steps.add(_step(zero / name / "step.pt"))
    steps = steps or set(_global_steps(zero))
    return {
        "world_size": info.world_size,
        "same": same,
        "compared": compared,
        "saved_steps": sorted(steps),
        "client_step": int(client["step"]),
        "scheduler_epoch": scheduler.last_epoch,
    }


def universal_steps(tag_dir: Path) -> list[int]:
    """Adam's per-parameter step counts stored in a ZeRO 1–3 checkpoint (read through its conversion)."""
    conv = ckpt.universal_checkpoint(Path(tag_dir))
    return sorted({_step(f) for f in (conv / "zero").glob("*/step.pt")} or set(_global_steps(conv / "zero")))


def _global_steps(zero: Path) -> list[int]:
    """ZeRO-3 conversions keep one step for all parameters in zero/optimizer_state.pt."""
    f = zero / "optimizer_state.pt"
    if not f.exists():
        return []
    sd = torch.load(f, weights_only=False)["optimizer_state_dict"]  # written by the converter just now
    return sorted({int(v["step"]) for v in sd["state"].values() if "step" in v})


def _tensor(f: Path) -> torch.Tensor:
    """A converter file: ``{"param": tensor}`` (ZeRO 1–2 conversions) or the bare tensor (ZeRO-3, step.pt)."""
    v = torch.load(f, weights_only=True)
    return v["param"] if isinstance(v, dict) else v


def _step(f: Path) -> int:
    return int(_tensor(f))
