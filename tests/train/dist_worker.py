"""Run under torchrun (or plain python for the 1-rank reference) by tests/train/test_distributed.py.

``python dist_worker.py equivalence OUT.json STAGE[:MEMORY][,…]`` trains the tiny density model on a fixed
sequence of *global* batches (each rank takes its slice; inputs are pre-dequantised so no per-rank noise
enters) through the real ``build_model`` / ``data_init`` / ``build_engine`` path, and rank 0 writes the
global per-step losses per ZeRO stage (and ``model.memory``, default store) to OUT.json.
"""

from __future__ import annotations

import json
import sys
import warnings

import torch

from pipeline import dist
from pipeline.config import load_config
from pipeline.flows import data_init
from pipeline.models import build_model
from pipeline.train.engine import build_engine

GLOBAL_BATCH, STEPS, SIZE = 8, 10, 8
SPECS = [("rgb.png", (3, SIZE, SIZE), 8), ("right.png", (3, SIZE, SIZE), 8)]
TINY = [
    "model.image_size=8",
    "model.levels=2",
    "model.blocks_per_level=1",
    "model.dim=16",
    "model.patch_size=2",
    "model.lica_group=0",
    "optim.lr=3e-3",
    "optim.warmup_steps=2",
    "train.max_steps=10",
    "optim.grad_clip=1.0",
]


def global_batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(STEPS + 1):
        v = torch.randint(0, 256, (2, GLOBAL_BATCH, 3, SIZE, SIZE), generator=gen).double()
        # a smooth pattern plus noise, so there is something to learn
        v = (v * 0.3 + 90 * (1 + torch.linspace(-1, 1, SIZE)).view(1, 1, 1, 1, SIZE)).clamp(0, 255).floor()
        u = torch.rand(v.shape, generator=gen, dtype=torch.float64)
        out.append(((v + u) / 256 - 0.5).float())
    return out


def equivalence(path: str, stages: list[str]) -> None:
    info = dist.init_distributed(dist.world_info_from_env(), use_deepspeed=True)
    rank, world = info.rank, info.world_size
    local_bs = GLOBAL_BATCH // world
    results: dict[str, list[float]] = {}
    for spec in stages:
        stage, _, memory = spec.partition(":")
        cfg = load_config(
            None,
            TINY
            + [f"deepspeed.zero_stage={stage}", f"data.batch_size={local_bs}", f"model.memory={memory or 'store'}"],
        )
        torch.manual_seed(0)
        model = build_model(cfg, SPECS)
        batches = global_batches()

        def local(gb: torch.Tensor) -> dict[str, torch.Tensor]:
            part = gb[:, rank * local_bs : (rank + 1) * local_bs]
            return {"rgb.png": part[0], "right.png": part[1]}

        data_init(model, local(batches[0]), mode="loss")  # statistics all-reduced: same as one rank's
        engine, _, _ = build_engine(model, cfg, world)
        losses = []
        for gb in batches[1:]:
            loss = engine(local(gb), mode="loss")["loss"]
            engine.backward(loss)
            engine.step()
            losses.append(dist.all_reduce_sum(loss.detach().clone().double()).item() / world)
        results[f"zero{spec}"] = losses
    if rank == 0:
        with open(path, "w") as f:
            json.dump({"world_size": world, **results}, f)
    dist.barrier()


def fixed_eval_batch() -> dict[str, torch.Tensor]:
    """A deterministic, pre-dequantised batch of two 8×8 RGB views (no noise drawn by the model)."""
    gb = global_batches()[0]
    return {"rgb.png": gb[0], "right.png": gb[1]}


def outputs(path: str, tag_dir: str) -> None:
    """Load a checkpoint into a fresh engine at its ZeRO stage and write its bits/dim on the fixed batch."""
    from pathlib import Path

    from pipeline.config import from_dict
    from pipeline.train import checkpoint as ckpt

    info = dist.init_distributed(dist.world_info_from_env(), use_deepspeed=True)
    state = ckpt.read_state(Path(tag_dir))
    cfg = from_dict(state["config"])
    model = build_model(cfg, [(k, tuple(s), b) for k, s, b in state["modalities"]])
    engine, _, _ = build_engine(model, cfg, info.world_size)
    ckpt.load(engine, Path(tag_dir))
    engine.eval()
    with torch.no_grad():
        out = engine(fixed_eval_batch(), mode="eval")
    if info.rank == 0:
        with open(path, "w") as f:
            json.dump({"bits_per_dim": (out["bits_per_dim_sum"] / out["count"]).item()}, f)
    dist.barrier()


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=FutureWarning)
    mode = sys.argv[1]
    if mode == "equivalence":
        equivalence(sys.argv[2], sys.argv[3].split(","))
    elif mode == "outputs":
        outputs(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    dist.barrier()
    dist.cleanup()  # not left to interpreter shutdown, where gloo's threads can abort a finished rank
