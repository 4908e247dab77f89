"""Mirror complete checkpoints to ``checkpoint.remote=s3://bucket/prefix``, and find / fetch them on a new node.

Remote layout (the local tag directories, mirrored)::

    <remote>/<tag>/<every file of the local tag directory>   uploaded first, sizes verified
    <remote>/<tag>/COMPLETE                                  PUT last: the commit point
    <remote>/latest                                          the newest committed tag name

S3 has no rename, so the commit is a marker object: a single PUT is all-or-nothing, and it happens only after
every other object of the tag is uploaded and its size checked. A killed upload leaves a tag without
``COMPLETE``, which no reader here trusts (``latest_remote`` skips it, ``download`` refuses it) and the next
prune deletes. Re-uploading a committed tag first deletes its ``COMPLETE``, so a tag is never marked complete
while it mixes old and new objects; deletion (pruning) also removes ``COMPLETE`` before anything else.

Who does what:

- Upload: rank 0 only (the caller decides), after ``checkpoint.save`` returns. A tag is committed only when it
  holds ``trainer-rank<r>.pt`` for every rank of ``state.json``'s ``world_size``: with ``run.dir`` on
  node-local disks rank 0 sees only its own node's files, and such a tag would resume on no other world, so
  it is refused (a counted failure) rather than committed. Multi-node runs need ``run.dir`` on a shared file
  system for ``checkpoint.remote``.
- Download: rank 0 picks the tag (``latest_remote``) and broadcasts it, so every node fetches the *same* tag
  even if ``latest`` moves meanwhile; then each node's local rank 0 calls ``download`` (every node needs the
  files of its own ranks; downloading the whole tag is the simple superset), then a barrier, then
  ``checkpoint.resolve_resume``. ``download`` is idempotent and safe to call once per node, also when nodes
  share a file system (see its docstring).

Credentials and endpoint come only from botocore's standard chain, via ``storage.s3_filesystem()``; nothing
here creates an S3 client at import time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

from pipeline.data.storage import is_s3, s3_filesystem
from pipeline.train.checkpoint import COMPLETE, LATEST, STATE, checkpoint_root

log = logging.getLogger(__name__)

_TAG_PREFIX = "step"  # checkpoint.step_tag: step%08d, so lexical order is step order


def _bucket_path(remote_url: str) -> str:
    if not is_s3(remote_url):
        raise ValueError(f"checkpoint.remote={remote_url!r}: only s3://bucket/prefix is supported")
    path = remote_url[len("s3://") :].strip("/")
    if not path:
        raise ValueError(f"checkpoint.remote={remote_url!r}: no bucket")
    return path


def _listing(fs: Any, prefix: str) -> dict[str, int]:
    """``{key relative to prefix: size}`` for every object below ``prefix/`` (one recursive listing)."""
    try:
        found = fs.find(prefix, detail=True)
    except FileNotFoundError:
        return {}
    # The "/" matters: a listing of .../step00000001 must not take in .../step000000010.
    return {k[len(prefix) + 1 :]: int(info["size"]) for k, info in found.items() if k.startswith(prefix + "/")}


def _remote_tags(fs: Any, root: str) -> dict[str, dict[str, int]]:
    """``{tag: {key relative to the tag: size}}`` for every ``step*`` tag under ``root``."""
    tags: dict[str, dict[str, int]] = {}
    for key, size in _listing(fs, root).items():
        tag, _, rel = key.partition("/")
        if tag.startswith(_TAG_PREFIX) and rel:
            tags.setdefault(tag, {})[rel] = size
    return tags


def _read_latest(fs: Any, root: str) -> str:
    try:
        return fs.cat_file(f"{root}/{LATEST}").decode().strip()
    except FileNotFoundError:
        return ""


def latest_remote(remote_url: str) -> str | None:
    """The newest complete remote tag: the one ``latest`` names if it has ``COMPLETE``, else the lexically
    newest tag with ``COMPLETE``, else None (nothing committed yet)."""
    fs, root = s3_filesystem(), _bucket_path(remote_url)
    named = _read_latest(fs, root)
    if named.startswith(_TAG_PREFIX) and "/" not in named and fs.exists(f"{root}/{named}/{COMPLETE}"):
        return named
    complete = sorted(tag for tag, files in _remote_tags(fs, root).items() if COMPLETE in files)
    return complete[-1] if complete else None


def download(remote_url: str, tag: str, run_dir: str | os.PathLike) -> Path:
    """Copy the complete remote tag ``<remote>/<tag>/`` to ``<run_dir>/checkpoints/<tag>/`` and point the local
    ``latest`` at it; returns the local tag directory.

    Atomic and idempotent: files land in a hidden temp directory (``COMPLETE`` last, sizes verified), which is
    renamed into place whole, so a killed download never looks like a checkpoint; a tag already complete
    locally is not fetched again. Concurrent calls for the same tag (nodes sharing a file system) each fetch
    into their own temp directory and the first rename wins; a leftover partial local tag (a killed save) is
    renamed aside before being deleted, so no caller ever deletes files another one just committed.
    """
    if not tag.startswith(_TAG_PREFIX) or "/" in tag:
        raise ValueError(f"download: {tag!r} is not a checkpoint tag (step%08d)")
    root = checkpoint_root(run_dir)
    final = root / tag
    if not (final / COMPLETE).exists():
        _fetch(remote_url, tag, root)
    _write_latest(root, tag)
    return final


def _fetch(remote_url: str, tag: str, root: Path) -> None:
    fs, src = s3_filesystem(), f"{_bucket_path(remote_url)}/{tag}"
    sizes = _listing(fs, src)
    if COMPLETE not in sizes:
        raise FileNotFoundError(
            f"{remote_url.rstrip('/')}/{tag}: not a complete remote checkpoint "
            f"(no {COMPLETE} marker; an upload was interrupted or it was never made)"
        )
    root.mkdir(parents=True, exist_ok=True)
    # Hidden and not "step*": checkpoint.latest_complete and _prune never look at it.
    tmp = root / f".{tag}.download-{uuid.uuid4().hex[:8]}"
    try:
        files = sorted(rel for rel in sizes if rel != COMPLETE)
        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        for rel in files:  # one at a time: fsspec's list form re-sorts the sources, pairing them by position
            fs.get_file(f"{src}/{rel}", str(tmp / rel))
        wrong = [rel for rel in files if (tmp / rel).stat().st_size != sizes[rel]]
        if wrong:
            raise OSError(f"{remote_url}/{tag}: downloaded sizes differ from the listing for {wrong}")
        fs.get_file(f"{src}/{COMPLETE}", str(tmp / COMPLETE))
        final = root / tag
        if final.exists() and not (final / COMPLETE).exists():
            aside = root / f".{tag}.partial-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(final, aside)
            except FileNotFoundError:
                pass  # another caller moved it first
            else:
                shutil.rmtree(aside, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / COMPLETE).exists():  # lost the race to a concurrent download: its copy stands
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_latest(root: Path, tag: str) -> None:
    tmp = root / f".{LATEST}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(tag + "\n")
    os.replace(tmp, root / LATEST)


class RemoteSync:
    """Uploads complete checkpoint tags to ``remote_url`` on one background thread; never blocks training.

    ``submit`` only records the tag (a queue of one): if a newer tag arrives while an older one still waits,
    the older one is skipped (logged, listed in ``skipped``) — only the newest checkpoint matters for resume,
    and a slow link must not build an ever-growing backlog. A tag being uploaded is never interrupted.

    Errors never reach the caller: each failed upload (or prune) logs one warning naming the tag and adds one
    to ``failures``. Keep ``checkpoint.keep >= 2`` locally, so the next save does not prune the tag being
    uploaded (that upload would fail and be counted). After the last save — or a preemption signal — call
    ``wait(timeout_s)`` to drain, then ``close()``.
    """

    def __init__(self, remote_url: str, run_dir: str | os.PathLike, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"RemoteSync: keep={keep} must be >= 1")
        self.remote_url = remote_url.rstrip("/")
        self._root = _bucket_path(remote_url)
        self._local_root = checkpoint_root(run_dir).resolve()
        self.keep = keep
        self.failures = 0
        self.uploaded: list[str] = []  # committed tags, in order
        self.skipped: list[str] = []  # superseded while queued
        self._cond = threading.Condition()
        self._pending: Path | None = None
        self._busy = False
        self._closed = False
        # A daemon: an upload still running at exit dies uncommitted (no COMPLETE), which readers ignore.
        self._thread = threading.Thread(target=self._run, name="checkpoint-remote-sync", daemon=True)
        self._thread.start()

    def submit(self, tag_dir: Path) -> None:
        """Queue the upload of one complete local tag directory and return at once."""
        tag_dir = Path(tag_dir)
        if tag_dir.resolve().parent != self._local_root or not (tag_dir / COMPLETE).exists():
            raise ValueError(f"RemoteSync.submit: {tag_dir} is not a complete checkpoint in {self._local_root}")
        with self._cond:
            if self._closed:
                raise RuntimeError("RemoteSync.submit after close()")
            if self._pending is not None:
                log.info(
                    "checkpoint.remote: %s superseded by %s before its upload began; skipped",
                    self._pending.name,
                    tag_dir.name,
                )
                self.skipped.append(self._pending.name)
            self._pending = tag_dir
            self._cond.notify_all()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until nothing is queued or uploading; False if ``timeout_s`` ran out first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending is None and not self._busy, timeout_s)

    def close(self) -> None:
        """Stop accepting tags and drop a queued one (``wait`` first to drain). Does not wait for an upload
        in flight: it finishes on the daemon thread, or dies uncommitted with the process."""
        with self._cond:
            if self._pending is not None:
                log.warning("checkpoint.remote: closed with %s still queued; not uploaded", self._pending.name)
                self.skipped.append(self._pending.name)
                self._pending = None
            self._closed = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._pending is None:
                    return
                tag_dir, self._pending, self._busy = self._pending, None, True
            try:
                self._step(tag_dir)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _step(self, tag_dir: Path) -> None:
        # Two steps, so a failed prune is reported as such and never hides a committed upload.
        for action, fn in (("upload of", lambda: self._upload(tag_dir)), ("prune after", self._prune)):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 — the training loop must never see a sync error
                with self._cond:
                    self.failures += 1
                log.warning(
                    "checkpoint.remote: %s %s to %s failed (%s: %s)",
                    action,
                    tag_dir.name,
                    self.remote_url,
                    type(exc).__name__,
                    exc,
                )
                return

    def _upload(self, tag_dir: Path) -> None:
        fs, tag = s3_filesystem(), tag_dir.name
        dest = f"{self._root}/{tag}"
        # Read everything local first: a tag pruned locally before its upload fails here, before any PUT.
        marker = (tag_dir / COMPLETE).read_bytes()
        files = sorted(
            p.relative_to(tag_dir).as_posix() for p in tag_dir.rglob("*") if p.is_file() and p != tag_dir / COMPLETE
        )
        sizes = {rel: (tag_dir / rel).stat().st_size for rel in files}
        _check_all_ranks(tag_dir, files)

        _delete_tag(fs, dest, _listing(fs, dest))  # an earlier (maybe committed) upload of this tag
        for rel in files:  # one at a time: fsspec's list form re-sorts the sources, pairing them by position
            fs.put_file(str(tag_dir / rel), f"{dest}/{rel}")
        remote = _listing(fs, dest)
        wrong = {rel: (size, remote.get(rel)) for rel, size in sizes.items() if remote.get(rel) != size}
        if wrong:
            raise OSError(f"size check failed after upload (local, remote): {wrong}")
        fs.pipe_file(f"{dest}/{COMPLETE}", marker)  # the commit point
        fs.pipe_file(f"{self._root}/{LATEST}", (tag + "\n").encode())
        self.uploaded.append(tag)
        log.info(
            "checkpoint.remote: %s committed to %s (%d files, %.1f MB)",
            tag,
            self.remote_url,
            len(files),
            sum(sizes.values()) / 1e6,
        )

    def _prune(self) -> None:
        """Keep the newest ``keep`` complete remote tags (and whatever ``latest`` names); drop partial tags
        older than the newest complete one (killed uploads)."""
        fs = s3_filesystem()
        tags = _remote_tags(fs, self._root)
        complete = sorted(t for t, files in tags.items() if COMPLETE in files)
        if not complete:
            return
        named = _read_latest(fs, self._root)
        doomed = set(complete[: -self.keep]) | {t for t in tags if COMPLETE not in tags[t] and t < complete[-1]}
        for tag in sorted(doomed - {named}):
            _delete_tag(fs, f"{self._root}/{tag}", tags[tag])


def _delete_tag(fs: Any, prefix: str, files: dict[str, int]) -> None:
    """Delete a remote tag's objects, ``COMPLETE`` first: a half-deleted tag is never trusted."""
    if COMPLETE in files:
        fs.rm_file(f"{prefix}/{COMPLETE}")
    rest = [f"{prefix}/{rel}" for rel in files if rel != COMPLETE]
    if rest:
        fs.rm(rest)


def _check_all_ranks(tag_dir: Path, files: list[str]) -> None:
    world = int(json.loads((tag_dir / STATE).read_text())["world_size"])
    missing = [f"trainer-rank{r}.pt" for r in range(world) if f"trainer-rank{r}.pt" not in files]
    if missing:
        raise FileNotFoundError(
            f"{tag_dir} lacks {missing} of its {world} ranks: is run.dir on node-local "
            f"disks? checkpoint.remote needs every rank's files in rank 0's run.dir"
        )
