"""The trainer's resume phase: which checkpoint (if any) a run continues, and whether it may.

A fresh run refuses a run directory that already holds checkpoints; a resumed one refuses a changed
architecture key (declared per field in the config schema) and a resize that changes the ZeRO stage. A
resize at ZeRO 0 reloads the replicated state directly; at ZeRO 1–3 rank 0 converts the checkpoint once into
a DeepSpeed universal checkpoint next to it. The data cursor and RNG streams are then re-derived for the new
world size (:meth:`pipeline.data.loader.LoaderState.resplit`, :func:`pipeline.train.state.rank_seed`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline import dist
from pipeline.config import Config, ConfigError, architecture_keys
from pipeline.data.loader import LoaderState
from pipeline.train import checkpoint as ckpt
from pipeline.train.consolidate import read_weights
from pipeline.train.remote import download, latest_remote

log = logging.getLogger("pipeline.train")

# Keys that fix the architecture (declared per field in ModelConfig): a resumed run takes them from the checkpoint,
# and a different value in the new config is an error (a silent change would load weights into the wrong shapes,
# or worse, not fail).
ARCH_KEYS = architecture_keys()


@dataclass
class ResumePoint:
    """What the run continues from: nothing (fresh), or a complete checkpoint and how to load it."""

    tag_dir: Path | None = None
    saved: dict[str, Any] = field(default_factory=dict)  # the checkpoint's shared state (state.json)
    mine: dict[str, Any] = field(default_factory=dict)  # this rank's trainer state (cursor, RNG, EMA)
    resized: bool = False

    @property
    def universal(self) -> bool:
        """Load through the universal checkpoint (a resize at ZeRO ≥ 1)."""
        return self.resized and self.saved["config"]["deepspeed"]["zero_stage"] > 0


def check_architecture(saved: Mapping[str, Any], cfg: Config) -> None:
    """Raise ConfigError naming the first architecture key whose new value differs from the checkpoint's (and
    ``optim.new_lr_mult`` switched on or off: it changes the optimizer's parameter groups, which the saved state
    must match)."""
    for key in ARCH_KEYS:
        old, new = saved.get("model", {}).get(key), getattr(cfg.model, key)
        if old is not None and old != new:
            raise ConfigError(
                f"model.{key}: the checkpoint was trained with {old!r} but the config says {new!r}; "
                f"architecture keys cannot change on resume (drop the override, or start a new run.dir)"
            )
    old_mult = saved.get("optim", {}).get("new_lr_mult", 1.0)
    if (old_mult == 1.0) != (cfg.optim.new_lr_mult == 1.0):
        raise ConfigError(
            f"optim.new_lr_mult: the checkpoint was trained with {old_mult!r} but the config says "
            f"{cfg.optim.new_lr_mult!r}; turning the new-parts learning rate on or off changes the optimizer's "
            f"parameter groups, which the saved optimizer state must match (keep it, or start a new run.dir)"
        )


def find(cfg: Config, run_dir: Path, info: dist.WorldInfo) -> ResumePoint:
    """Collective: the checkpoint this run continues (fetched from ``checkpoint.remote`` onto an empty disk),
    checked against the config; a fresh run in a directory with checkpoints is refused."""
    if cfg.checkpoint.resume == "latest" and cfg.checkpoint.remote:
        _fetch_remote_latest(cfg.checkpoint.remote, run_dir, info)
    tag_dir = ckpt.resolve_resume(cfg.checkpoint.resume, run_dir)
    if tag_dir is None:
        # A fresh run would overwrite tags that still carry an old COMPLETE marker (a kill mid-overwrite would
        # then leave a "complete" checkpoint of mixed files): refuse instead, on every rank alike.
        existing = dist.broadcast_object(str(ckpt.latest_complete(run_dir) or "") if info.rank == 0 else None, src=0)
        if existing:
            raise ConfigError(
                f"run.dir={str(run_dir)!r} already holds checkpoints (newest {Path(existing).name}): "
                "continue that run with checkpoint.resume=latest, or choose a new run.dir"
            )
        return ResumePoint()
    saved = ckpt.read_state(tag_dir)
    check_architecture(saved["config"], cfg)
    point = ResumePoint(tag_dir, saved, resized=saved["world_size"] != info.world_size)
    if point.resized:
        if _check_elastic(saved, cfg, info, tag_dir) == "universal":
            _convert_once(tag_dir, info)
        point.mine = ckpt.safe_load(tag_dir / "trainer-rank0.pt")  # cursors are equal (lockstep): rank 0's
    else:
        point.mine = ckpt.read_rank_state(tag_dir)
    return point


def restore_cursor(point: ResumePoint, cfg: Config, info: dist.WorldInfo, total_samples: int) -> LoaderState:
    """The data cursor to continue from (re-split over the new ranks after a resize)."""
    state = LoaderState(seed=cfg.run.seed)
    if point.tag_dir is None:
        return state
    state.load_state_dict(point.mine["loader"])
    if point.resized:
        state.resplit(point.saved["world_size"], info.world_size, total_samples, cfg.data.batch_size)
        log.warning(
            "resuming %s (written by %d ranks) on %d ranks: weights, optimizer moments, step and "
            "schedule reloaded; data cursor re-split to epoch %d batch %d per rank",
            point.tag_dir,
            point.saved["world_size"],
            info.world_size,
            state.epoch,
            state.batches,
        )
    return state


def _convert_once(tag_dir: Path, info: dist.WorldInfo) -> None:
    """ZeRO 1–3: rank 0 converts once (DeepSpeed universal checkpoint) while the others wait; the verdict is
    broadcast, so a failed conversion stops every rank alike."""
    error = ""
    if info.rank == 0:
        try:
            ckpt.universal_checkpoint(tag_dir)
        except ckpt.CheckpointError as e:
            error = str(e)
    error = dist.broadcast_object(error, src=0)
    if error:
        raise ckpt.CheckpointError(error)


def _check_elastic(saved: Mapping[str, Any], cfg: Config, info: dist.WorldInfo, tag_dir: Path) -> str:
    """How a checkpoint resumes at a different world size: ZeRO-0 state is replicated and reloads directly
    ("direct"); ZeRO 1–3 through a DeepSpeed universal checkpoint ("universal") at the same stage."""
    old_stage = saved["config"]["deepspeed"]["zero_stage"]
    if old_stage == cfg.deepspeed.zero_stage:
        return "direct" if old_stage == 0 else "universal"
    raise ConfigError(
        f"checkpoint {tag_dir} was written by {saved['world_size']} ranks at ZeRO-{old_stage}, this run has "
        f"{info.world_size} ranks at ZeRO-{cfg.deepspeed.zero_stage}: a resize keeps the ZeRO stage (set "
        f"deepspeed.zero_stage={old_stage}). Or continue from consolidated weights with a fresh optimizer: "
        f"python -m jobs.consolidate {tag_dir} --out model.safetensors, then train with "
        f"model.init_weights=model.safetensors checkpoint.resume= and a new run.dir"
    )


def _fetch_remote_latest(remote: str, run_dir: Path, info: dist.WorldInfo) -> None:
    """A new node with an empty disk: fetch the newest complete remote checkpoint before resolving resume.

    Rank 0 decides (local checkpoint present → nothing to fetch; else the remote's newest complete tag) and
    broadcasts the tag, so every node fetches the same one; each node's local rank 0 downloads it.
    """
    tag = None
    if info.rank == 0 and ckpt.latest_complete(run_dir) is None:
        tag = latest_remote(remote)
    tag = dist.broadcast_object(tag, src=0)
    if tag is not None and info.local_rank == 0:
        log.warning("no local checkpoint in %s: fetching %s/%s", run_dir, remote, tag)
        download(remote, tag, run_dir)
    dist.barrier()


def load_init_weights(model: torch.nn.Module, path: str) -> None:
    """Start from consolidated weights (``jobs.consolidate``), e.g. to continue at a new world size."""
    state = read_weights(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"model.init_weights={path!r} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def set_aside(path: Path) -> Path | None:
    """Rename an earlier run's ``metrics.jsonl`` (or ``keys/`` directory) to ``metrics.<n>.jsonl`` (``keys.<n>``),
    first free n, with one warning; nothing to do when it is missing or empty."""
    if not path.exists() or (path.stat().st_size == 0 if path.is_file() else not any(path.iterdir())):
        return None
    n = 1
    while (target := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    os.replace(path, target)
    log.warning(
        "fresh start in %s: the earlier %s (no checkpoint to resume from) was moved to %s",
        path.parent,
        path.name,
        target.name,
    )
    return target
