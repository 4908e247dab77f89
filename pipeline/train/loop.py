"""The one train function every launcher runs: ``train_loop(cfg, reporter=None)``.

torchrun, srun, the deepspeed launcher, ``accelerate launch``, Ray Train workers and Ray Tune trials all
call this function; launchers only set the environment (see :func:`pipeline.dist.world_info_from_env`).

Order of events (each step's reason in a comment at the call site):
resolve world → process group → run dir + resolved config → model → resume target → ActNorm data init
(fresh runs only) → DeepSpeed engine → load checkpoint → loop {micro-steps, log, validate, save, signals}
→ final validation + save → summary dict (also handed to ``reporter`` at every validation).
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import dist
from pipeline.config import Config, ConfigError, architecture_keys, save_resolved, to_dict
from pipeline.flows import data_init
from pipeline.flows.plan import decide_plan
from pipeline.metrics import finalize
from pipeline.train import checkpoint as ckpt
from pipeline.train.ema import WeightEMA
from pipeline.train.engine import autocast, build_engine
from pipeline.train.remote import RemoteSync, download, latest_remote
from pipeline.train.signals import PreemptionWatch
from pipeline.train.speed import SpeedMeter, count_step_flops

log = logging.getLogger("pipeline.train")

# Keys that fix the architecture (declared per field in ModelConfig): a resumed run takes them from the checkpoint,
# and a different value in the new config is an error (a silent change would load weights into the wrong shapes,
# or worse, not fail).
ARCH_KEYS = architecture_keys()


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
                msg = (
                    f"watchdog: no training step completed for {idle:.0f}s (train.watchdog_s={self.timeout_s:g}) "
                    f"on rank {dist.get_rank()}; aborting (a hung collective or data source?)"
                )
                log.error(msg)
                print(msg, flush=True)
                os._exit(3)


def _grad_norm(engine) -> float:
    """Global gradient norm before clipping. DeepSpeed records it only for ZeRO ≥ 1; at stage 0 the
    gradients are already all-reduced after ``backward`` and live in ``p.grad``."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else float("nan")


def _forever(loader):
    """Epoch after epoch of a training loader (its state advances the epoch). The loaders never draw from
    the global torch RNG (their DataLoaders have their own generators), so the model's dequantisation noise
    stream is the same in a fresh and a resumed run."""
    while True:
        yield from loader


def _all_finite(loss: torch.Tensor) -> bool:
    """Collective: True only if the loss is finite on every rank (so all ranks skip the same step)."""
    flag = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
    return dist.all_reduce_sum(flag).item() == 0.0


def evaluate(engine, cfg: Config, loader, device: torch.device) -> dict[str, float]:
    """Collective exact pass over the validation split; returns ``val_`` + :func:`pipeline.metrics.finalize`.

    The loader keeps ranks in step (padding batches flagged ``__valid__ = False`` once a rank runs out), so
    every rank calls forward equally often — ZeRO-3 gathers weights collectively inside forward — and the
    models weight their sums by ``__valid__``. The eval outputs are sums of any shape (a (K, K) confusion
    matrix, (K,) label counts, scalars); they are accumulated in float64 (integer counts stay exact below
    2^53), flattened into one vector, all-reduced once and split back, so the split-level metric is computed
    from the whole split's sums — never a mean of per-rank or per-batch metrics.
    """
    engine.eval()
    sums: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i, batch in enumerate(loader):
            with autocast(cfg, device):
                out = engine(_to_device(batch, device), mode="eval")
            for k, v in out.items():
                v = v.detach().double().cpu()
                if k in sums and sums[k].shape != v.shape:
                    raise ValueError(
                        f"evaluate: eval output {k!r} changed shape from {tuple(sums[k].shape)} "
                        f"to {tuple(v.shape)} between batches"
                    )
                sums[k] = sums[k] + v if k in sums else v
            if cfg.eval.batches and i + 1 >= cfg.eval.batches:
                break
    engine.train()
    # rank 0 names the keys and shapes; a rank that saw no batch contributes zeros of those shapes
    layout = dist.broadcast_object([(k, tuple(sums[k].shape)) for k in sorted(sums)], src=0)
    flat = [
        sums[k].reshape(-1) if k in sums else torch.zeros(math.prod(shape), dtype=torch.float64) for k, shape in layout
    ]
    total = dist.all_reduce_sum(torch.cat(flat)) if flat else torch.zeros(0, dtype=torch.float64)
    reduced = dict(
        zip(
            (k for k, _ in layout),
            (t.reshape(shape) for t, (_, shape) in zip(total.split([math.prod(s) for _, s in layout]), layout)),
        )
    )
    count = float(reduced["count"]) if "count" in reduced else 0.0
    if count <= 0:
        raise RuntimeError(
            f"evaluate: the validation pass saw no valid sample (split {cfg.data.val_split!r}, "
            f"eval.batches={cfg.eval.batches}); check the val shards"
        )
    metrics = finalize(cfg.model.task, reduced)
    return {f"val_{k}": v for k, v in metrics.items()} | {"val_samples": count}


