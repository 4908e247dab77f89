"""Write a source's split into WebDataset shards plus a manifest (local directory or ``s3://``).

Layout under ``out``::

    <split>-<task:04d>-<k:06d>.tar            shard k (global index), written by array task ``task``
    <split>-<task:04d>-<k:06d>.tar.receipt.json   written after the shard is published and verified
    manifest-<split>.part-<t>-of-<T>.json      partial manifest of task t (array jobs only)
    manifest-<split>.json                      the commit point; loaders read only what it lists

Work split: the split's sorted keys are cut into shards of ``samples_per_shard`` keys; array task ``t`` of
``T`` owns the contiguous shard range ``[t*S//T, (t+1)*S//T)`` (so tasks own disjoint key ranges and only the
split's last shard is short); ``workers`` processes of one task write whole shards in parallel.

Order of publication, per shard: assemble the tar in a staging file while hashing it → publish (rename /
upload) → on S3 read it back and compare sha256 → write the receipt. After every shard: the manifest, in
one atomic write. A killed job therefore leaves shards and receipts but no manifest naming them, and a
re-run skips every shard whose receipt matches (same source config, split and keys) *and* whose stored
bytes still hash to the receipt's sha256.

Tars are byte-deterministic (sorted members, mtime 0, uid/gid 0), so the same source and options give the
same shard sha256s and the same ``manifest_checksum`` on every run and machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from . import storage
from .codecs import encode_png
from .manifest import ModalitySpec, ShardInfo, ShardManifest, manifest_name, part_manifest_name
from .sources import Source, open_source

log = logging.getLogger(__name__)

DEFAULT_SAMPLES_PER_SHARD = 256
RECEIPT_SUFFIX = ".receipt.json"


@dataclass(frozen=True)
class ShardPlan:
    """One shard to write: global index, file name and the (sorted) keys it covers."""

    index: int
    name: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker process needs to write shards (picklable: the source is rebuilt there)."""

    source: str
    src: str | None
    options: dict[str, Any]
    split: str
    out: str
    skip_bad: bool
    config_digest: str


def shard_name(split: str, task: int, index: int) -> str:
    return f"{split}-{task:04d}-{index:06d}.tar"


def plan_shards(
    keys: list[str], split: str, samples_per_shard: int, task_index: int = 0, num_tasks: int = 1
) -> list[ShardPlan]:
    """The shards array task ``task_index`` of ``num_tasks`` writes (see the module docstring)."""
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"task index {task_index} is outside 0..{num_tasks - 1}")
    total = -(-len(keys) // samples_per_shard)
    lo, hi = task_index * total // num_tasks, (task_index + 1) * total // num_tasks
    return [
        ShardPlan(k, shard_name(split, task_index, k), tuple(keys[k * samples_per_shard : (k + 1) * samples_per_shard]))
        for k in range(lo, hi)
    ]


def resolve_task(
    task_index: int | None, num_tasks: int | None, environ: dict[str, str] | None = None
) -> tuple[int, int]:
    """Array-task coordinates: flags first, then SLURM job arrays, then a Kubernetes indexed Job.

    ``SLURM_ARRAY_TASK_ID`` is taken relative to ``SLURM_ARRAY_TASK_MIN`` (``--array=1-4`` is tasks 0..3) and
    the count from ``SLURM_ARRAY_TASK_COUNT``; a Kubernetes indexed Job sets only ``JOB_COMPLETION_INDEX``, so
    the count must then come from ``--num-tasks`` (the Job's ``completions``).
    """
    env = os.environ if environ is None else environ
    index, count = task_index, num_tasks
    if index is None and "SLURM_ARRAY_TASK_ID" in env:
        index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        count = count if count is not None else int(env["SLURM_ARRAY_TASK_COUNT"])
    elif index is None and "JOB_COMPLETION_INDEX" in env:
        index = int(env["JOB_COMPLETION_INDEX"])
        if count is None:
            raise ValueError(
                "JOB_COMPLETION_INDEX is set (Kubernetes indexed Job) but the task count is not: "
                "pass --num-tasks equal to the Job's completions"
            )
    index = 0 if index is None else index
    count = 1 if count is None else count
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"task index {index} is outside 0..{count - 1} (num tasks {count})")
    return index, count


# -- sample encoding -----------------------------------------------------------------------------------


def _shape_ok(shape: tuple[int, ...], spec: tuple[int | None, ...] | None) -> bool:
    return spec is None or (len(shape) == len(spec) and all(s is None or s == d for s, d in zip(spec, shape)))


