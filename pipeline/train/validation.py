"""The trainer's validate phase: the exact pass over the validation split, EMA weights, and data health."""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline import dist
from pipeline.config import Config
from pipeline.data.evalloader import build_eval_loader
from pipeline.data.loader import TrainLoader
from pipeline.data.verify import CheckedSplit, DataError
from pipeline.metrics import finalize
from pipeline.train.ema import WeightEMA
from pipeline.train.engine import autocast


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


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
                out = engine(to_device(batch, device), mode="eval")
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
    reduced = _all_reduce_sums(sums)
    count = float(reduced["count"]) if "count" in reduced else 0.0
    if count <= 0:
        raise RuntimeError(
            f"evaluate: the validation pass saw no valid sample (split {cfg.data.val_split!r}, "
            f"eval.batches={cfg.eval.batches}); check the val shards"
        )
    metrics = finalize(cfg.model.task, reduced)
    return {f"val_{k}": v for k, v in metrics.items()} | {"val_samples": count}


def _all_reduce_sums(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0 names the keys and shapes; a rank that saw no batch contributes zeros of those shapes."""
    layout = dist.broadcast_object([(k, tuple(sums[k].shape)) for k in sorted(sums)], src=0)
    flat = [
        sums[k].reshape(-1) if k in sums else torch.zeros(math.prod(shape), dtype=torch.float64) for k, shape in layout
    ]
    total = dist.all_reduce_sum(torch.cat(flat)) if flat else torch.zeros(0, dtype=torch.float64)
    parts = total.split([math.prod(s) for _, s in layout])
    return {k: t.reshape(shape) for t, (k, shape) in zip(parts, layout)}


class Validator:
    """Validation passes (and the EMA weights' pass) plus the data-health check of both splits."""

    def __init__(
        self,
        cfg: Config,
        train: CheckedSplit,
        val: CheckedSplit,
        rank: int,
        world_size: int,
        modalities: tuple[str, ...],
        device: torch.device,
    ) -> None:
        self.cfg, self.train, self.val, self.device = cfg, train, val, device
        self.rank, self.world_size, self.modalities = rank, world_size, modalities
        self.val_bad: set[str] = set()  # val shards this rank's loaders found bad

    def _pass(self, engine) -> dict[str, float]:
        c = self.cfg
        loader = build_eval_loader(
            self.val.usable,
            c.data.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=c.data.num_workers,
            modalities=self.modalities,
            verify=c.data.verify,
        )
        out = evaluate(engine, c, loader, self.device)
        self.val_bad.update(loader.bad_shards)
        return out

    def __call__(self, engine, ema: WeightEMA | None, train_loader: TrainLoader) -> dict[str, float]:
        """Collective: the validation metrics, ``val_ema_*`` with EMA weights, and the data-health metrics."""
        val = self._pass(engine) | self.data_health(train_loader)
        if ema is not None:
            with ema.swapped_in(engine.module):
                val |= {
                    k.replace("val_", "val_ema_", 1): v for k, v in self._pass(engine).items() if k != "val_samples"
                }
        return val

    def data_health(self, train_loader: TrainLoader) -> dict[str, float]:
        """Collective: shards found bad (preflight + the loaders' checks, any rank), as metrics; stops the run
        on every rank alike when a split lost more than data.max_bad_fraction of its samples."""
        c = self.cfg
        found = (sorted(train_loader.bad_shards), sorted(self.val_bad))
        everyone = [found]
        if dist.is_initialized() and self.world_size > 1:  # the union of what each rank's loaders found
            everyone = [None] * self.world_size
            torch.distributed.all_gather_object(everyone, found)
        t_bad = {u for t, _ in everyone for u in t}
        v_bad = {u for _, v in everyone for u in v}
        t_frac = _lost_fraction(self.train, t_bad)
        v_frac = _lost_fraction(self.val, v_bad)
        bad = len(self.train.bad) + len(self.val.bad) + len(t_bad) + len(v_bad)
        if max(t_frac, v_frac) > c.data.max_bad_fraction:
            raise DataError(
                f"shards failing the manifest check (data.verify={c.data.verify}) hold {t_frac:.1%} of "
                f"split {c.data.train_split!r} and {v_frac:.1%} of {c.data.val_split!r}, more than "
                f"data.max_bad_fraction={c.data.max_bad_fraction:g}: re-copy or re-shard the data"
            )
        return {"data_bad_shards": float(bad), "data_bad_fraction": max(t_frac, v_frac)} if bad else {}


def _lost_fraction(split: CheckedSplit, found: set[str]) -> float:
    """The fraction of a split's samples in shards bad at preflight or found bad while reading."""
    samples = dict(zip(split.usable.shard_urls(), (s.samples for s in split.usable.shards)))
    lost = split.bad_samples + sum(samples.get(u, 0) for u in found)
    return lost / max(1, split.manifest.total_samples)
