"""The one train function every launcher runs: ``train_loop(cfg, reporter=None)``.

torchrun, srun, the deepspeed launcher, ``accelerate launch``, Ray Train workers and Ray Tune trials all
call this function; launchers only set the environment (see :func:`pipeline.world.world_info_from_env`).

:class:`Trainer` runs named phases around an explicit :class:`~pipeline.train.state.TrainState` (what a
checkpoint saves and restores):

- ``setup``: world → data preflight (bad data refused before any process group) → process group → run dir +
  resolved config → model and execution plan;
- ``resume``: resume target (:mod:`pipeline.train.resume`) → data cursor → loaders → ActNorm data init (fresh
  runs only) → FLOP count → DeepSpeed engine → checkpoint load → RNG streams;
- ``open_logs``: metrics.jsonl, MLflow, preemption watch, watchdog, S3 mirror;
- ``step`` (one micro-batch; an optimizer step at each accumulation boundary) → ``log`` → ``validate`` →
  ``checkpoint`` → ``stop`` (signals) — repeated to ``train.max_steps``;
- ``finish``: summary, uploads, plot, tracking run closed, process group released.

It returns the last metrics dict (also handed to ``reporter`` at every validation).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline import dist
from pipeline.config import Config, save_resolved, to_dict
from pipeline.data.loader import TrainLoader, build_train_loader
from pipeline.data.verify import preflight
from pipeline.flows import data_init
from pipeline.flows.plan import decide_plan
from pipeline.models import build_model, modality_specs
from pipeline.tracking.metrics_log import KeysLog, MetricsLog, plot_metrics
from pipeline.tracking.mlflow_tracker import MlflowTracker
from pipeline.train import checkpoint as ckpt
from pipeline.train import resume
from pipeline.train.ema import WeightEMA
from pipeline.train.engine import autocast, build_engine
from pipeline.train.remote import RemoteSync
from pipeline.train.resume import ARCH_KEYS, check_architecture, load_init_weights
from pipeline.train.signals import PreemptionWatch, Watchdog
from pipeline.train.speed import SpeedMeter, count_step_flops
from pipeline.train.state import TrainState, rank_seed, seed_all
from pipeline.train.validation import Validator, evaluate, to_device

log = logging.getLogger("pipeline.train")

__all__ = ["ARCH_KEYS", "Trainer", "Watchdog", "check_architecture", "evaluate", "load_init_weights", "train_loop"]


def train_loop(cfg: Config, reporter: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train ``cfg`` to ``train.max_steps`` (resuming per ``checkpoint.resume``); returns the last metrics.

    ``reporter`` (e.g. Ray Tune's ``tune.report``) receives the metrics dict at every validation, on every
    rank, after that step's checkpoint (if one is due) is complete. After a SIGUSR2 / SIGTERM-triggered save the
    process exits with 0 / 143 (``SystemExit``). A fresh run validates once before its first step (logged at
    step 0: the "before" figure).
    """
    return Trainer(cfg, reporter).run()


