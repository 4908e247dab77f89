"""Distributed WebDataset training loaders (exact epochs or a resampled stream), and what all loaders share.

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

**Exact pass**: :func:`pipeline.data.evalloader.build_eval_loader` (every sample once, any world size).

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
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils.data import DataLoader
from webdataset.shardlists import expand_urls

from .epochs import EpochCursor
from .manifest import ModalitySpec, ShardManifest, load_manifest
from .stream import Decode, ShardStream, StreamPlan, collate, decode_sample

log = logging.getLogger(__name__)

__all__ = [
    "LoaderState",
    "TrainLoader",
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


def stream_plan(
    mode: str,
    inp: _Input,
    modalities: tuple[str, ...] | None,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    epoch: int,
    decode: Decode,
    verify: str,
    **extra: Any,
) -> StreamPlan:
    """What one rank's workers stream, for any loader (``extra``: the mode's own :class:`StreamPlan` fields)."""
    required = _required(inp, modalities)
    return StreamPlan(
        mode,
        inp.urls,
        inp.modalities,
        required,
        batch_size,
        rank,
        world_size,
        seed,
        epoch,
        decode,
        verify=verify,
        expected=inp.expected,
        **extra,
    )


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
    mode = "epoch" if sampling == "exact" else "train"
    plan = stream_plan(
        mode, inp, modalities, batch_size, rank, world_size, state.seed, state.epoch, decode, verify, **extra
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


def _check_common(batch_size: int, rank: int, world_size: int, num_workers: int, decode: Decode) -> None:
    if not (decode is None or decode == "torch" or callable(decode)):
        raise ValueError(f"decode must be 'torch', None (raw bytes) or a callable, got {decode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
