"""Distributed WebDataset loaders: a resampled training stream and an exact (every sample once) pass.

Input: a manifest URL (``.../manifest-<split>.json``, local or ``s3://``), a loaded :class:`ShardManifest`,
or explicit shard URLs (a list or a brace pattern; then nothing is known about sample counts or modalities).

Decoded samples (``decode="torch"``, the default) are dicts keyed by modality, batched by stacking:

=================  =====================================  ==========================================
member             stored                                 batch value
=================  =====================================  ==========================================
``*.png`` image    uint8 (H, W, 3)                        uint8 (N, 3, H, W)
``depth*.png`` …   uint16 (H, W) (mm, 0 = invalid)        uint16 (N, 1, H, W) — never rescaled
``label.png``      uint8 (H, W), 255 = ignore             int64 (N, H, W) (any modality of kind label)
``*.npy``          array                                  stacked tensor, dtype kept
``*.txt``          UTF-8                                  list of str
``json``           JSON                                   list of dicts
``__key__``                                               list of str
=================  =====================================  ==========================================

torch implements few operations on ``uint16`` (no comparisons or arithmetic in 2.13): convert depth with
``.float()`` or ``.to(torch.int32)`` before use; the loader keeps the stored integers so nothing is rescaled
or rounded behind the model's back.

**Training** (:func:`build_train_loader`) has two samplings.

*Exact epochs* (``sampling="exact"``, the default with a manifest; ``data.sampling``): every sample of an
epoch is trained once, at any world size and across resizes between requeues. The epoch's order (shards
shuffled by ``(seed, epoch)``, samples permuted within windows of ``shuffle_buffer`` stored samples) is split
into contiguous per-rank slices of whole batches; the few samples that do not fill a batch on every rank are
carried into the next round, ahead of the next epoch, never dropped. The global cursor
(:class:`~pipeline.data.epochs.EpochCursor`, in :class:`LoaderState`) is identical on every rank; at another
world or batch size the untrained positions are re-split by the rule in :mod:`pipeline.data.epochs`. Batch
*i* of a rank's slice comes from worker ``i % W``. A damaged sample's slot is filled by repeating a good
sample of the same batch (counted in ``skipped_samples``), so every rank delivers full batches in lockstep.

*Resampled* (``sampling="resample"``; also for shard URLs without a manifest): each (rank, worker) resamples
shards with replacement from the whole list with its own RNG seeded by ``(seed, epoch, rank, worker)``,
shuffles samples in a seeded buffer and yields a fixed number of batches per rank per epoch
(``epoch_batches``, default ``total_samples // (batch_size · world_size)``) split over the workers. Batch *i*
of an epoch always comes from worker ``i % W`` and the main process re-orders by *i*, so the stream does not
depend on DataLoader scheduling. A corrupt sample or shard only means the stream reads one more sample; the
step count never changes and no rank waits for another.

**Resume contract** (:class:`LoaderState` = epoch, batches consumed this epoch, seed, and the exact-epoch
cursor): restoring a state and iterating yields exactly the batches the original run would have yielded
next, *given the same shard list, batch size, world size and rank* (exact epochs: any ``num_workers``; a
different world or batch size re-splits what is left, exactly). For resampled streams also the same number
of workers: each worker re-creates its RNG for the epoch and fast-forwards past the raw samples of its
already-consumed batches without decoding them; a different ``num_workers`` or world size continues with a
fresh but still deterministic stream, and a sample whose *image decoding* failed inside the skipped range
shifts the stream by one sample.

**Exact pass** (:func:`build_eval_loader`): shards go to ranks (``shards[rank::world_size]``, webdataset's
``split_by_node``) and then to workers (``[worker::W]``, ``split_by_worker``); every listed sample is read
once, partial last batches included. Every batch carries ``__valid__`` (bool (N,)). A rank that runs out
keeps yielding a padding batch (a real sample, ``__valid__`` all False) until the all-reduced "anyone still
has data" flag is 0 on every rank, so all ranks run the same number of steps (collectives inside the model
forward — ZeRO-3 parameter gathers — cannot hang) and weighting by ``__valid__`` counts nothing twice.
Fewer shards than ranks is fine: a rank without a shard yields only padding batches (shaped from the
manifest) and contributes nothing to the sums. An exact pass always starts from its beginning (no mid-pass
resume); padding batches hold one sample.

**Corruption**: an unreadable or truncated shard, a sample missing a modality, or an undecodable image is
skipped, counted (``loader.skipped_samples`` / ``loader.shard_errors``, summed over workers) and logged; a
worker that reads ``2·len(shards)+8`` shards in a row without a usable sample raises instead of spinning.

**S3**: ``s3://`` URLs are opened by a webdataset ``gopen`` handler backed by s3fs, whose filesystem object
is created inside each worker on first use (one per process id), so no worker ever uses an instance
created before it forked.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import random
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from webdataset.shardlists import expand_urls

from .epochs import EpochCursor
from .manifest import ModalitySpec, ShardManifest, load_manifest
from .stream import Decode, ShardStream, StreamPlan, collate, decode_sample

log = logging.getLogger(__name__)

__all__ = [
    "EvalLoader",
    "LoaderState",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "collate",
    "decode_sample",
]

ShardSource = str | list[str] | tuple[str, ...] | ShardManifest


@dataclass
class LoaderState:
    """Where a training loader is: ``epoch``, ``batches`` consumed (delivered) in it on this rank, ``seed``;
    with exact epochs also the global :class:`~pipeline.data.epochs.EpochCursor` (identical on every rank)."""

    epoch: int = 0
    batches: int = 0
    seed: int = 0
    cursor: EpochCursor = field(default_factory=EpochCursor)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "batches": self.batches, "seed": self.seed}
        if self.cursor.pending:
            state["cursor"] = self.cursor.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batches, self.seed = int(state["epoch"]), int(state["batches"]), int(state["seed"])
        self.cursor = EpochCursor()
        if "cursor" in state:
            self.cursor.load_state_dict(state["cursor"])

    def resplit(self, old_world: int, new_world: int, total_samples: int, batch_size: int) -> None:
        """Carry the epoch position to another world size (elastic resume).

        Exact epochs: what no rank has trained yet is re-split over the new ranks (the rule in
        :mod:`pipeline.data.epochs`: no sample of an epoch repeated or dropped). The exact loader also does
        this by itself when it finds a cursor made for another world or batch size.

        Resampled streams: the position is kept in *global* batches. ``batches`` per rank at ``old_world`` ranks
        is ``batches · old_world`` global batches; at ``new_world`` ranks each rank resumes at ``ceil(that /
        new_world)`` of the epoch's ``total_samples // (batch_size · new_world)`` batches, moving to the next
        epoch when that is all of them; the streams are re-derived from ``(seed, epoch, rank, worker)``.
        """
        if self.cursor.pending:
            if (self.cursor.world, self.cursor.batch_size) != (new_world, batch_size):
                self.cursor.resplit(self.batches, new_world, batch_size, total_samples)
                self.batches, self.epoch = 0, self.cursor.epoch
            return
        if old_world == new_world:
            return
        global_done = self.batches * old_world
        per_rank = -(-global_done // new_world)
        epoch_batches = max(1, total_samples // (batch_size * new_world))
        if per_rank >= epoch_batches:
            self.epoch, self.batches = self.epoch + 1, 0
        else:
            self.batches = per_rank


# -- input resolution ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Input:
    urls: tuple[str, ...]
    modalities: dict[str, ModalitySpec] | None
    shard_samples: tuple[int, ...] | None
    manifest: ShardManifest | None

    @property
    def expected(self) -> tuple[tuple[int, str], ...] | None:
        return None if self.manifest is None else tuple((s.size, s.sha256) for s in self.manifest.shards)


def _resolve(source: ShardSource) -> _Input:
    if isinstance(source, ShardManifest):
        manifest = source
    elif isinstance(source, str) and source.endswith(".json"):
        manifest = load_manifest(source)
    else:
        urls = tuple(expand_urls(source)) if isinstance(source, str) else tuple(source)
        if not urls:
            raise ValueError("no shard URLs given")
        return _Input(urls, None, None, None)
    return _Input(
        tuple(manifest.shard_urls()), manifest.modalities, tuple(s.samples for s in manifest.shards), manifest
    )


# -- the loaders ---------------------------------------------------------------------------------------


class _LoaderBase:
    def __init__(
        self, plan: StreamPlan, num_workers: int, pin_memory: bool, shard_samples: tuple[int, ...] | None = None
    ) -> None:
        self.plan, self.num_workers, self.pin_memory = plan, num_workers, pin_memory
        self._samples = shard_samples
        self._stats: dict[tuple[int, int], tuple[int, int]] = {}  # (epoch, worker) -> (skipped, shard errors)
        self._bad: set[str] = set()  # shards that failed the manifest check (data.verify), any worker

    def _dataloader(self, plan: StreamPlan) -> DataLoader:
        # Workers are forked explicitly: a rank started by torch.multiprocessing.spawn inherits "spawn" as
        # its default, and spawned workers re-import torch (seconds each). Forking is safe here because the
        # stream holds no threads or handles until it runs, and each worker opens its own files / s3fs.
        context = "fork" if self.num_workers > 0 and "fork" in multiprocessing.get_all_start_methods() else None
        # A private generator: creating a DataLoader iterator draws the workers' base seed, which would
        # otherwise advance the caller's global torch RNG (and differ between a run and its resume).
        digest = hashlib.sha256(f"mango-loader/{plan.mode}/{plan.seed}/{plan.epoch}/{plan.rank}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return DataLoader(
            ShardStream(plan),
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            multiprocessing_context=context,
            generator=generator,
        )

    def _record(self, epoch: int, batch: dict[str, Any]) -> dict[str, Any]:
        batch.pop("__index__", None)
        worker, skipped, errors, bad = batch.pop("__stats__")
        self._stats[(epoch, worker)] = (skipped, errors)
        self._bad.update(bad)
        return batch

    @property
    def bad_shards(self) -> set[str]:
        """URLs of shards skipped whole because they did not match the manifest (``verify``)."""
        return set(self._bad)

    def bad_samples(self) -> int:
        """Samples the manifest lists in :attr:`bad_shards` (0 when built without a manifest)."""
        if self.plan.expected is None or self._samples is None:
            return 0
        return sum(n for url, n in zip(self.plan.urls, self._samples) if url in self._bad)

    @property
    def skipped_samples(self) -> int:
        """Samples skipped as corrupt or incomplete so far (all epochs, all workers of this rank)."""
        return sum(s for s, _ in self._stats.values())

    @property
    def shard_errors(self) -> int:
        """Shards found corrupt or unreadable so far (one count per shard read)."""
        return sum(e for _, e in self._stats.values())


class TrainLoader(_LoaderBase):
    """Iterate for one epoch (exact epochs: one round) of ``len(self)`` batches; iterate again for the next.

    ``state`` advances as batches are *delivered*; breaking out mid-epoch and iterating again resumes at
    the next undelivered batch.
    """

    def __init__(
        self,
        plan: StreamPlan,
        num_workers: int,
        state: LoaderState,
        pin_memory: bool = False,
        shard_samples: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__(plan, num_workers, pin_memory, shard_samples)
        self.state = state

    @property
    def exact(self) -> bool:
        return self.plan.mode == "epoch"

    def _align(self) -> None:
        """Exact epochs: a cursor for this world and batch size, positioned at an undelivered batch."""
        st, c, p = self.state, self.state.cursor, self.plan
        size = sum(p.shard_samples or ())
        if not c.pending:
            c.start(st.epoch, size, p.world_size, p.batch_size)
        elif (c.world, c.batch_size) != (p.world_size, p.batch_size):
            c.resplit(st.batches, p.world_size, p.batch_size, size)
            st.batches = 0
        if st.batches >= c.steps():
            c.next_round(size)
            st.batches = 0
        st.epoch = c.epoch

    def __len__(self) -> int:
        if self.exact:
            self._align()
            return self.state.cursor.steps()
        return self.plan.epoch_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        st = self.state
        if self.exact:
            self._align()
            plan = replace(
                self.plan,
                epoch=st.epoch,
                consumed=st.batches,
                seed=st.seed,
                epoch_batches=st.cursor.steps(),
                portion=tuple(st.cursor.slice_for(self.plan.rank)),
            )
        else:
            if st.batches >= self.plan.epoch_batches:
                st.epoch, st.batches = st.epoch + 1, 0
            plan = replace(self.plan, epoch=st.epoch, consumed=st.batches, seed=st.seed)
        epoch = st.epoch
        pending: dict[int, dict[str, Any]] = {}
        for batch in self._dataloader(plan):
            pending[batch["__index__"]] = batch
            while st.batches in pending:
                out = self._record(epoch, pending.pop(st.batches))
                st.batches += 1
                yield out
        if pending or st.batches != plan.epoch_batches:
            raise RuntimeError(f"training loader delivered {st.batches} of {plan.epoch_batches} batches")
        if self.exact:
            self._align()  # the next round starts: its cursor is what a checkpoint saved now holds
        else:
            st.epoch, st.batches = epoch + 1, 0


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


def _required(inp: _Input, modalities: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if modalities is not None:
        return tuple(modalities)
    return tuple(sorted(inp.modalities)) if inp.modalities is not None else None


def build_train_loader(
    urls_or_manifest: ShardSource,
    batch_size: int,
    *,
    rank: int,
    world_size: int,
    num_workers: int,
    seed: int | None = None,
    epoch_batches: int | None = None,
    decode: Decode = "torch",
    state: LoaderState | None = None,
    shuffle_buffer: int = 256,
    modalities: tuple[str, ...] | None = None,
    pin_memory: bool = False,
    verify: str = "off",
    sampling: str | None = None,
) -> TrainLoader:
    """Training loader: exact epochs or a resampled stream (see the module docstring).

    ``sampling``: ``"exact"`` (every sample of an epoch once, at any world size and across resizes; needs a
    manifest's per-shard counts; ``shuffle_buffer`` is then the in-shard shuffle window), ``"resample"`` (shards
    drawn with replacement, ``epoch_batches`` per rank per epoch), or ``None``: exact when a manifest is given
    and ``epoch_batches`` is not.

    ``state``, when given, is used (and advanced) in place and its seed is the seed — restore a checkpoint
    with ``state.load_state_dict(...)`` before building; without it a fresh ``LoaderState(seed=seed or 0)``
    is created (``loader.state``). ``modalities`` names the members every sample must have (default: the
    manifest's; samples lacking one are skipped and counted). ``shuffle_buffer`` is in samples. ``verify``
    (``size``/``sha256``/``off``, manifest input only): each shard checked before its samples are used, a bad
    one skipped whole (``loader.bad_shards``).
    """
    _check_common(batch_size, rank, world_size, num_workers, decode)
    inp = _resolve(urls_or_manifest)
    if sampling is None:
        sampling = "exact" if inp.shard_samples is not None and epoch_batches is None else "resample"
    if sampling not in ("exact", "resample"):
        raise ValueError(f"sampling must be 'exact' or 'resample', got {sampling!r}")
    if state is None:
        state = LoaderState(seed=seed or 0)
    elif seed is not None and seed != state.seed:
        raise ValueError(f"seed={seed} disagrees with the restored state's seed {state.seed}; pass one of them")
    if sampling == "exact":
        extra = _exact_plan(inp, batch_size, world_size, epoch_batches, shuffle_buffer)
    else:
        extra = _resampled_plan(inp, batch_size, world_size, num_workers, epoch_batches, shuffle_buffer)
    plan = StreamPlan(
        "epoch" if sampling == "exact" else "train",
        inp.urls,
        inp.modalities,
        _required(inp, modalities),
        batch_size,
        rank,
        world_size,
        state.seed,
        state.epoch,
        decode,
        verify=verify,
        expected=inp.expected,
        **extra,
    )
    return TrainLoader(plan, num_workers, state, pin_memory, inp.shard_samples)


def _resampled_plan(
    inp: _Input, batch_size: int, world_size: int, num_workers: int, epoch_batches: int | None, buffer: int
) -> dict[str, Any]:
    if epoch_batches is None:
        if inp.shard_samples is None:
            raise ValueError("epoch_batches is required when the loader is built from shard URLs (no manifest)")
        epoch_batches = sum(inp.shard_samples) // (batch_size * world_size)
        if epoch_batches < 1:
            raise ValueError(
                f"{sum(inp.shard_samples)} samples are fewer than one batch of {batch_size} per rank "
                f"on {world_size} ranks; pass epoch_batches explicitly"
            )
    if epoch_batches < 1:
        raise ValueError(f"epoch_batches must be >= 1, got {epoch_batches}")
    if len(inp.urls) < world_size * max(1, num_workers):
        log.warning(
            "%d shards for %d ranks x %d workers: resampled streams will share shards heavily",
            len(inp.urls),
            world_size,
            max(1, num_workers),
        )
    return {"epoch_batches": epoch_batches, "shuffle_buffer": buffer}


def _exact_plan(
    inp: _Input, batch_size: int, world_size: int, epoch_batches: int | None, window: int
) -> dict[str, Any]:
    if inp.shard_samples is None:
        raise ValueError(
            "exact epochs need each shard's sample count: build the loader from a manifest, or pass "
            "sampling='resample' with epoch_batches"
        )
    if epoch_batches is not None:
        raise ValueError("epoch_batches applies to resampled streams; an exact epoch is the whole split")
    if sum(inp.shard_samples) < batch_size * world_size:
        raise ValueError(
            f"{sum(inp.shard_samples)} samples are fewer than one batch of {batch_size} per rank on {world_size} ranks"
        )
    return {"shuffle_buffer": max(1, window), "shard_samples": inp.shard_samples}


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
    plan = StreamPlan(
        "exact",
        inp.urls,
        inp.modalities,
        _required(inp, modalities),
        batch_size,
        rank,
        world_size,
        shuffle_seed or 0,
        epoch,
        decode,
        shuffle_shards=shuffle_seed is not None,
        verify=verify,
        expected=inp.expected,
    )
    return EvalLoader(plan, num_workers, inp.shard_samples, flag_device, pin_memory)


def _check_common(batch_size: int, rank: int, world_size: int, num_workers: int, decode: Decode) -> None:
    if not (decode is None or decode == "torch" or callable(decode)):
        raise ValueError(f"decode must be 'torch', None (raw bytes) or a callable, got {decode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
