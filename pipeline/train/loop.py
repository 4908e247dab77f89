"""The one train function every launcher runs: ``train_loop(cfg, reporter=None)``.

torchrun, srun, the deepspeed launcher, ``accelerate launch``, Ray Train workers and Ray Tune trials all
call this function; launchers only set the environment (see :func:`pipeline.dist.world_info_from_env`).

Order of events (each step's reason in a comment at the call site):
resolve world → process group → run dir + resolved config → model → resume target → ActNorm data init
(fresh runs only) → DeepSpeed engine → load checkpoint → loop {micro-steps, log, validate, save, signals}
→ final validation + save → summary dict (also handed to ``reporter`` at every validation).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import dist
from pipeline.config import Config, ConfigError, save_resolved, to_dict
from pipeline.flows import data_init
from pipeline.train import checkpoint as ckpt
from pipeline.train.engine import autocast, build_engine
from pipeline.train.signals import PreemptionWatch

log = logging.getLogger("pipeline.train")

# Keys that fix the architecture: a resumed run takes them from the checkpoint, and a different value in
# the new config is an error (a silent change would load weights into the wrong shapes, or worse, not fail).
ARCH_KEYS = ("task", "channels", "image_size", "levels", "blocks_per_level", "dim", "patch_size", "num_blocks",
             "tokens", "partitions", "lica_group", "form", "encoder", "num_classes")


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _device(cfg: Config, info: dist.WorldInfo) -> torch.device:
    if cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def check_architecture(saved: Mapping[str, Any], cfg: Config) -> None:
    """Raise ConfigError naming the first architecture key whose new value differs from the checkpoint's."""
    for key in ARCH_KEYS:
        old, new = saved.get("model", {}).get(key), getattr(cfg.model, key)
        if old is not None and old != new:
            raise ConfigError(
                f"model.{key}: the checkpoint was trained with {old!r} but the config says {new!r}; "
                f"architecture keys cannot change on resume (drop the override, or start a new run.dir)"
            )


class Watchdog:
    """Exit non-zero (code 3) with a message when no step completes within ``timeout_s`` (0 = off)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s, self.last = timeout_s, time.monotonic()
        self._stop = threading.Event()
        if timeout_s > 0:
            threading.Thread(target=self._run, name="train-watchdog", daemon=True).start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout_s / 4)):
            idle = time.monotonic() - self.last
            if idle > self.timeout_s:
                msg = (f"watchdog: no training step completed for {idle:.0f}s (train.watchdog_s={self.timeout_s:g}) "
                       f"on rank {dist.get_rank()}; aborting (a hung collective or data source?)")
                log.error(msg)
                print(msg, flush=True)
                os._exit(3)


class MetricsFile:
    """Rank 0 appends one JSON line per logged step to ``<run.dir>/metrics.jsonl`` (no server needed)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: Mapping[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _all_finite(loss: torch.Tensor) -> bool:
    """Collective: True only if the loss is finite on every rank (so all ranks skip the same step)."""
    flag = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
    return dist.all_reduce_sum(flag).item() == 0.0


def evaluate(engine, cfg: Config, loader, device: torch.device) -> dict[str, float]:
    """Collective exact pass: every rank calls forward the same number of times (ZeRO-3 gathers weights
    collectively inside forward), ranks whose data ran out run a throw-away forward on their last batch,
    and the sums are all-reduced — nothing counted twice, no rank waiting on another."""
    engine.eval()
    sums: dict[str, torch.Tensor] = {}
    it, last = iter(loader), None
    with torch.no_grad():
        for i in range(cfg.eval.batches or 1 << 62):
            batch = next(it, None)
            has = torch.tensor([0.0 if batch is None else 1.0])
            if dist.all_reduce_sum(has).item() == 0:
                break
            if batch is None and last is None:
                raise RuntimeError(f"rank {dist.get_rank()} has no validation data at all; use fewer ranks or more "
                                   "validation shards")
            with autocast(cfg, device):
                out = engine(_to_device(batch if batch is not None else last, device), mode="eval")
            if batch is not None:
                last = batch
                for k, v in out.items():
                    sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64)) + v.detach().double().cpu()
    engine.train()
    keys = dist.broadcast_object(sorted(sums), src=0)
    total = torch.stack([sums.get(k, torch.zeros((), dtype=torch.float64)) for k in keys]) if keys else torch.zeros(0)
    total = dist.all_reduce_sum(total)
    values = dict(zip(keys, total.tolist()))
    count = values.pop("count", 0.0)
    return {f"val_{k.removesuffix('_sum')}": v / max(count, 1.0) for k, v in values.items() if k.endswith("_sum")} | {
        "val_samples": count
    }


