"""The exact pass: every listed sample once across all ranks, in step (validation, ``jobs.evaluate``, prediction).

**Exact pass** (:func:`build_eval_loader`): shards go to ranks (``shards[rank::world_size]``, webdataset's
``split_by_node``) and then to workers (``[worker::W]``, ``split_by_worker``); every listed sample is read
once, partial last batches included. Every batch carries ``__valid__`` (bool (N,)). A rank that runs out
keeps yielding a padding batch (a real sample, ``__valid__`` all False) until the all-reduced "anyone still
has data" flag is 0 on every rank, so all ranks run the same number of steps (collectives inside the model
forward — ZeRO-3 parameter gathers — cannot hang) and weighting by ``__valid__`` counts nothing twice.
Fewer shards than ranks is fine: a rank without a shard yields only padding batches (shaped from the
manifest) and contributes nothing to the sums. An exact pass always starts from its beginning (no mid-pass
resume); padding batches hold one sample.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .loader import ShardSource, _check_common, _LoaderBase, _resolve, stream_plan
from .stream import Decode, StreamPlan, collate

__all__ = ["EvalLoader", "build_eval_loader"]


class EvalLoader(_LoaderBase):
    """One exact pass per iteration; see the module docstring for the ``__valid__`` / flag protocol."""

    def __init__(
        self,
        plan: StreamPlan,
        num_workers: int,
        shard_samples: tuple[int, ...] | None,
        flag_device: str | torch.device | None,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(plan, num_workers, pin_memory, shard_samples)
        self.shard_samples = shard_samples
        self.flag_device = flag_device
        self.epoch = plan.epoch

    def set_epoch(self, epoch: int) -> None:
        """Shard order for the next pass when built with ``shuffle_seed`` (exact training epochs)."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Steps every rank runs (from the manifest's counts; fewer if samples turn out corrupt)."""
        if self.shard_samples is None:
            raise TypeError("length unknown: the loader was built from shard URLs, not a manifest")
        p, workers = self.plan, max(1, self.num_workers)
        order = list(range(len(self.shard_samples)))
        if p.shuffle_shards:
            random.Random(f"mango-exact/{p.seed}/{self.epoch}").shuffle(order)
        steps = 0
        for rank in range(p.world_size):
            mine = order[rank :: p.world_size]
            steps = max(
                steps,
                sum(-(-sum(self.shard_samples[i] for i in mine[w::workers]) // p.batch_size) for w in range(workers)),
            )
        return steps

    def _any_rank_has_data(self, has: bool) -> bool:
        if self.plan.world_size == 1:
            return has
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"an exact pass over {self.plan.world_size} ranks needs torch.distributed "
                "initialised (the empty-batch flag is all-reduced)"
            )
        device = self.flag_device or ("cuda" if dist.get_backend() == "nccl" else "cpu")
        flag = torch.tensor([1 if has else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        it = iter(self._dataloader(replace(self.plan, epoch=epoch)))
        template: dict[str, Any] | None = None
        exhausted = False
        while True:
            batch = None
            while not exhausted:
                batch = next(it, None)
                exhausted = batch is None
                if batch is None or "__trailer__" not in batch:
                    break
                self._record(epoch, batch)  # a stats-only trailer
                batch = None
            if not self._any_rank_has_data(batch is not None):
                return
            if batch is not None:
                batch = self._record(epoch, batch)
                batch["__valid__"] = torch.ones(len(batch["__key__"]), dtype=torch.bool)
                template = batch
                yield batch
            else:
                yield self._padding(template)

    def _padding(self, template: dict[str, Any] | None) -> dict[str, Any]:
        if template is not None:
            pad = {k: (v[:1].clone() if isinstance(v, torch.Tensor) else v[:1]) for k, v in template.items()}
        else:
            pad = self._padding_from_specs()
        pad["__key__"] = [""]
        pad["__valid__"] = torch.zeros(1, dtype=torch.bool)
        return pad

    def _padding_from_specs(self) -> dict[str, Any]:
        """A one-sample batch shaped from the manifest, for a rank that never saw a real sample."""
        mods = self.plan.modalities
        if mods is None or self.plan.decode != "torch":
            raise RuntimeError(
                f"rank {self.plan.rank} read no sample at all and has no manifest to shape a padding batch from"
            )
        sample: dict[str, Any] = {}
        for name, spec in mods.items():
            if spec.shape is None or None in spec.shape:
                if spec.kind in ("text", "meta"):
                    sample[name] = "" if spec.kind == "text" else {}
                    continue
                raise RuntimeError(f"rank {self.plan.rank} read no sample and {name} has no fixed shape")
            a = np.zeros(spec.shape, dtype=np.int64 if spec.kind == "label" else spec.dtype)
            if spec.kind in ("image", "depth"):
                a = (a[:, :, None] if a.ndim == 2 else a).transpose(2, 0, 1)
            sample[name] = torch.from_numpy(np.ascontiguousarray(a))
        return collate([sample])


def build_eval_loader(
    urls_or_manifest: ShardSource,
    batch_size: int,
    *,
    rank: int,
    world_size: int,
    num_workers: int,
    decode: Decode = "torch",
    shuffle_seed: int | None = None,
    epoch: int = 0,
    modalities: tuple[str, ...] | None = None,
    flag_device: str | torch.device | None = None,
    pin_memory: bool = False,
    verify: str = "off",
) -> EvalLoader:
    """Exact pass: every listed sample once across all ranks; equal step counts via the all-reduced flag.

    ``shuffle_seed`` shuffles the shard order per ``epoch`` (for exact training epochs); ``None`` keeps
    manifest order. ``flag_device`` is where the flag is all-reduced (default: cuda under NCCL, else cpu).
    Any number of shards works at any world size: a rank (or worker) without a shard reads nothing and
    only steps with padding batches, contributing nothing to the sums. ``verify`` as for training.
    """
    _check_common(batch_size, rank, world_size, num_workers, decode)
    inp = _resolve(urls_or_manifest)
    seed = shuffle_seed or 0
    plan = stream_plan(
        "exact",
        inp,
        modalities,
        batch_size,
        rank,
        world_size,
        seed,
        epoch,
        decode,
        verify,
        shuffle_shards=shuffle_seed is not None,
    )
    return EvalLoader(plan, num_workers, inp.shard_samples, flag_device, pin_memory)
