"""What every DataLoader worker runs: read shards, drop and count damage, decode, batch.

A worker of a training stream (``StreamPlan.mode == "train"``) resamples shards with replacement using an
RNG seeded by ``(seed, epoch, rank, worker)``, shuffles samples in a buffer seeded the same way and emits the
epoch's batch indices ``i`` with ``i % workers == worker``, tagging each batch with ``__index__ = i`` so the
main process can restore the global order. On resume it first skips ``batch_size`` raw (undecoded) samples
per already-consumed batch. An exact stream (``mode == "exact"``) reads ``shards[rank::world][worker::W]``
once and ends with a stats-only trailer.

Damage never stops a stream: webdataset's tar reader reports a corrupt shard to our handler (counted once
per shard, logged, the intact part is kept), a sample lacking a required member is dropped and counted, and
an undecodable sample likewise. Counts travel to the main process inside each batch (``__stats__``).
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from . import storage
from .codecs import decode_image_bytes
from .epochs import locate, take, window_slots
from .manifest import ModalitySpec
from .verify import _CHECKED, check_shard

log = logging.getLogger(__name__)

Decode = str | Callable[[dict[str, Any]], dict[str, Any]] | None


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
                chw = (a[:, :, None] if a.ndim == 2 else a).transpose(2, 0, 1)
                out[name] = torch.from_numpy(np.ascontiguousarray(chw))
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
                raise ValueError(
                    f"cannot batch {name}: shapes differ within a batch {shapes[:3]}; shard with a fixed "
                    "image size (e.g. mmimdb --image-size) or use batch_size=1"
                )
            batch[name] = torch.stack(values)
        else:
            batch[name] = values
    return batch


# -- the per-worker stream -----------------------------------------------------------------------------


@dataclass
class Counters:
    """Damage one worker has seen this epoch (cumulative; reported with every batch)."""

    skipped_samples: int = 0
    shard_errors: int = 0
    bad_shards: list[str] = field(default_factory=list)  # failed the manifest check: skipped whole


@dataclass(frozen=True)
class StreamPlan:
    """What one rank's workers stream (picklable; shipped to DataLoader workers)."""

    mode: str  # "train" (resampled) | "epoch" (exact training epochs) | "exact" (one pass)
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
    verify: str = "off"  # data.verify: size | sha256 | off (see pipeline.data.verify.check_shard)
    expected: tuple[tuple[int, str], ...] | None = None  # (size, sha256) per url, from the manifest
    portion: tuple[tuple[int, int, int], ...] = ()  # "epoch": this rank's positions of the round (epochs.py)
    shard_samples: tuple[int, ...] | None = None  # "epoch": stored samples per url, from the manifest


