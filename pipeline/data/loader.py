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

**Training** (:func:`build_train_loader`): each (rank, worker) resamples shards with replacement from the
whole list with its own RNG seeded by ``(seed, epoch, rank, worker)``, shuffles samples in a seeded buffer and
yields a fixed number of batches per rank per epoch (``epoch_batches``, default ``total_samples //
(batch_size · world_size)``) split over the workers. Batch *i* of an epoch always comes from worker
``i % W`` and the main process re-orders by *i*, so the stream does not depend on DataLoader scheduling.
A corrupt sample or shard only means the stream reads one more sample; the step count never changes and no
rank waits for another.

**Resume contract** (:class:`LoaderState` = epoch, batches consumed this epoch, seed): restoring a state
and iterating yields exactly the batches the original run would have yielded next, *given the same shard
list, batch size, world size, rank and number of workers*. Each worker re-creates its RNG for the epoch
and fast-forwards past the raw samples of its already-consumed batches without decoding them. Not
reproduced: a different ``num_workers`` or world size (the per-(rank, worker) streams differ — the run
continues with a fresh but still deterministic stream), and a sample whose *image decoding* failed inside
the skipped range (fast-forward counts it, the original run replaced it, so the stream shifts by one
sample); structurally bad samples (truncated tar, missing modality) are filtered before the fast-forward
and keep the stream exact.

**Exact pass** (:func:`build_eval_loader`): shards go to ranks (``shards[rank::world_size]``, webdataset's
``split_by_node``) and then to workers (``[worker::W]``, ``split_by_worker``); every listed sample is read
once, partial last batches included. Every batch carries ``__valid__`` (bool (N,)). A rank that runs out
keeps yielding a padding batch (a real sample, ``__valid__`` all False) until the all-reduced "anyone still
has data" flag is 0 on every rank, so all ranks run the same number of steps (collectives inside the model
forward — ZeRO-3 parameter gathers — cannot hang) and weighting by ``__valid__`` counts nothing twice.
Fewer shards than ``world_size × max(1, num_workers)`` raises ``ValueError`` before anything starts.

**Corruption**: an unreadable or truncated shard, a sample missing a modality, or an undecodable image is
skipped, counted (``loader.skipped_samples`` / ``loader.shard_errors``, summed over workers) and logged; a
worker that reads ``2·len(shards)+8`` shards in a row without a usable sample raises instead of spinning.

**S3**: ``s3://`` URLs are opened by a webdataset ``gopen`` handler backed by s3fs, whose filesystem object
is created inside each worker on first use (one per process id), so no worker ever uses an instance
created before it forked.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tarfile_samples

from . import storage
from .codecs import decode_image_bytes
from .manifest import ModalitySpec, ShardManifest, load_manifest

log = logging.getLogger(__name__)

Decode = str | Callable[[dict[str, Any]], dict[str, Any]] | None
ShardSource = str | list[str] | tuple[str, ...] | ShardManifest


@dataclass
class LoaderState:
    """Where a training loader is: ``epoch``, ``batches`` consumed (delivered) in it on this rank, ``seed``."""

    epoch: int = 0
    batches: int = 0
    seed: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches, self.seed = int(state["epoch"]), int(state["batches"]), int(state["seed"])


# -- input resolution ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Input:
    urls: tuple[str, ...]
    modalities: dict[str, ModalitySpec] | None
    shard_samples: tuple[int, ...] | None
    manifest: ShardManifest | None


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
    return _Input(tuple(manifest.shard_urls()), manifest.modalities, tuple(s.samples for s in manifest.shards),
                  manifest)


# -- decoding and batching -----------------------------------------------------------------------------

def _is_label(name: str, modalities: dict[str, ModalitySpec] | None) -> bool:
    if modalities is not None and name in modalities:
        return modalities[name].kind == "label"
    return name.split(".")[0] in ("label", "labels", "mask", "seg")


