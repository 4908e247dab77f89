"""Bad data refused up front, and each shard checked against its manifest before its samples are used.

Two layers:

1. :func:`preflight` runs before any process group starts (``train_loop`` calls it first thing, so every
   launcher gets it): the shard store exists and is not empty, both splits' manifests exist and parse, each
   listed shard exists with the manifest's size (``data.verify=size|sha256``; one stat per shard locally,
   one listing on S3), and the usable training samples fill at least one batch per rank. A failure is one
   :class:`DataError` line naming the problem and the fix (``jobs.train`` exits 2). Shards found bad here
   are dropped from the loaders' lists, named in one warning line, and counted (``data_bad_shards``); more
   than ``data.max_bad_fraction`` of a split's samples in bad shards stops the run here.
2. :func:`check_shard` runs in the loader's stream the first time a process opens a shard
   (``data.verify=size``: its size; ``sha256``: its size and checksum, read once per process): a bad shard
   is skipped as a whole — none of its samples is used — logged once per process, and reported to the
   loader (``loader.bad_shards``), which the training loop turns into the metric and the stop rule.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field, replace

from . import storage
from .manifest import ShardManifest, load_manifest, manifest_name

log = logging.getLogger(__name__)

VERIFY_MODES = ("size", "sha256", "off")
_CHECKED: dict[tuple[str, str], str] = {}  # (url, mode) -> "" (good) or the reason; per process


class DataError(ValueError):
    """Bad input data, found before training: one line naming the problem (``jobs.train`` exits 2)."""


@dataclass
class CheckedSplit:
    """A split as loaded (``manifest``: the committed one, its checksum is the data's identity) and as
    usable (``usable``: bad shards removed); ``bad``: shard name → reason."""

    manifest: ShardManifest
    usable: ShardManifest
    bad: dict[str, str] = field(default_factory=dict)

    @property
    def bad_samples(self) -> int:
        return self.manifest.total_samples - self.usable.total_samples

    @property
    def bad_fraction(self) -> float:
        return self.bad_samples / max(1, self.manifest.total_samples)


def _size(url: str) -> int | None:
    try:
        if storage.is_s3(url):
            return int(storage.s3_filesystem().info(url[len("s3://") :])["size"])
        return os.path.getsize(url)
    except (FileNotFoundError, OSError):
        return None


def check_shard(url: str, size: int, sha256: str, mode: str) -> str:
    """ "" when the shard at ``url`` matches its manifest entry under ``mode``, else the reason (cached)."""
    if mode == "off":
        return ""
    key = (url, mode)
    if key in _CHECKED:
        return _CHECKED[key]
    actual = _size(url)
    if actual is None:
        reason = "missing"
    elif actual != size:
        reason = f"size {actual} bytes, manifest says {size}"
    else:
        reason = ""
        if mode == "sha256":
            h = hashlib.sha256()
            try:
                with storage.open_read(url) as f:
                    while chunk := f.read(8 << 20):
                        h.update(chunk)
                if h.hexdigest() != sha256:
                    reason = f"sha256 {h.hexdigest()[:12]}…, manifest says {sha256[:12]}…"
            except OSError as e:
                reason = f"unreadable ({e})"
    _CHECKED[key] = reason
    return reason


def _listing_sizes(base: str) -> dict[str, int] | None:
    """{name: size} of the objects in an S3 folder (one listing); None locally (stat per shard instead)."""
    if not storage.is_s3(base):
        return None
    fs = storage.s3_filesystem()
    try:
        found = fs.find(base[len("s3://") :].rstrip("/"), maxdepth=1, detail=True)
    except FileNotFoundError:
        return {}
    return {k.rsplit("/", 1)[-1]: int(v["size"]) for k, v in found.items()}


def check_split(
    shards: str, split: str, *, verify: str = "size", max_bad_fraction: float = 0.0, key: str = "data.shards"
) -> CheckedSplit:
    """Load ``split``'s manifest from ``shards`` and check every listed shard's presence and size."""
    if verify not in VERIFY_MODES:
        raise DataError(f"data.verify must be one of {list(VERIFY_MODES)}; got {verify!r}")
    url = storage.join(shards, manifest_name(split))
    if not storage.is_s3(shards):
        if not os.path.isdir(shards):
            raise DataError(
                f"{key}={shards!r}: no such directory (write shards with python -m jobs.shard ... "
                f"--out {shards}, or point {key} at an existing shard store)"
            )
        if not os.listdir(shards):
            raise DataError(
                f"{key}={shards!r}: the directory is empty (no shards, no manifest); run "
                f"python -m jobs.shard ... --out {shards} first"
            )
    try:
        manifest = load_manifest(url)
    except FileNotFoundError:
        raise DataError(
            f"{key}={shards!r}: no {manifest_name(split)} (split {split!r} was never committed: "
            f"its shard job did not finish, or the split name is wrong)"
        ) from None
    except ValueError as e:
        raise DataError(f"{key}={shards!r}: {manifest_name(split)} is unusable: {e}") from None
    if not manifest.shards:
        raise DataError(
            f"{key}={shards!r}: {manifest_name(split)} lists no shards (every sample was skipped when sharding?)"
        )
    bad: dict[str, str] = {}
    if verify != "off":
        listing = _listing_sizes(storage.parent(url))
        for info, shard_url in zip(manifest.shards, manifest.shard_urls()):
            actual = listing.get(info.name) if listing is not None else _size(shard_url)
            if actual is None:
                bad[info.name] = "missing"
            elif actual != info.size:
                bad[info.name] = f"size {actual} bytes, manifest says {info.size}"
    usable = manifest
    if bad:
        kept = [s for s in manifest.shards if s.name not in bad]
        usable = replace(manifest, shards=kept, total_samples=sum(s.samples for s in kept))
    checked = CheckedSplit(manifest, usable, bad)
    if bad:
        first = next(iter(bad))
        what = (
            f"{len(bad)} of {len(manifest.shards)} {split} shards in {shards} do not match the manifest "
            f"({first}: {bad[first]}{', …' if len(bad) > 1 else ''}); {checked.bad_samples} of "
            f"{manifest.total_samples} samples ({checked.bad_fraction:.1%})"
        )
        if checked.bad_fraction > max_bad_fraction or not kept:
            raise DataError(
                f"{what} are gone, more than data.max_bad_fraction={max_bad_fraction:g}: re-copy or "
                "re-shard the data (or raise data.max_bad_fraction)"
            )
        log.warning("%s skipped: those shards are not read (data.max_bad_fraction=%g)", what, max_bad_fraction)
    return checked


def preflight(
    shards: str,
    train_split: str,
    val_split: str,
    *,
    batch_size: int,
    world_size: int,
    verify: str = "size",
    max_bad_fraction: float = 0.0,
) -> tuple[CheckedSplit, CheckedSplit]:
    """Both splits checked (see the module docstring); raises :class:`DataError` with one line."""
    train = check_split(shards, train_split, verify=verify, max_bad_fraction=max_bad_fraction)
    val = check_split(shards, val_split, verify=verify, max_bad_fraction=max_bad_fraction)
    need = batch_size * world_size
    if train.usable.total_samples < need:
        raise DataError(
            f"data.shards={shards!r}: split {train_split!r} has {train.usable.total_samples} usable "
            f"samples, fewer than one batch of data.batch_size={batch_size} on each of {world_size} "
            f"rank(s) ({need}); lower data.batch_size, run fewer ranks, or shard more data"
        )
    return train, val