def worker_batches(total: int, worker: int, workers: int) -> int:
    """How many of batch indices ``0..total-1`` satisfy ``i % workers == worker``."""
    return max(0, (total - worker + workers - 1) // workers)


class ShardStream(IterableDataset):
    """The IterableDataset a DataLoader runs: yields collated batch dicts (see the module docstring)."""

    def __init__(self, plan: StreamPlan) -> None:
        super().__init__()
        self.plan = plan

    def __iter__(self) -> Iterator[dict[str, Any]]:
        storage.register_webdataset_s3()  # in the worker: webdataset's handler table is per process
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counters = Counters()
        if self.plan.mode == "train":
            yield from self._train(worker, workers, counters)
        elif self.plan.mode == "epoch":
            yield from _EpochReader(self, worker, workers, counters).batches()
        else:
            yield from self._exact(worker, workers, counters)

    # samples of one shard; structurally bad samples/shards are counted and dropped here
    def _read(self, url: str, counters: Counters, placeholders: bool = False) -> Iterator[dict[str, Any] | None]:
        """Samples of one shard in stored order; with ``placeholders`` a sample lacking a required member is a
        ``None`` in its place (exact epochs address samples by their stored index)."""
        p = self.plan
        if p.verify != "off" and p.expected is not None:
            size, sha = p.expected[p.urls.index(url)]
            known = (url, p.verify) in _CHECKED
            reason = check_shard(url, size, sha, p.verify)
            if reason:
                if url not in counters.bad_shards:
                    counters.bad_shards.append(url)
                if not known:  # once per process
                    log.warning(
                        "shard %s does not match its manifest (%s): skipped whole (data.verify=%s)",
                        url,
                        reason,
                        p.verify,
                    )
                return
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
                if placeholders:
                    yield None
                continue
            yield sample
        if errors:
            counters.shard_errors += 1
            log.warning("shard %s is corrupt or unreadable, read what was intact: %s", url, errors[0])

    def _decode(self, sample: dict[str, Any], counters: Counters) -> dict[str, Any] | None:
        decode = self.plan.decode
        if decode is None:
            return {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
        try:
            return decode_sample(sample, self.plan.modalities) if decode == "torch" else decode(sample)
        except (ValueError, OSError, KeyError) as exc:
            counters.skipped_samples += 1
            log.warning("skipping undecodable sample %s: %s", sample.get("__key__"), exc)
            return None

    def _batch(self, samples: list[dict[str, Any]], index: int, worker: int, counters: Counters) -> dict[str, Any]:
        batch = collate(samples)
        batch["__index__"] = index
        batch["__stats__"] = (worker, counters.skipped_samples, counters.shard_errors, tuple(counters.bad_shards))
        return batch

    def _train(self, worker: int, workers: int, counters: Counters) -> Iterator[dict[str, Any]]:
        p = self.plan
        mine = worker_batches(p.epoch_batches, worker, workers)
        done = worker_batches(p.consumed, worker, workers)
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
                    raise RuntimeError(
                        f"rank {p.rank} worker {worker}: {dry} shards in a row without a usable "
                        f"sample (e.g. {url}); the shard set is unreadable"
                    )

        stream = shuffled(raw(), p.shuffle_buffer, buffer_rng)
        for _ in islice(stream, done * p.batch_size):  # fast-forward without decoding
            pass
        for j in range(done, mine):
            samples: list[dict[str, Any]] = []
            while len(samples) < p.batch_size:
                decoded = self._decode(next(stream), counters)
                if decoded is not None:
                    samples.append(decoded)
            yield self._batch(samples, j * workers + worker, worker, counters)

    def _exact(self, worker: int, workers: int, counters: Counters) -> Iterator[dict[str, Any]]:
        p = self.plan
        urls = list(p.urls)
        if p.shuffle_shards:
            random.Random(f"mango-exact/{p.seed}/{p.epoch}").shuffle(urls)
        # split_by_node then split_by_worker, with the rank given explicitly rather than read from the env
        mine = urls[p.rank :: p.world_size][worker::workers]
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
        # Counts travel with batches; this trailer reports damage found after the last batch.
        yield {
            "__stats__": (worker, counters.skipped_samples, counters.shard_errors, tuple(counters.bad_shards)),
            "__trailer__": True,
        }


class _EpochReader:
    """One worker's share of a rank's exact-epoch slice (``mode == "epoch"``; the order is :mod:`.epochs`).

    Batch ``i`` of the slice is positions ``[i·B, (i+1)·B)``; this worker builds the batches with
    ``i % workers == worker`` from ``consumed`` on. It reads the slice's shards sequentially (only the shards
    and windows the slice covers; positions of other workers' batches are read raw and never decoded) and
    holds one window of raw samples. A damaged position (a sample missing a member, undecodable, past a
    truncation, or in a shard that failed the manifest check) is counted and its slot filled by repeating a
    good sample of the same batch (or, for a batch with none, the worker's most recent good sample), so every
    rank still delivers the same number of full batches.
    """

    def __init__(self, stream: ShardStream, worker: int, workers: int, counters: Counters) -> None:
        self.stream, self.plan, self.counters = stream, stream.plan, counters
        self.worker, self.workers = worker, workers
        self._url: str | None = None
        self._iter: Iterator[dict[str, Any] | None] | None = None
        self._next = 0  # stored index the open shard iterator yields next

    def _window(self, url: str, lo: int, size: int) -> list[dict[str, Any] | None]:
        """Stored samples ``lo..lo+size-1`` of a shard (``None`` where damaged)."""
        if self._url != url or self._next > lo:
            self._url, self._next = url, 0
            self._iter = self.stream._read(url, self.counters, placeholders=True)
        out: list[dict[str, Any] | None] = []
        while self._next < lo + size:
            sample = next(self._iter, None) if self._iter is not None else None
            if self._next >= lo:
                out.append(sample)
            self._next += 1
        return out

    def _positions(self, a: int, b: int) -> Iterator[dict[str, Any] | None]:
        """Raw samples at slice positions ``a..b-1``, in order."""
        p = self.plan
        assert p.shard_samples is not None
        for interval in take(p.portion, a, b):
            epoch = interval[0]
            for shard, w, lo_pos, hi_pos in locate(interval, p.seed, p.shard_samples, p.shuffle_buffer):
                n = p.shard_samples[shard]
                lo = w * p.shuffle_buffer
                raw = self._window(p.urls[shard], lo, min(p.shuffle_buffer, n - lo))
                for stored in window_slots(p.seed, epoch, shard, w, p.shuffle_buffer, n, lo_pos, hi_pos):
                    yield raw[stored - lo]

    def batches(self) -> Iterator[dict[str, Any]]:
        p, B = self.plan, self.plan.batch_size
        mine = [i for i in range(p.consumed, p.epoch_batches) if i % self.workers == self.worker]
        if not mine:
            return
        spare: dict[str, Any] | None = None
        starved: list[int] = []
        current: list[dict[str, Any]] = []
        for v, raw in enumerate(self._positions(mine[0] * B, (mine[-1] + 1) * B), start=mine[0] * B):
            i = v // B
            if i % self.workers != self.worker:
                continue
            decoded = None
            if raw is not None:
                decoded = self.stream._decode(raw, self.counters)
            elif self._url not in self.counters.bad_shards:
                self.counters.skipped_samples += 1
            if decoded is not None:
                current.append(decoded)
            if (v + 1) % B:
                continue
            if current:
                spare = current[-1]
                batch = [current[k % len(current)] for k in range(B)]
                yield self.stream._batch(batch, i, self.worker, self.counters)
                for j in starved:
                    yield self.stream._batch([spare] * B, j, self.worker, self.counters)
                starved = []
            elif spare is not None:
                yield self.stream._batch([spare] * B, i, self.worker, self.counters)
            else:
                starved.append(i)
            current = []
        if starved:
            raise RuntimeError(
                f"rank {p.rank} worker {self.worker}: no readable sample in its share of the epoch "
                f"(batches {starved[:3]}...); the shard set is unreadable"
            )


def shuffled(items: Iterator[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
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