def decode_sample(sample: dict[str, Any], modalities: dict[str, ModalitySpec] | None = None) -> dict[str, Any]:
    """Raw tar members → tensors (see the module table). ``ValueError`` naming the member when undecodable."""
    out: dict[str, Any] = {}
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    for name, data in sample.items():
        if name.startswith("__"):
            if name == "__key__":
                out[name] = data
            continue
        ext = name.rsplit(".", 1)[-1]
        if ext in ("png", "jpg", "jpeg"):
            a = decode_image_bytes(data, f"{where}.{name}")
            if _is_label(name, modalities):
                if a.ndim != 2:
                    raise ValueError(f"{where}.{name}: a label image must be single-channel, got shape {a.shape}")
                out[name] = torch.from_numpy(a.astype(np.int64))
            else:
                out[name] = torch.from_numpy(np.ascontiguousarray((a[:, :, None] if a.ndim == 2 else a).transpose(2, 0, 1)))
        elif ext == "npy":
            out[name] = torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))
        elif ext == "txt":
            out[name] = data.decode("utf-8")
        elif ext == "json":
            out[name] = json.loads(data)
        elif ext == "cls":
            out[name] = int(data)
        else:
            out[name] = data
    return out


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors (equal shapes required), list everything else."""
    batch: dict[str, Any] = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        if isinstance(values[0], torch.Tensor):
            shapes = sorted({tuple(v.shape) for v in values})
            if len(shapes) > 1:
                raise ValueError(f"cannot batch {name}: shapes differ within a batch {shapes[:3]}; shard with a fixed "
                                 "image size (e.g. mmimdb --image-size) or use batch_size=1")
            batch[name] = torch.stack(values)
        else:
            batch[name] = values
    return batch


# -- the per-worker stream -----------------------------------------------------------------------------

@dataclass
class _Counters:
    skipped_samples: int = 0
    shard_errors: int = 0


@dataclass(frozen=True)
class _Plan:
    """What one rank's workers stream (picklable; shipped to DataLoader workers)."""

    mode: str  # "train" | "exact"
    urls: tuple[str, ...]
    modalities: dict[str, ModalitySpec] | None
    required: tuple[str, ...] | None
    batch_size: int
    rank: int
    world_size: int
    seed: int
    epoch: int
    decode: Decode
    epoch_batches: int = 0
    consumed: int = 0
    shuffle_buffer: int = 0
    shuffle_shards: bool = False