def _device(cfg: Config, info: dist.WorldInfo) -> torch.device:
    if cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def _grad_norm(engine) -> float:
    """Global gradient norm before clipping. DeepSpeed records it only for ZeRO ≥ 1; at stage 0 the
    gradients are already all-reduced after ``backward`` and live in ``p.grad``."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else float("nan")


def _forever(loader: TrainLoader) -> Iterator[dict[str, Any]]:
    """Epoch after epoch of a training loader (its state advances the epoch). The loaders never draw from
    the global torch RNG (their DataLoaders have their own generators), so the model's dequantisation noise
    stream is the same in a fresh and a resumed run."""
    while True:
        yield from loader


def _all_finite(loss: torch.Tensor) -> bool:
    """Collective: True only if the loss is finite on every rank (so all ranks skip the same step)."""
    flag = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0])
    return dist.all_reduce_sum(flag).item() == 0.0


class Trainer:
    """One training run in named phases (see the module docstring); ``run()`` drives them."""

    def __init__(self, cfg: Config, reporter: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.cfg, self.reporter = cfg, reporter
        self.tracker: MlflowTracker | None = None
        self.metrics_log: MetricsLog | None = None
        self.keys_log: KeysLog | None = None
        self.progress: tqdm | None = None
        self.sync: RemoteSync | None = None
        self.first: dict[str, Any] | None = None  # a batch drawn before the loop (data init, FLOP count)
        self.out: dict[str, Any] = {}  # the newest micro-batch's outputs (loss, bits/dim, …)
        self._stage0_norm: float | None = None
        self._tick, self._samples = time.monotonic(), 0

    # -- setup -----------------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Refuse bad data, start (or join) the process group, write the resolved config, build the model."""
        cfg = self.cfg
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
        world = dist.world_info_from_env()
        self.device = _device(cfg, world)
        # bad data is refused here, before any process group starts (DataError: one line, jobs.train exits 2)
        self.train_split, self.val_split = preflight(
            cfg.data.shards,
            cfg.data.train_split,
            cfg.data.val_split,
            batch_size=cfg.data.batch_size,
            world_size=world.world_size,
            verify=cfg.data.verify,
            max_bad_fraction=cfg.data.max_bad_fraction,
        )
        # the backend follows the device the run asked for (nccl only for CUDA runs), not what the node has;
        # a group this call starts, it also destroys on the way out (a launcher's or Ray Train's group is theirs)
        self.owned = not dist.is_initialized()
        self.info = dist.init_distributed(
            world,
            backend="nccl" if self.device.type == "cuda" else "gloo",
            use_deepspeed=True,
            timeout_s=cfg.train.collective_timeout_s,
        )
        self.rank0 = self.info.rank == 0
        self.run_dir = Path(cfg.run.dir)
        if self.rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, self.run_dir / "config.yaml")
        dist.barrier()
        # the committed manifests identify the data (tags); the loaders read only the shards that passed preflight
        self.specs = modality_specs(cfg, self.train_split.manifest)
        self.keys = tuple(s[0] for s in self.specs)
        seed_all(cfg.run.seed)  # identical initial weights on every rank
        self.model = build_model(cfg, self.specs).to(self.device)
        plan = decide_plan(cfg, self.device)  # how the flows run: decided once here, logged once
        plan.apply(self.model)
        if self.rank0:
            log.info("%s", plan.describe(self.model))

    # -- resume ----------------------------------------------------------------------------------------------

    def resume(self) -> None:
        """Decide what the run continues from, build the data stream and the engine, and restore the state."""
        cfg, info = self.cfg, self.info
        self.point = point = resume.find(cfg, self.run_dir, info)
        cursor = resume.restore_cursor(point, cfg, info, self.train_split.usable.total_samples)
        if point.tag_dir is None and cfg.model.init_weights:
            load_init_weights(self.model, cfg.model.init_weights)
        self.train_loader = build_train_loader(
            self.train_split.usable,
            cfg.data.batch_size,
            rank=info.rank,
            world_size=info.world_size,
            num_workers=cfg.data.num_workers,
            seed=cfg.run.seed,
            state=cursor,
            modalities=self.keys,
            verify=cfg.data.verify,
            sampling=cfg.data.sampling,
        )
        self.batches = _forever(self.train_loader)
        self.first = next(self.batches)  # trained on as the first step
        if point.tag_dir is None and not cfg.model.init_weights:
            # ActNorm's data-dependent init runs here, before DeepSpeed wraps (and under ZeRO-3 partitions) the
            # model; the statistics are all-reduced, so every rank ends with identical parameters.
            with autocast(cfg, self.device):
                data_init(self.model, to_device(self.first, self.device), mode="loss")
        self._count_flops()
        self.engine, _, self.scheduler = build_engine(self.model, cfg, info.world_size)
        ema = WeightEMA(self.engine.module, cfg.optim.ema) if cfg.optim.ema else None
        self.state = TrainState(loader=cursor, ema=ema)
        self._restore()

    def _count_flops(self) -> None:
        """Model FLOPs for achieved_tflops / mfu: counted once, on a copy, before DeepSpeed wraps the model."""
        cfg, device = self.cfg, self.device
        self.flops = count_step_flops(self.model, self.first, lambda: autocast(cfg, device), device)
        if self.rank0:
            log.info(
                "model FLOPs of a forward + backward (no recompute): %.4g + %.4g per sample; bf16 share %.3f",
                self.flops.fixed,
                self.flops.per_sample,
                self.flops.bf16_share,
            )

    def _restore(self) -> None:
        """Engine state, TrainState and RNG streams from the resume point (fresh: per-rank streams from seed)."""
        cfg, point, st = self.cfg, self.point, self.state
        if point.tag_dir is None:
            seed_all(rank_seed(cfg.run.seed, self.info.rank))  # per-rank randomness (dequantisation) from here on
            return
        load = ckpt.load_universal if point.universal else ckpt.load
        st.restore_shared(load(self.engine, point.tag_dir))
        if point.resized:  # RNG streams re-derived per rank from (seed, step, rank)
            seed_all(rank_seed(cfg.run.seed, self.info.rank, st.step))
        else:
            ckpt.set_rng_state(point.mine["rng"])
        if st.ema is not None:
            st.ema.load_state_dict(ckpt.read_ema(point.tag_dir))

    # -- logs and watchers -----------------------------------------------------------------------------------

    def open_logs(self) -> None:
        """metrics.jsonl (history set aside on a fresh start, truncated after the resumed step), the MLflow run,
        the keys logs, the preemption watch, the watchdog and the S3 mirror."""
        cfg, step = self.cfg, self.state.step
        if self.rank0:
            self.metrics_log = MetricsLog(self.run_dir / "metrics.jsonl")
            if self.point.tag_dir is None:
                resume.set_aside(self.run_dir / "metrics.jsonl")  # a fresh start never truncates earlier history
            self.metrics_log.truncate_after(step)  # a resumed run repeats the steps after its checkpoint
            self._truncate_keys(step)
            self._start_tracking()
        run_id = self.tracker.run_id if self.tracker is not None else None
        self.run_id = dist.broadcast_object(run_id, src=0)  # also orders the truncation before any append
        if cfg.train.log_keys:
            self.keys_log = KeysLog(self.run_dir / "keys" / f"rank{self.info.rank}.jsonl")
        self.watch, self.watchdog = PreemptionWatch(cfg.checkpoint.grace_s), Watchdog(cfg.train.watchdog_s)
        if self.rank0 and cfg.checkpoint.remote:  # completed checkpoints mirrored in the background
            self.sync = RemoteSync(cfg.checkpoint.remote, self.run_dir, keep=cfg.checkpoint.keep)
        if self.rank0:  # batch logs (SLURM, kubectl logs) get a line every 30 s instead of one per step
            self.progress = tqdm(
                total=cfg.train.max_steps,
                initial=step,
                desc="train",
                dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 30.0,
            )
        self.meter = SpeedMeter(self.flops, self.device)

    def _truncate_keys(self, step: int) -> None:
        """Keys logs of every earlier rank (any world size) cut after the resumed step; a fresh start moves an
        earlier run's keys directory aside (``keys.<n>``) instead."""
        keys = self.run_dir / "keys"
        if self.point.tag_dir is None:
            resume.set_aside(keys)
            return
        for old in keys.glob("rank*.jsonl"):
            KeysLog(old).truncate_after(step)

    def _start_tracking(self) -> None:
        cfg = self.cfg
        if not cfg.tracking.enabled:
            return
        self.tracker = MlflowTracker.from_config(cfg)
        self.tracker.start(
            cfg.run.name,
            run_id=self.point.saved.get("mlflow_run_id") or None,
            parent_run_id=cfg.tracking.parent_run_id or None,
            tags={
                "data.train_manifest_sha256": self.train_split.manifest.manifest_checksum(),
                "data.val_manifest_sha256": self.val_split.manifest.manifest_checksum(),
                "run.dir": str(self.run_dir.resolve()),
            },
        )
        self.tracker.log_config(cfg, self.run_dir / "config.yaml")

    def record(self, at: int, values: dict[str, Any], force: bool = False) -> None:
        if self.metrics_log is not None:
            self.metrics_log.log(at, values)
        if self.tracker is not None:
            self.tracker.log_metrics(values, at, force=force)

    # -- the loop --------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.setup()
        self.resume()
        self.open_logs()
        cfg, st = self.cfg, self.state
        self.validator = Validator(
            cfg, self.train_split, self.val_split, self.info.rank, self.info.world_size, self.keys, self.device
        )
        st.last = {"step": st.step}
        self.engine.train()
        try:
            if self.point.tag_dir is None:
                # inside the try: a failure here (bad data found while validating) must still stop the watchdog,
                # which would otherwise end the process with exit 3 minutes later
                with self.meter.excluded():
                    st.last |= self.validate(0)
            while st.step < cfg.train.max_steps:
                if self.step():
                    self.after_step()
        except BaseException:
            if not isinstance(sys.exc_info()[1], SystemExit):
                self.finish("FAILED")
            raise
        if self.rank0:
            log.info("%s", self.meter.summary())
        self.finish("FINISHED")
        return st.last

    def step(self) -> bool:
        """One micro-batch forward + backward + engine step; True when it completed an optimizer step."""
        cfg, st, engine = self.cfg, self.state, self.engine
        batch = self.first if self.first is not None else self.meter.timed_next(self.batches)
        self.first = None
        with autocast(cfg, self.device):
            out = engine(to_device(batch, self.device), mode="loss")
        if not _all_finite(out["loss"]):
            self._skip_nonfinite()
            return False
        st.nonfinite = 0
        engine.backward(out["loss"])
        boundary = engine.is_gradient_accumulation_boundary()
        self._stage0_norm = _grad_norm(engine) if boundary and cfg.deepspeed.zero_stage == 0 else None
        engine.step()
        n = len(batch["__key__"])
        self._samples += n * self.info.world_size
        self.meter.micro_batch(n)
        if self.keys_log is not None:
            self.keys_log.log_keys(st.step + 1, batch["__key__"])
        self.out = out
        if not boundary:
            return False
        if st.ema is not None:
            st.ema.update(engine.module)
        st.step += 1
        self.meter.step()
        self.watchdog.beat()
        return True

    def _skip_nonfinite(self) -> None:
        st, cfg = self.state, self.cfg
        st.nonfinite, st.skipped_steps = st.nonfinite + 1, st.skipped_steps + 1
        log.warning("step %d: non-finite loss; micro-batch skipped on every rank (%d in a row)", st.step, st.nonfinite)
        if st.nonfinite >= cfg.train.max_nonfinite:
            raise FloatingPointError(
                f"{st.nonfinite} non-finite losses in a row (train.max_nonfinite={cfg.train.max_nonfinite}) at "
                f"step {st.step}: lower optim.lr, check the data, or resume from an earlier checkpoint"
            )

    def after_step(self) -> None:
        """log → validate → checkpoint → report → stop, as due after optimizer step ``state.step``."""
        cfg, st = self.cfg, self.state
        step, final = st.step, st.step == cfg.train.max_steps
        if step % cfg.train.log_every == 0 or final:
            self.log_step()
        if self.progress is not None:
            self.progress.update(1)
        validated = step % cfg.eval.every == 0 or final
        saved = step % cfg.checkpoint.every == 0 or final
        with self.meter.excluded():  # validation and checkpoints are not step time
            if validated:
                st.last |= self.validate(step) | {"step": step}
            if saved:
                self.checkpoint()
        if validated and self.reporter is not None:
            # after the save: a sweep scheduler may stop the trial inside the report, and the checkpoint
            # of the step it judged must exist by then
            self.reporter(dict(st.last))
        self.stop_if_signalled(saved)

    def log_step(self) -> None:
        """Collective: the loss and model outputs averaged over ranks, LR, grad norm, throughput and speed."""
        st, out = self.state, self.out
        now = time.monotonic()
        norm = self._stage0_norm if self._stage0_norm is not None else self.engine.get_global_grad_norm()
        local = torch.stack(
            [out["loss"].detach().double().cpu()]
            + [v.detach().double().cpu().reshape(()) for k, v in out.items() if k != "loss"]
        )
        means = (dist.all_reduce_sum(local) / self.info.world_size).tolist()
        names = ["loss"] + [k for k in out if k != "loss"]
        values = {
            **dict(zip(names, means)),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": float(norm) if norm is not None else float("nan"),
            "samples_per_s": self._samples / max(now - self._tick, 1e-9),
            "skipped_steps": st.skipped_steps,
            **self.meter.window(),
        }
        self._tick, self._samples = now, 0
        st.last |= values | {"step": st.step}
        self.record(st.step, values)
        if self.progress is not None:
            self.progress.set_postfix(
                loss=f"{values['loss']:.4f}",
                sps=f"{values['samples_per_s']:.1f}",
                step_s=f"{values['step_time_s']:.3f}",
                tflops=f"{values['achieved_tflops']:.3g}",
            )

    def validate(self, at: int) -> dict[str, Any]:
        """Collective: validation (+ EMA, data health) logged at step ``at``; keeps the best eval.metric."""
        val = self.validator(self.engine, self.state.ema, self.train_loader)
        metric = self.cfg.eval.metric
        self.state.note_validation(val.get(metric), self.cfg.eval.mode)
        # the best so far (kept across requeues by the TrainState) beside each validation: what a dashboard sorts by
        best = {} if self.state.best is None else {f"best_{metric}": self.state.best}
        self.record(at, val | best, force=True)
        return val

    def checkpoint(self) -> None:
        """Collective: save the engine and the TrainState; rank 0 mirrors the finished tag to S3."""
        st = self.state
        shared = st.shared() | {
            "config": to_dict(self.cfg),
            "world_size": self.info.world_size,
            "modalities": self.specs,
            "mlflow_run_id": self.run_id,
        }
        tag_dir = ckpt.save(
            self.engine, self.run_dir, st.step, shared, st.per_rank(self.rank0), self.cfg.checkpoint.keep
        )
        if self.sync is not None:
            self.sync.submit(tag_dir)

    def stop_if_signalled(self, saved: bool) -> None:
        """Collective: after a preemption signal on any rank, save (unless just saved) and exit with its code."""
        code = self.watch.exit_code()
        if code is None:
            return
        if not saved:
            self.checkpoint()
        log.warning(
            "received %s: saved step %d; exiting with %d",
            self.watch.received.name if self.watch.received else "a signal on another rank",
            self.state.step,
            code,
        )
        self.finish("KILLED" if code else "FINISHED", plot=False)
        raise SystemExit(code)

    # -- the end ---------------------------------------------------------------------------------------------

    def finish(self, status: str, plot: bool = True) -> None:
        """Stop the watchers, let the last upload finish (bounded by the grace time), close the progress bar,
        plot metrics.jsonl, close the tracking run; release the process group on the agreed paths."""
        self.watchdog.stop()
        self.watch.restore()
        grace = self.cfg.checkpoint.grace_s
        if self.sync is not None:
            # the last checkpoint must reach S3 before a preempted node disappears: bounded by the grace time
            if not self.sync.wait(grace):
                log.warning(
                    "checkpoint upload to %s still running after %.0fs; the newest remote checkpoint may be an "
                    "older one",
                    self.sync.remote_url,
                    grace,
                )
            self.sync.close()
        if self.progress is not None:
            self.progress.close()
        png = self._plot() if plot and status == "FINISHED" and self.rank0 else None
        if self.tracker is not None:
            if png is not None:
                self.tracker.log_artifact(png, "plots")
            self.tracker.close(status)
        if status != "FAILED":
            self._release()

    def _plot(self) -> Path | None:
        metrics = self.run_dir / "metrics.jsonl"
        if not metrics.exists():
            return None
        try:  # the plot is part of the run directory, with or without a tracking server
            return plot_metrics(metrics, self.run_dir / "metrics.png")
        except ValueError as e:  # no plottable keys yet: not worth failing a finished run over
            log.warning("no metrics plot: %s", e)
            return None

    def _release(self) -> None:
        """End a group this run started, on the paths where every rank gets here together (done, or the agreed
        preemption exit). Left to interpreter shutdown, gloo's worker threads outlive the interpreter and the
        process dies with SIGABRT ("terminate called without an active exception") after a finished run. After
        an error the group is left alone: the other ranks may be inside a collective, and destroying it would
        hang."""
        if self.owned and dist.is_initialized():
            dist.barrier()  # no rank closes its sockets while a peer still reads the last collective's bytes
            dist.cleanup()