def train_loop(cfg: Config, reporter: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train ``cfg`` to ``train.max_steps`` (resuming per ``checkpoint.resume``); returns the last metrics.

    ``reporter`` (e.g. Ray Tune's ``tune.report``) receives the metrics dict at every validation, on every
    rank, after that step's checkpoint (if one is due) is complete. After a SIGUSR2 / SIGTERM-triggered save the process exits with 0 / 143 (``SystemExit``).
    A fresh run validates once before its first step (logged at step 0: the "before" figure).
    """
    from pipeline.data import LoaderState, build_eval_loader, build_train_loader
    from pipeline.data.verify import preflight
    from pipeline.models import build_model, modality_specs
    from pipeline.tracking import MetricsLog, MlflowTracker

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    world = dist.world_info_from_env()
    device = _device(cfg, world)
    # bad data is refused here, before any process group starts (DataError: one line, jobs.train exits 2)
    train_split, val_split = preflight(
        cfg.data.shards,
        cfg.data.train_split,
        cfg.data.val_split,
        batch_size=cfg.data.batch_size,
        world_size=world.world_size,
        verify=cfg.data.verify,
        max_bad_fraction=cfg.data.max_bad_fraction,
    )
    # the backend follows the device the run asked for (nccl only for CUDA runs), not what the node has
    # a group this call starts, it also destroys on the way out (a launcher's or Ray Train's group is theirs)
    owned = not dist.is_initialized()
    info = dist.init_distributed(
        world,
        backend="nccl" if device.type == "cuda" else "gloo",
        use_deepspeed=True,
        timeout_s=cfg.train.collective_timeout_s,
    )
    rank0 = info.rank == 0
    run_dir = Path(cfg.run.dir)
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir / "config.yaml")
    dist.barrier()

    # the committed manifests identify the data (tags); the loaders read only the shards that passed preflight
    train_manifest, val_manifest = train_split.manifest, val_split.manifest
    specs = modality_specs(cfg, train_manifest)
    keys = tuple(s[0] for s in specs)
    _seed_all(cfg.run.seed)  # identical initial weights on every rank
    model = build_model(cfg, specs).to(device)
    plan = decide_plan(cfg, device)  # how the flows run: decided once here, logged once
    plan.apply(model)
    if rank0:
        log.info("%s", plan.describe(model))

    if cfg.checkpoint.resume == "latest" and cfg.checkpoint.remote:
        _fetch_remote_latest(cfg.checkpoint.remote, run_dir, info)
    resume_from = ckpt.resolve_resume(cfg.checkpoint.resume, run_dir)
    if resume_from is None:
        # A fresh run would overwrite tags that still carry an old COMPLETE marker (a kill mid-overwrite would
        # then leave a "complete" checkpoint of mixed files): refuse instead, on every rank alike.
        existing = dist.broadcast_object(str(ckpt.latest_complete(run_dir) or "") if rank0 else None, src=0)
        if existing:
            raise ConfigError(
                f"run.dir={str(run_dir)!r} already holds checkpoints (newest {Path(existing).name}): "
                "continue that run with checkpoint.resume=latest, or choose a new run.dir"
            )
    saved: dict[str, Any] = {}
    mine: dict[str, Any] = {}  # this rank's trainer state in the checkpoint (loader cursor, RNG states, EMA)
    loader_state = LoaderState(seed=cfg.run.seed)
    if resume_from is not None:
        saved = ckpt.read_state(resume_from)
        check_architecture(saved["config"], cfg)
        resized = saved["world_size"] != info.world_size
        if resized:
            if _check_elastic(saved, cfg, info, resume_from) == "universal":
                # ZeRO 1–3: rank 0 converts once (DeepSpeed universal checkpoint) while the others wait; the
                # verdict is broadcast, so a failed conversion stops every rank alike
                error = ""
                if rank0:
                    try:
                        ckpt.universal_checkpoint(resume_from)
                    except ckpt.CheckpointError as e:
                        error = str(e)
                error = dist.broadcast_object(error, src=0)
                if error:
                    raise ckpt.CheckpointError(error)
            # the ranks' cursors are equal (lockstep); rank 0's is re-split over the new ranks
            mine = ckpt.safe_load(resume_from / "trainer-rank0.pt")
            loader_state.load_state_dict(mine["loader"])
            loader_state.resplit(
                saved["world_size"], info.world_size, train_split.usable.total_samples, cfg.data.batch_size
            )
            log.warning(
                "resuming %s (written by %d ranks) on %d ranks: weights, optimizer moments, step and "
                "schedule reloaded; data cursor re-split to epoch %d batch %d per rank",
                resume_from,
                saved["world_size"],
                info.world_size,
                loader_state.epoch,
                loader_state.batches,
            )
        else:
            mine = ckpt.read_rank_state(resume_from)
            loader_state.load_state_dict(mine["loader"])
    elif cfg.model.init_weights:
        load_init_weights(model, cfg.model.init_weights)

    train_loader = build_train_loader(
        train_split.usable,
        cfg.data.batch_size,
        rank=info.rank,
        world_size=info.world_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.run.seed,
        state=loader_state,
        modalities=keys,
        verify=cfg.data.verify,
    )
    batches = _forever(train_loader)
    first = None
    if resume_from is None and not cfg.model.init_weights:
        # ActNorm's data-dependent init runs here, before DeepSpeed wraps (and under ZeRO-3 partitions) the
        # model; the statistics are all-reduced, so every rank ends with identical parameters. The batch is
        # then trained on as the first step.
        first = next(batches)
        with autocast(cfg, device):
            data_init(model, _to_device(first, device), mode="loss")

    if first is None:
        first = next(batches)  # the FLOP count's sample; trained on as the first step
    # model FLOPs for achieved_tflops / mfu: counted once, on a copy, before DeepSpeed wraps or partitions the model
    flops = count_step_flops(model, first, lambda: autocast(cfg, device), device)
    if rank0:
        log.info(
            "model FLOPs of a forward + backward (no recompute): %.4g + %.4g per sample; bf16 share %.3f",
            flops.fixed,
            flops.per_sample,
            flops.bf16_share,
        )
    engine, _, scheduler = build_engine(model, cfg, info.world_size)
    step, skipped_total = 0, 0
    ema = WeightEMA(engine.module, cfg.optim.ema) if cfg.optim.ema else None
    if resume_from is not None:
        universal = resized and saved["config"]["deepspeed"]["zero_stage"] > 0
        client = ckpt.load_universal(engine, resume_from) if universal else ckpt.load(engine, resume_from)
        step, skipped_total = int(client["step"]), int(client.get("skipped_steps", 0))
        if resized:  # RNG streams re-derived per rank from (seed, step, rank)
            _seed_all(cfg.run.seed * 1000 + info.rank + 1 + 7919 * step)
        else:
            ckpt.set_rng_state(mine["rng"])
        if ema is not None:
            ema.load_state_dict(ckpt.read_ema(resume_from))
    else:
        _seed_all(cfg.run.seed * 1000 + info.rank + 1)  # per-rank randomness (dequantisation) from here on

    metrics_log = MetricsLog(run_dir / "metrics.jsonl") if rank0 else None
    tracker = None
    if rank0:
        if resume_from is None:
            _set_aside(run_dir / "metrics.jsonl")  # a fresh start never truncates an earlier run's history
        metrics_log.truncate_after(step)  # a resumed run repeats the steps after its checkpoint
        if cfg.tracking.enabled:
            tracker = MlflowTracker.from_config(cfg)
            tracker.start(
                cfg.run.name,
                run_id=saved.get("mlflow_run_id") or None,
                parent_run_id=cfg.tracking.parent_run_id or None,
                tags={
                    "data.train_manifest_sha256": train_manifest.manifest_checksum(),
                    "data.val_manifest_sha256": val_manifest.manifest_checksum(),
                    "run.dir": str(run_dir.resolve()),
                },
            )
            tracker.log_config(cfg, run_dir / "config.yaml")
    run_id = dist.broadcast_object(tracker.run_id if tracker is not None else None, src=0)
    watch, watchdog = PreemptionWatch(cfg.checkpoint.grace_s), Watchdog(cfg.train.watchdog_s)
    # completed checkpoints are mirrored to S3 by rank 0 in the background, never blocking a step
    sync = (
        RemoteSync(cfg.checkpoint.remote, run_dir, keep=cfg.checkpoint.keep)
        if rank0 and cfg.checkpoint.remote
        else None
    )

    def record(at: int, values: dict[str, Any], force: bool = False) -> None:
        if metrics_log is not None:
            metrics_log.log(at, values)
        if tracker is not None:
            tracker.log_metrics(values, at, force=force)

    def val_pass() -> dict[str, float]:
        loader = build_eval_loader(
            val_split.usable,
            cfg.data.batch_size,
            rank=info.rank,
            world_size=info.world_size,
            num_workers=cfg.data.num_workers,
            modalities=keys,
            verify=cfg.data.verify,
        )
        out = evaluate(engine, cfg, loader, device)
        val_bad.update(loader.bad_shards)
        return out

    val_bad: set[str] = set()

    def data_health() -> dict[str, float]:
        """Collective: shards found bad (preflight + the loaders' checks, any rank), as metrics; stops the run
        on every rank alike when a split lost more than data.max_bad_fraction of its samples."""
        t_urls = dict(zip(train_split.usable.shard_urls(), (s.samples for s in train_split.usable.shards)))
        v_urls = dict(zip(val_split.usable.shard_urls(), (s.samples for s in val_split.usable.shards)))
        found = (sorted(train_loader.bad_shards), sorted(val_bad))
        everyone = [found]
        if dist.is_initialized() and info.world_size > 1:  # the union of what each rank's loaders found
            everyone = [None] * info.world_size
            torch.distributed.all_gather_object(everyone, found)
        t_bad = {u for t, _ in everyone for u in t}
        v_bad = {u for _, v in everyone for u in v}
        t_frac = (train_split.bad_samples + sum(t_urls.get(u, 0) for u in t_bad)) / max(1, train_manifest.total_samples)
        v_frac = (val_split.bad_samples + sum(v_urls.get(u, 0) for u in v_bad)) / max(1, val_manifest.total_samples)
        bad = len(train_split.bad) + len(val_split.bad) + len(t_bad) + len(v_bad)
        if max(t_frac, v_frac) > cfg.data.max_bad_fraction:
            from pipeline.data.verify import DataError

            raise DataError(
                f"shards failing the manifest check (data.verify={cfg.data.verify}) hold {t_frac:.1%} of "
                f"split {cfg.data.train_split!r} and {v_frac:.1%} of {cfg.data.val_split!r}, more than "
                f"data.max_bad_fraction={cfg.data.max_bad_fraction:g}: re-copy or re-shard the data"
            )
        return {"data_bad_shards": float(bad), "data_bad_fraction": max(t_frac, v_frac)} if bad else {}

    def validate(at: int) -> dict[str, Any]:
        val = val_pass() | data_health()
        if ema is not None:
            with ema.swapped_in(engine.module):
                val |= {k.replace("val_", "val_ema_", 1): v for k, v in val_pass().items() if k != "val_samples"}
        record(at, val, force=True)
        return val

    def save(at: int) -> None:
        shared = {
            "step": at,
            "config": to_dict(cfg),
            "world_size": info.world_size,
            "modalities": specs,
            "mlflow_run_id": run_id,
            "skipped_steps": skipped_total,
        }
        per_rank = {"loader": loader_state.state_dict()}
        if ema is not None and rank0:  # identical on every rank under ZeRO ≤ 2: rank 0's copy is stored
            per_rank["ema"] = ema.state_dict()
        tag_dir = ckpt.save(engine, run_dir, at, shared, per_rank, cfg.checkpoint.keep)
        if sync is not None:
            sync.submit(tag_dir)

    last: dict[str, Any] = {"step": step}
    nonfinite = 0
    progress = None
    if rank0:
        from tqdm import tqdm

        # batch logs (SLURM, kubectl logs) get a line every 30 s instead of one per step
        progress = tqdm(
            total=cfg.train.max_steps,
            initial=step,
            desc="train",
            dynamic_ncols=True,
            mininterval=0.1 if sys.stderr.isatty() else 30.0,
        )
    tick, samples = time.monotonic(), 0
    meter = SpeedMeter(flops, device)
    engine.train()
    try:
        if resume_from is None:
            # inside the try: a failure here (bad data found while validating) must still stop the watchdog,
            # which would otherwise end the process with exit 3 minutes later
            with meter.excluded():
                last |= validate(0)
        while step < cfg.train.max_steps:
            batch = first if first is not None else meter.timed_next(batches)
            first = None
            with autocast(cfg, device):
                out = engine(_to_device(batch, device), mode="loss")
            loss = out["loss"]
            if not _all_finite(loss):
                nonfinite, skipped_total = nonfinite + 1, skipped_total + 1
                log.warning(
                    "step %d: non-finite loss; micro-batch skipped on every rank (%d in a row)", step, nonfinite
                )
                if nonfinite >= cfg.train.max_nonfinite:
                    raise FloatingPointError(
                        f"{nonfinite} non-finite losses in a row (train.max_nonfinite={cfg.train.max_nonfinite}) at "
                        f"step {step}: lower optim.lr, check the data, or resume from an earlier checkpoint"
                    )
                continue
            nonfinite = 0
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            stage0_norm = _grad_norm(engine) if boundary and cfg.deepspeed.zero_stage == 0 else None
            engine.step()
            samples += len(batch["__key__"]) * info.world_size
            meter.micro_batch(len(batch["__key__"]))
            if not boundary:
                continue
            if ema is not None:
                ema.update(engine.module)
            step += 1
            meter.step()
            watchdog.beat()
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                now = time.monotonic()
                norm = stage0_norm if stage0_norm is not None else engine.get_global_grad_norm()
                # the logged loss / metrics are means over ranks (collective: every rank logs the same steps)
                local = torch.stack(
                    [loss.detach().double().cpu()]
                    + [v.detach().double().cpu().reshape(()) for k, v in out.items() if k != "loss"]
                )
                means = (dist.all_reduce_sum(local) / info.world_size).tolist()
                names = ["loss"] + [k for k in out if k != "loss"]
                values = {
                    **dict(zip(names, means)),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(norm) if norm is not None else float("nan"),
                    "samples_per_s": samples / max(now - tick, 1e-9),
                    "skipped_steps": skipped_total,
                    **meter.window(),
                }
                tick, samples = now, 0
                last |= values | {"step": step}
                record(step, values)
                if progress is not None:
                    progress.set_postfix(
                        loss=f"{values['loss']:.4f}",
                        sps=f"{values['samples_per_s']:.1f}",
                        step_s=f"{values['step_time_s']:.3f}",
                        tflops=f"{values['achieved_tflops']:.3g}",
                    )
            if progress is not None:
                progress.update(1)
            validated = step % cfg.eval.every == 0 or step == cfg.train.max_steps
            saved_now = step % cfg.checkpoint.every == 0 or step == cfg.train.max_steps
            with meter.excluded():  # validation and checkpoints are not step time
                if validated:
                    last |= validate(step) | {"step": step}
                if saved_now:
                    save(step)
            if validated and reporter is not None:
                # after the save: a sweep scheduler may stop the trial inside the report, and the checkpoint
                # of the step it judged must exist by then
                reporter(dict(last))
            code = watch.exit_code()
            if code is not None:
                if not saved_now:
                    save(step)
                log.warning(
                    "received %s: saved step %d; exiting with %d",
                    watch.received.name if watch.received else "a signal on another rank",
                    step,
                    code,
                )
                _finish(
                    tracker,
                    progress,
                    watchdog,
                    watch,
                    "KILLED" if code else "FINISHED",
                    None,
                    sync,
                    cfg.checkpoint.grace_s,
                )
                _release(owned)
                raise SystemExit(code)
    except BaseException:
        if not isinstance(sys.exc_info()[1], SystemExit):
            _finish(tracker, progress, watchdog, watch, "FAILED", None, sync, cfg.checkpoint.grace_s)
        raise
    if rank0:
        log.info("%s", meter.summary())
    _finish(tracker, progress, watchdog, watch, "FINISHED", run_dir if rank0 else None, sync, cfg.checkpoint.grace_s)
    _release(owned)
    return last


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


def _set_aside(path: Path) -> Path | None:
    """Rename an earlier run's ``metrics.jsonl`` to ``metrics.<n>.jsonl`` (first free n) with one warning."""
    if not path.exists() or path.stat().st_size == 0:
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


def _release(owned: bool) -> None:
    """End a group this run started, on the paths where every rank gets here together (done, or the agreed
    preemption exit). Left to interpreter shutdown, gloo's worker threads outlive the interpreter and the
    process dies with SIGABRT ("terminate called without an active exception") after a finished run. After
    an error the group is left alone: the other ranks may be inside a collective, and destroying it would hang.
    """
    if owned and dist.is_initialized():
        dist.barrier()  # no rank closes its sockets while a peer still reads the last collective's bytes
        dist.cleanup()


def load_init_weights(model: torch.nn.Module, path: str) -> None:
    """Start from consolidated weights (``jobs.consolidate``), e.g. to continue at a new world size."""
    from pipeline.train.consolidate import read_weights

    state = read_weights(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"model.init_weights={path!r} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
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


def _finish(
    tracker,
    progress,
    watchdog: Watchdog,
    watch: PreemptionWatch,
    status: str,
    run_dir: Path | None,
    sync: RemoteSync | None,
    grace_s: float,
) -> None:
    watchdog.stop()
    watch.restore()
    if sync is not None:
        # the last checkpoint must reach S3 before a preempted node disappears: bounded by the grace time
        if not sync.wait(grace_s):
            log.warning(
                "checkpoint upload to %s still running after %.0fs; the newest remote checkpoint may be an older one",
                sync.remote_url,
                grace_s,
            )
        sync.close()
    if progress is not None:
        progress.close()
    png = None
    if run_dir is not None and (run_dir / "metrics.jsonl").exists():
        from pipeline.tracking import plot_metrics

        try:  # the plot is part of the run directory, with or without a tracking server
            png = plot_metrics(run_dir / "metrics.jsonl", run_dir / "metrics.png")
        except ValueError as e:  # no plottable keys yet: not worth failing a finished run over
            log.warning("no metrics plot: %s", e)
    if tracker is not None:
        if png is not None:
            tracker.log_artifact(png, "plots")
        tracker.close(status)