def _worker_batches(total: int, worker: int, workers: int) -> int:
    """How many of batch indices ``0..total-1`` satisfy ``i % workers == worker``."""
    return max(0, (total - worker + workers - 1) // workers)


class _Stream(IterableDataset):
    def __init__(self, plan: _Plan) -> None:
        super().__init__()
        self.plan = plan

    def __iter__(self) -> Iterator[dict[str, Any]]:
        storage.register_webdataset_s3()  # in the worker: webdataset's handler table is per process
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counters = _Counters()
        if self.plan.mode == "train":
            yield from self._train(worker, workers, counters)
        else:
            yield from self._exact(worker, workers, counters)

    # samples of one shard; structurally bad samples/shards are counted and dropped here
    def _read(self, url: str, counters: _Counters) -> Iterator[dict[str, Any]]:
        errors: list[Exception] = []

        def handler(exc: Exception) -> bool:
            errors.append(exc)
            return True  # keep going: a bad member or shard must never stop the stream

        for sample in tarfile_samples(iter([{"url": url}]), handler=handler):
            required = self.plan.required or ()
            missing = [m for m in required if m not in sample]
            if missing:
                counters.skipped_samples += 1
                log.warning("skipping sample %s in %s: missing %s", sample.get("__key__"), url, missing)
                continue
            yield sample
        if errors:
            counters.shard_errors += 1
            log.warning("shard %s is corrupt or unreadable, read what was intact: %s", url, errors[0])

    def _decode(self, sample: dict[str, Any], counters: _Counters) -> dict[str, Any] | None:
        decode = self.plan.decode
        if decode is None:
            return {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
        try:
            return decode_sample(sample, self.plan.modalities) if decode == "torch" else decode(sample)
        except (ValueError, OSError, KeyError) as exc:
            counters.skipped_samples += 1
            log.warning("skipping undecodable sample %s: %s", sample.get("__key__"), exc)
            return None

    def _batch(self, samples: list[dict[str, Any]], index: int, worker: int, counters: _Counters) -> dict[str, Any]:
        batch = collate(samples)
        batch["__index__"] = index
        batch["__stats__"] = (worker, counters.skipped_samples, counters.shard_errors)
        return batch

    def _train(self, worker: int, workers: int, counters: _Counters) -> Iterator[dict[str, Any]]:
        p = self.plan
        mine = _worker_batches(p.epoch_batches, worker, workers)
        done = _worker_batches(p.consumed, worker, workers)
        if mine <= done:
            return
        name = f"mango-train/{p.seed}/{p.epoch}/{p.rank}/{worker}"
        shard_rng, buffer_rng = random.Random(name + "/shards"), random.Random(name + "/buffer")
        patience = 2 * len(p.urls) + 8

        def raw() -> Iterator[dict[str, Any]]:
            dry = 0
            while True:
                url = shard_rng.choice(p.urls)
                got = False
                for sample in self._read(url, counters):
                    got = True
                    yield sample
                dry = 0 if got else dry + 1
                if dry >= patience:
                    raise RuntimeError(f"rank {p.rank} worker {worker}: {dry} shards in a row without a usable "
                                       f"sample (e.g. {url}); the shard set is unreadable")

        stream = _shuffled(raw(), p.shuffle_buffer, buffer_rng)
        for _ in islice(stream, done * p.batch_size):  # fast-forward without decoding
            pass
        for j in range(done, mine):
            samples: list[dict[str, Any]] = []
            while len(samples) < p.batch_size:
                decoded = self._decode(next(stream), counters)
                if decoded is not None:
                    samples.append(decoded)
            yield self._batch(samples, j * workers + worker, worker, counters)

    def _exact(self, worker: int, workers: int, counters: _Counters) -> Iterator[dict[str, Any]]:
        p = self.plan
        urls = list(p.urls)
        if p.shuffle_shards:
            random.Random(f"mango-exact/{p.seed}/{p.epoch}").shuffle(urls)
        # split_by_node then split_by_worker, with the rank given explicitly rather than read from the env
        mine = urls[p.rank::p.world_size][worker::workers]
        samples: list[dict[str, Any]] = []
        j = 0
        for url in mine:
            for sample in self._read(url, counters):
                decoded = self._decode(sample, counters)
                if decoded is None:
                    continue
                samples.append(decoded)
                if len(samples) == p.batch_size:
                    yield self._batch(samples, j * workers + worker, worker, counters)
                    samples, j = [], j + 1
        if samples:
            yield self._batch(samples, j * workers + worker, worker, counters)


def _shuffled(items: Iterator[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Seeded buffer shuffle (``size`` <= 1: pass through)."""
    if size <= 1:
        yield from items
        return
    buf: list[dict[str, Any]] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        k = rng.randrange(size)
        buf[k], item = item, buf[k]
        yield item
    rng.shuffle(buf)
    yield from buf


# -- the loaders ---------------------------------------------------------------------------------------

@dataclass
class _LoaderBase:
    plan: _Plan
    num_workers: int
    pin_memory: bool = False
    _stats: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)

    def _dataloader(self, plan: _Plan) -> DataLoader:
        return DataLoader(_Stream(plan), batch_size=None, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=False)

    def _record(self, epoch: int, batch: dict[str, Any]) -> dict[str, Any]:
        batch.pop("__index__", None)
        worker, skipped, errors = batch.pop("__stats__")
        self._stats[(epoch, worker)] = (skipped, errors)
        return batch

    @property
    def skipped_samples(self) -> int:
        """Samples skipped as corrupt or incomplete so far (all epochs, all workers of this rank)."""
        return sum(s for s, _ in self._stats.values())

    @property
    def shard_errors(self) -> int:
        """Shards found corrupt or unreadable so far (one count per shard read)."""
        return sum(e for _, e in self._stats.values())


class TrainLoader(_LoaderBase):
    """Iterate for one epoch of exactly ``len(self)`` batches; iterate again for the next epoch.

    ``state`` advances as batches are *delivered*; breaking out mid-epoch and iterating again resumes at
    the next undelivered batch.
    """

    def __init__(self, plan: _Plan, num_workers: int, state: LoaderState, pin_memory: bool = False) -> None:
        super().__init__(plan, num_workers, pin_memory)
        self.state = state

    def __len__(self) -> int:
        return self.plan.epoch_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        st = self.state
        if st.batches >= self.plan.epoch_batches:
            st.epoch, st.batches = st.epoch + 1, 0
        epoch = st.epoch
        plan = replace(self.plan, epoch=epoch, consumed=st.batches, seed=st.seed)
        pending: dict[int, dict[str, Any]] = {}
        for batch in self._dataloader(plan):
            pending[batch["__index__"]] = batch
            while st.batches in pending:
                out = self._record(epoch, pending.pop(st.batches))
                st.batches += 1
                yield out
        if pending or st.batches != self.plan.epoch_batches:
            raise RuntimeError(f"training loader delivered {st.batches} of {self.plan.epoch_batches} batches")
        st.epoch, st.batches = epoch + 1, 0


class EvalLoader(_LoaderBase):
    """One exact pass per iteration; see the module docstring for the ``__valid__`` / flag protocol."""

    def __init__(self, plan: _Plan, num_workers: int, shard_samples: tuple[int, ...] | None,
                 flag_device: str | torch.device | None, pin_memory: bool = False) -> None:
        super().__init__(plan, num_workers, pin_memory)
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
            mine = order[rank::p.world_size]
            steps = max(steps, sum(-(-sum(self.shard_samples[i] for i in mine[w::workers]) // p.batch_size)
                                   for w in range(workers)))
        return steps

    def _any_rank_has_data(self, has: bool) -> bool:
        if self.plan.world_size == 1:
            return has
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"an exact pass over {self.plan.world_size} ranks needs torch.distributed "
                               "initialised (the empty-batch flag is all-reduced)")
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
            if not exhausted:
                batch = next(it, None)
                exhausted = batch is None
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
            raise RuntimeError(f"rank {self.plan.rank} read no sample at all and has no manifest to shape a "
                               "padding batch from")
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


def build_train_loader(urls_or_manifest: ShardSource, batch_size: int, *, rank: int, world_size: int,
                       num_workers: int, seed: int = 0, epoch_batches: int | None = None, decode: Decode = "torch",
                       state: LoaderState | None = None, shuffle_buffer: int = 256,
                       modalities: tuple[str, ...] | None = None, pin_memory: bool = False) -> TrainLoader:
    """Resampled training loader with a fixed number of batches per rank per epoch (see module docstring).

    ``state``, when given, is used (and advanced) in place — restore a checkpoint with
    ``state.load_state_dict(...)`` before building, or pass a fresh ``LoaderState(seed=seed)``.
    ``modalities`` restricts/declares the required members (default: the manifest's).
    """
    _check_common(batch_size, rank, world_size, num_workers)
    inp = _resolve(urls_or_manifest)
    if epoch_batches is None:
        if inp.shard_samples is None:
            raise ValueError("epoch_batches is required when the loader is built from shard URLs (no manifest)")
        epoch_batches = sum(inp.shard_samples) // (batch_size * world_size)
        if epoch_batches < 1:
            raise ValueError(f"{sum(inp.shard_samples)} samples are fewer than one batch of {batch_size} per rank "
                             f"on {world_size} ranks; pass epoch_batches explicitly")
    if epoch_batches < 1:
        raise ValueError(f"epoch_batches must be >= 1, got {epoch_batches}")
    if len(inp.urls) < world_size * max(1, num_workers):
        log.warning("%d shards for %d ranks x %d workers: resampled streams will share shards heavily",
                    len(inp.urls), world_size, max(1, num_workers))
    state = state if state is not None else LoaderState(seed=seed)
    plan = _Plan("train", inp.urls, inp.modalities, _required(inp, modalities), batch_size, rank, world_size,
                 state.seed, state.epoch, decode, epoch_batches=epoch_batches, shuffle_buffer=shuffle_buffer)
    return TrainLoader(plan, num_workers, state, pin_memory)


def build_eval_loader(urls_or_manifest: ShardSource, batch_size: int, *, rank: int, world_size: int,
                      num_workers: int, decode: Decode = "torch", shuffle_seed: int | None = None, epoch: int = 0,
                      modalities: tuple[str, ...] | None = None, flag_device: str | torch.device | None = None,
                      pin_memory: bool = False) -> EvalLoader:
    """Exact pass: every listed sample once across all ranks; equal step counts via the all-reduced flag.

    ``shuffle_seed`` shuffles the shard order per ``epoch`` (for exact training epochs); ``None`` keeps
    manifest order. ``flag_device`` is where the flag is all-reduced (default: cuda under NCCL, else cpu).
    """
    _check_common(batch_size, rank, world_size, num_workers)
    inp = _resolve(urls_or_manifest)
    needed = world_size * max(1, num_workers)
    if len(inp.urls) < needed:
        raise ValueError(f"exact pass needs at least world_size x workers = {world_size} x {max(1, num_workers)} = "
                         f"{needed} shards, got {len(inp.urls)}; re-shard with a smaller --samples-per-shard or "
                         "use fewer workers")
    plan = _Plan("exact", inp.urls, inp.modalities, _required(inp, modalities), batch_size, rank, world_size,
                 shuffle_seed or 0, epoch, decode, shuffle_shards=shuffle_seed is not None)
    return EvalLoader(plan, num_workers, inp.shard_samples, flag_device, pin_memory)


def _check_common(batch_size: int, rank: int, world_size: int, num_workers: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