def train_loop(cfg: Config, reporter: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train ``cfg`` to ``train.max_steps`` (resuming per ``checkpoint.resume``); returns the last metrics.

    ``reporter`` (e.g. Ray Tune's ``tune.report``) receives the validation metrics every ``eval.every``
    steps on every rank. Exits the process with 0 / 143 after a SIGUSR2 / SIGTERM-triggered save.
    """
    from pipeline.data import build_eval_loader, build_train_loader, load_manifest
    from pipeline.models import build_model, modality_specs
    from pipeline.tracking import MlflowTracker

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    info = dist.init_distributed(dist.world_info_from_env(), use_deepspeed=True)
    rank0 = info.rank == 0
    device = _device(cfg, info)
    run_dir = Path(cfg.run.dir)
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir / "config.yaml")
    dist.barrier()

    train_manifest = load_manifest(cfg.data.shards, cfg.data.train_split)
    val_manifest = load_manifest(cfg.data.shards, cfg.data.val_split)
    _seed_all(cfg.run.seed)  # identical initial weights on every rank
    specs = modality_specs(cfg, train_manifest)
    model = build_model(cfg, specs).to(device)

    resume_from = ckpt.resolve_resume(cfg.checkpoint.resume, run_dir)
    if resume_from is not None:
        saved = ckpt.read_state(resume_from)
        check_architecture(saved["config"], cfg)
        if saved["world_size"] != info.world_size:
            raise RuntimeError(
                f"checkpoint {resume_from} was written by {saved['world_size']} ranks, this run has "
                f"{info.world_size}. Resume at the same world size, or continue at a new size from consolidated "
                f"weights: python -m jobs.consolidate {resume_from} --out model.safetensors, then "
                f"model.init_weights=model.safetensors checkpoint.resume= (fresh optimizer)"
            )

    loader_state = None
    train_loader = build_train_loader(train_manifest, cfg.data.batch_size, rank=info.rank,
                                      world_size=info.world_size, num_workers=cfg.data.num_workers,
                                      seed=cfg.run.seed)
    batches = iter(train_loader)
    first = None
    if resume_from is None:
        # ActNorm's data-dependent init runs here, before DeepSpeed wraps (and under ZeRO-3 partitions) the
        # model; the statistics are all-reduced, so every rank ends with identical parameters.
        first = next(batches)
        with autocast(cfg, device):
            data_init(model, _to_device(first, device), mode="loss")

    engine, optimizer, scheduler = build_engine(model, cfg, info.world_size)
    step = 0
    if resume_from is not None:
        client, mine = ckpt.load(engine, resume_from)
        step = int(client["step"])
        loader_state = mine.get("loader")
        if loader_state is not None:
            train_loader.load_state_dict(loader_state)
            batches = iter(train_loader)
        if "rng" in mine:
            ckpt.set_rng_state(mine["rng"])
    else:
        _seed_all(cfg.run.seed * 1000 + info.rank + 1)  # per-rank noise (dequantisation) from here on

    tracker = MlflowTracker.from_config(cfg, run_dir) if rank0 and cfg.tracking.enabled else None
    if tracker is not None:
        tracker.set_tags({"data.train_manifest_sha256": train_manifest.checksum(),
                          "data.val_manifest_sha256": val_manifest.checksum()})
    metrics_file = MetricsFile(run_dir / "metrics.jsonl", rank0)
    watch = PreemptionWatch()
    watchdog = Watchdog(cfg.train.watchdog_s)

    def save(at: int) -> None:
        shared = {"step": at, "config": to_dict(cfg), "world_size": info.world_size, "modalities": specs}
        ckpt.save(engine, run_dir, at, shared, {"loader": train_loader.state_dict()}, cfg.checkpoint.keep)

    def eval_loader():
        return build_eval_loader(val_manifest, cfg.data.batch_size, rank=info.rank, world_size=info.world_size,
                                 num_workers=cfg.data.num_workers)

    last: dict[str, Any] = {}
    nonfinite, skipped_total = 0, 0
    progress = None
    if rank0:
        from tqdm import tqdm

        progress = tqdm(total=cfg.train.max_steps, initial=step, desc="train", dynamic_ncols=True)
    tick, samples = time.monotonic(), 0
    engine.train()
    while step < cfg.train.max_steps:
        batch = first if first is not None else next(batches)
        first = None
        with autocast(cfg, device):
            out = engine(_to_device(batch, device), mode="loss")
        loss = out["loss"]
        if not _all_finite(loss):
            nonfinite += 1
            skipped_total += 1
            log.warning("step %d: non-finite loss on some rank; micro-batch skipped (%d in a row)", step, nonfinite)
            if nonfinite >= cfg.train.max_nonfinite:
                raise FloatingPointError(
                    f"{nonfinite} non-finite losses in a row (train.max_nonfinite={cfg.train.max_nonfinite}) at step "
                    f"{step}: lower optim.lr, check the data, or resume from an earlier checkpoint")
            continue
        nonfinite = 0
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        samples += next(iter(batch.values())).shape[0] * info.world_size
        if not boundary:
            continue
        step += 1
        watchdog.beat()
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            now = time.monotonic()
            norm = engine.get_global_grad_norm()
            last = {"step": step, "loss": loss.item(),
                    **{k: v.item() for k, v in out.items() if k != "loss"},
                    "lr": scheduler.get_last_lr()[0], "grad_norm": float(norm) if norm is not None else float("nan"),
                    "samples_per_s": samples / max(now - tick, 1e-9), "skipped_steps": skipped_total}
            tick, samples = now, 0
            metrics_file.write(last)
            if tracker is not None:
                tracker.log_metrics({k: v for k, v in last.items() if k != "step"}, step)
            if progress is not None:
                progress.set_postfix(loss=f"{last['loss']:.4f}", sps=f"{last['samples_per_s']:.1f}")
        if progress is not None:
            progress.update(1)
        if step % cfg.eval.every == 0 or step == cfg.train.max_steps:
            val = evaluate(engine, cfg, eval_loader(), device)
            last |= val | {"step": step}
            metrics_file.write({"step": step, **val})
            if tracker is not None:
                tracker.log_metrics(val, step)
            if reporter is not None:
                reporter(dict(last))
        if step % cfg.checkpoint.every == 0 or step == cfg.train.max_steps:
            save(step)
        code = watch.exit_code()
        if code is not None:
            if step % cfg.checkpoint.every and step != cfg.train.max_steps:
                save(step)
            log.warning("received %s: saved step %d, exiting with %d", watch.received, step, code)
            _finish(tracker, progress, watchdog, watch, status="KILLED" if code else "FINISHED")
            raise SystemExit(code)
    _finish(tracker, progress, watchdog, watch, status="FINISHED", run_dir=run_dir if rank0 else None)
    return last


def _finish(tracker, progress, watchdog: Watchdog, watch: PreemptionWatch, status: str, run_dir: Path | None = None) -> None:
    watchdog.stop()
    watch.restore()
    if progress is not None:
        progress.close()
    if tracker is not None:
        if run_dir is not None:
            tracker.log_run_files(run_dir)
        tracker.end(status)