def encode_sample(sample: dict[str, Any], modalities: dict[str, ModalitySpec], where: str) -> dict[str, bytes]:
    """Validate one sample against the split's modalities and encode every value to its tar member bytes.

    Raises ``ValueError`` naming ``where`` (the raw file) for a missing or extra modality, a wrong dtype or
    shape, or spatial shapes that disagree between the image-like modalities.
    """
    if set(sample) != set(modalities):
        missing, extra = sorted(set(modalities) - set(sample)), sorted(set(sample) - set(modalities))
        raise ValueError(f"{where}: sample modalities disagree with the split's (missing {missing}, extra {extra})")
    encoded: dict[str, bytes] = {}
    spatial: dict[str, tuple[int, int]] = {}
    for name, value in sample.items():
        spec = modalities[name]
        if isinstance(value, np.ndarray):
            if str(value.dtype) != spec.dtype or not _shape_ok(value.shape, spec.shape):
                raise ValueError(
                    f"{where}: {name} is {value.dtype} {tuple(value.shape)}, expected {spec.dtype} {spec.shape}"
                )
            if spec.kind in ("image", "depth", "label"):
                spatial[name] = tuple(value.shape[:2])
            if name.endswith(".png"):
                encoded[name] = encode_png(value)
            elif name.endswith(".npy"):
                buf = io.BytesIO()
                np.save(buf, value, allow_pickle=False)
                encoded[name] = buf.getvalue()
            else:
                raise ValueError(f"{where}: {name}: arrays are stored only as .png or .npy")
        elif isinstance(value, str):
            encoded[name] = value.encode("utf-8")
        elif isinstance(value, dict):
            encoded[name] = json.dumps(value, sort_keys=True).encode("utf-8")
        elif isinstance(value, bytes):
            encoded[name] = value
        else:
            raise ValueError(f"{where}: {name}: cannot store a {type(value).__name__}")
    if len(set(spatial.values())) > 1:
        shapes = ", ".join(f"{k} {v}" for k, v in sorted(spatial.items()))
        raise ValueError(f"{where}: image shapes disagree between modalities: {shapes}")
    return encoded


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o444, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what passes through to ``target``."""

    def __init__(self, target: io.BufferedWriter) -> None:
        self.target, self.sha, self.size = target, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, b: Any) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.target.write(b)


class StagedShard:
    """A shard being written by :func:`staged_shard`: ``add(key, members)`` appends one sample's members (sorted
    by name); after the block, ``keys`` lists the samples written and ``sha256`` / ``size`` describe the tar."""

    def __init__(self, url: str, tar: tarfile.TarFile) -> None:
        self.url, self.tar, self.keys = url, tar, []
        self.sha256, self.size = "", 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for name in sorted(members):
            _add_member(self.tar, f"{key}.{name}", members[name])
        self.keys.append(key)


@contextlib.contextmanager
def staged_shard(out: str, name: str) -> Iterator[StagedShard]:
    """Write shard ``<out>/<name>`` through a staging file (hashed as it is written), then publish it atomically —
    and check an S3 upload against the hash; a shard with no sample is not published; on any error the staging
    file is removed and nothing appears at the target. Shared by ``jobs.shard`` and ``jobs.predict``."""
    url = storage.join(out, name)
    fd, staging = tempfile.mkstemp(dir=storage.staging_dir(out), prefix=".tmp-", suffix="-" + name)
    try:
        with os.fdopen(fd, "wb") as raw:
            hasher = _HashingWriter(raw)
            with tarfile.open(fileobj=hasher, mode="w", format=tarfile.PAX_FORMAT) as tar:
                shard = StagedShard(url, tar)
                yield shard
        shard.sha256, shard.size = hasher.sha.hexdigest(), hasher.size
        if shard.keys:
            storage.publish_file(staging, url)
            if storage.is_s3(url) and storage.sha256_and_size(url) != (shard.sha256, shard.size):
                raise OSError(f"{url}: uploaded shard does not match its sha256 {shard.sha256} (size {shard.size})")
        else:
            os.unlink(staging)
    except BaseException:
        if os.path.exists(staging):
            os.unlink(staging)
        raise


# -- one shard -----------------------------------------------------------------------------------------


def _fingerprint(job: ShardJob, plan: ShardPlan) -> str:
    return hashlib.sha256(json.dumps([job.config_digest, job.split, job.skip_bad, plan.keys]).encode()).hexdigest()


def _reusable_receipt(job: ShardJob, plan: ShardPlan) -> dict[str, Any] | None:
    """The previous run's receipt if it matches this shard's plan and the stored bytes still match it."""
    receipt_url = storage.join(job.out, plan.name + RECEIPT_SUFFIX)
    try:
        receipt = json.loads(storage.read_bytes(receipt_url))
    except (FileNotFoundError, ValueError):
        return None
    if receipt.get("fingerprint") != _fingerprint(job, plan):
        return None
    if receipt["samples"] == 0:
        return receipt
    try:
        sha, size = storage.sha256_and_size(storage.join(job.out, plan.name))
    except FileNotFoundError:
        return None
    return receipt if (sha, size) == (receipt["sha256"], receipt["size"]) else None


def write_shard(
    source: Source, job: ShardJob, plan: ShardPlan, modalities: dict[str, ModalitySpec], on_sample: Any = None
) -> dict[str, Any]:
    """Write (or reuse) one shard; return its receipt ``{name, samples, sha256, size, skipped, ...}``."""
    receipt = _reusable_receipt(job, plan)
    if receipt is not None:
        if on_sample is not None:
            on_sample(len(plan.keys))
        return {**receipt, "reused": True}
    skipped: list[dict[str, str]] = []
    with staged_shard(job.out, plan.name) as shard:
        for key in plan.keys:
            where = source.where(job.split, key)
            try:
                members = encode_sample(source.load(job.split, key), modalities, where)
            except (ValueError, OSError) as exc:
                if not job.skip_bad:
                    raise
                log.warning("skipping sample %s: %s", key, exc)
                skipped.append({"key": key, "error": str(exc)})
            else:
                shard.add(key, members)
            if on_sample is not None:
                on_sample(1)
    written, sha, size = shard.keys, shard.sha256, shard.size
    receipt = {
        "name": plan.name,
        "samples": len(written),
        "sha256": sha if written else "",
        "size": size if written else 0,
        "first_key": plan.keys[0],
        "last_key": plan.keys[-1],
        "skipped": skipped,
        "fingerprint": _fingerprint(job, plan),
    }
    storage.write_bytes_atomic(
        storage.join(job.out, plan.name + RECEIPT_SUFFIX), json.dumps(receipt, sort_keys=True).encode()
    )
    return {**receipt, "reused": False}


# -- worker pool ---------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _pool_init(job: ShardJob, counter: Any) -> None:
    # Runs in each spawned worker: the source (h5py handles, pybullet clients) and any s3fs instance are
    # created here, never inherited.
    source = open_source(job.source, job.src, **job.options)
    _WORKER.update(job=job, source=source, counter=counter)


def _count(n: int) -> None:
    with _WORKER["counter"].get_lock():
        _WORKER["counter"].value += n


def _pool_write(plan: ShardPlan, modalities: dict[str, ModalitySpec]) -> dict[str, Any]:
    return write_shard(_WORKER["source"], _WORKER["job"], plan, modalities, on_sample=_count)


def _run_plans(
    source: Source,
    job: ShardJob,
    plans: list[ShardPlan],
    modalities: dict[str, ModalitySpec],
    workers: int,
    progress: bool,
) -> list[dict[str, Any]]:
    total = sum(len(p.keys) for p in plans)
    bar = tqdm(
        total=total,
        unit="sample",
        desc=f"{job.source}/{job.split}",
        disable=not progress,
        dynamic_ncols=True,
        smoothing=0.1,
    )
    try:
        if workers <= 1 or len(plans) <= 1:
            return [write_shard(source, job, p, modalities, on_sample=bar.update) for p in plans]
        # spawn, not fork: the parent may hold h5py handles, a pybullet client or s3fs threads.
        ctx = mp.get_context("spawn")
        counter = ctx.Value("q", 0)
        with ctx.Pool(min(workers, len(plans)), initializer=_pool_init, initargs=(job, counter)) as pool:
            pending = [pool.apply_async(_pool_write, (p, modalities)) for p in plans]
            while not all(r.ready() for r in pending):
                for r in pending:
                    if r.ready() and not r.successful():
                        r.get()  # fail fast with the worker's error; leaving the with-block stops the rest
                if counter.value > bar.n:
                    bar.update(counter.value - bar.n)
                time.sleep(0.2)
            results = [r.get() for r in pending]  # re-raises a worker's error with its message
            bar.update(counter.value - bar.n)
            return results
    finally:
        bar.close()


# -- a split -------------------------------------------------------------------------------------------


def _manifest_from_receipts(
    source: Source,
    split: str,
    modalities: dict[str, ModalitySpec],
    samples_per_shard: int,
    receipts: list[dict[str, Any]],
    args: dict[str, Any],
) -> ShardManifest:
    receipts = sorted(receipts, key=lambda r: r["name"])
    shards = [
        ShardInfo(r["name"], r["samples"], r["sha256"], r["size"], r["first_key"], r["last_key"], len(r["skipped"]))
        for r in receipts
        if r["samples"] > 0
    ]
    skipped = [s for r in receipts for s in r["skipped"]]
    if not shards:
        raise ValueError(f"{source.name}/{split}: every sample was skipped as bad ({len(skipped)}); nothing to publish")
    return ShardManifest(
        dataset=source.name,
        split=split,
        modalities=modalities,
        samples_per_shard=samples_per_shard,
        shards=shards,
        total_samples=sum(s.samples for s in shards),
        skipped_samples=len(skipped),
        skipped=skipped,
        source_config=source.config(),
        args=args,
    )


def write_split(
    source_name: str,
    src: str | None,
    out: str,
    split: str,
    *,
    options: dict[str, Any] | None = None,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    workers: int = 1,
    task_index: int = 0,
    num_tasks: int = 1,
    skip_bad: bool = False,
    args: dict[str, Any] | None = None,
    progress: bool = True,
) -> ShardManifest:
    """Shard one split of a source into ``out``; return the manifest it committed.

    With ``num_tasks == 1`` the result is published as ``manifest-<split>.json``; otherwise as this task's
    partial manifest, which :func:`merge_split` combines once every task has finished.
    """
    options = dict(options or {})
    source = open_source(source_name, src, **options)
    source.check_split(split)
    keys = source.keys(split)
    if not keys:
        raise ValueError(f"{source_name}: split {split!r} has no samples under {src}")
    modalities = source.modalities(split)
    storage.makedirs(out)
    digest = hashlib.sha256(
        json.dumps([source.config(), {k: v.to_dict() for k, v in modalities.items()}], sort_keys=True).encode()
    ).hexdigest()
    job = ShardJob(source_name, src, options, split, out, skip_bad, digest)
    plans = plan_shards(keys, split, samples_per_shard, task_index, num_tasks)
    receipts = _run_plans(source, job, plans, modalities, workers, progress)
    reused = sum(r["reused"] for r in receipts)
    if reused:
        log.info("%s/%s: reused %d of %d shards whose checksum already matched", source_name, split, reused, len(plans))
    args = dict(args or {}, task_index=task_index, num_tasks=num_tasks)
    manifest = _manifest_from_receipts(source, split, modalities, samples_per_shard, receipts, args)
    name = manifest_name(split) if num_tasks == 1 else part_manifest_name(split, task_index, num_tasks)
    manifest.location = storage.join(out, name)
    storage.write_bytes_atomic(manifest.location, manifest.to_json().encode())
    return manifest


_PART = re.compile(r"^manifest-(?P<split>.+)\.part-(?P<task>\d{4})-of-(?P<count>\d{4})\.json$")


def merge_split(out: str, split: str, *, verify: bool = True) -> ShardManifest:
    """Combine the partial manifests of an array job into ``manifest-<split>.json``.

    Checks that every task 0..T-1 wrote its part, that the parts agree (dataset, modalities, source config,
    samples per shard) and, with ``verify``, that every listed shard's bytes still hash to its sha256. Raises
    ``ValueError``/``FileNotFoundError`` naming the offending part or shard; publishes nothing then.
    """
    parts: dict[int, dict[int, str]] = {}
    for name in storage.listdir(out):
        m = _PART.match(name)
        if m and m["split"] == split:
            parts.setdefault(int(m["count"]), {})[int(m["task"])] = name
    if not parts:
        raise FileNotFoundError(f"{out}: no partial manifests manifest-{split}.part-*.json to merge")
    if len(parts) > 1:
        raise ValueError(
            f"{out}: partial manifests from array jobs of different sizes {sorted(parts)}; remove the stale ones"
        )
    ((count, found),) = parts.items()
    missing = sorted(set(range(count)) - set(found))
    if missing:
        raise FileNotFoundError(
            f"{out}: missing partial manifests for tasks {missing} of {count} "
            f"(e.g. {part_manifest_name(split, missing[0], count)})"
        )
    manifests = [
        ShardManifest.from_json(storage.read_bytes(storage.join(out, found[t])), storage.join(out, found[t]))
        for t in range(count)
    ]
    first = manifests[0]
    for m in manifests[1:]:
        for attr in ("dataset", "split", "modalities", "source_config", "samples_per_shard"):
            if getattr(m, attr) != getattr(first, attr):
                raise ValueError(f"{m.location}: {attr} disagrees with {first.location}")
    shards = [s for m in manifests for s in m.shards]
    if verify:
        for s in shards:
            url = storage.join(out, s.name)
            if storage.sha256_and_size(url) != (s.sha256, s.size):
                raise ValueError(f"{url}: bytes do not match the sha256 recorded in its partial manifest")
    args = {k: v for k, v in first.args.items() if k != "task_index"}
    merged = ShardManifest(
        dataset=first.dataset,
        split=split,
        modalities=first.modalities,
        samples_per_shard=first.samples_per_shard,
        shards=shards,
        total_samples=sum(m.total_samples for m in manifests),
        skipped_samples=sum(m.skipped_samples for m in manifests),
        skipped=[s for m in manifests for s in m.skipped],
        source_config=first.source_config,
        args=args,
        location=storage.join(out, manifest_name(split)),
    )
    merged.validate()
    storage.write_bytes_atomic(merged.location, merged.to_json().encode())
    return merged
