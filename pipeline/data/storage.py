"""Local-directory and ``s3://`` storage behind one small set of functions.

URLs are either local paths or ``s3://bucket/prefix/...``. S3 goes through s3fs; credentials *and* the
endpoint come from botocore's standard chain (``AWS_*`` environment variables such as
``AWS_ENDPOINT_URL_S3``, a profile, an instance role), never from flags or config files.

Why the S3 filesystem is created lazily and per process: s3fs runs an asyncio loop on a helper thread and
pools aiohttp connections; an instance created before a DataLoader (or multiprocessing) worker forks is
unusable in the child (the loop thread does not survive ``fork``). ``s3_filesystem()`` therefore builds one
instance per process id on first use, inside whichever process needs it, and nothing here creates one at
import time.

Atomicity: ``write_bytes_atomic`` is temp + ``os.replace`` locally and a single PUT on S3 (an object is
invisible until its PUT completes; S3 has no rename), which is what makes the manifest a commit point.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile
from typing import IO, Any

_S3_BY_PID: dict[int, Any] = {}
_CHUNK = 8 << 20


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def join(base: str, name: str) -> str:
    return posixpath.join(base, name) if is_s3(base) else os.path.join(base, name)


def parent(url: str) -> str:
    return posixpath.dirname(url.rstrip("/")) if is_s3(url) else os.path.dirname(os.path.abspath(url))


def s3_filesystem() -> Any:
    """This process's s3fs filesystem (created on first call; see the module docstring for why)."""
    fs = _S3_BY_PID.get(os.getpid())
    if fs is None:
        import s3fs  # imported here so local-only use never needs botocore

        # Listing caches would hide objects written by other processes (workers, array tasks).
        fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
        _S3_BY_PID.clear()  # instances inherited through fork are unusable here
        _S3_BY_PID[os.getpid()] = fs
    return fs


def _s3_path(url: str) -> str:
    return url[len("s3://") :]


def makedirs(url: str) -> None:
    """Create a local directory (S3 has no directories; a bucket must already exist)."""
    if not is_s3(url):
        os.makedirs(url, exist_ok=True)


def exists(url: str) -> bool:
    return s3_filesystem().exists(_s3_path(url)) if is_s3(url) else os.path.exists(url)


def open_read(url: str) -> IO[bytes]:
    """A binary read stream; ``FileNotFoundError`` naming the URL when it does not exist."""
    if is_s3(url):
        try:
            return s3_filesystem().open(_s3_path(url), "rb", block_size=_CHUNK)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{url}: no such object") from exc
    try:
        return open(url, "rb")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{url}: no such file") from exc


def read_bytes(url: str) -> bytes:
    with open_read(url) as f:
        return f.read()


def sha256_and_size(url: str) -> tuple[str, int]:
    """Stream the object once; return its sha256 (hex) and size in bytes."""
    h, n = hashlib.sha256(), 0
    with open_read(url) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Publish ``data`` at ``url`` all at once: readers see the old object/none, or all of the new one."""
    if is_s3(url):
        s3_filesystem().pipe_file(_s3_path(url), data)  # one PUT
        return
    folder = os.path.dirname(os.path.abspath(url))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(url))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, url)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def publish_file(local_path: str, url: str) -> None:
    """Move a finished local file to ``url`` (rename locally; upload, then delete the local copy, on S3)."""
    if is_s3(url):
        s3_filesystem().put_file(local_path, _s3_path(url))
        os.unlink(local_path)
    else:
        os.replace(local_path, url)


def staging_dir(out: str) -> str:
    """Where a shard is assembled before ``publish_file``: the output folder itself when local (so the
    final rename is atomic and never crosses file systems), the system temp dir for S3."""
    return tempfile.gettempdir() if is_s3(out) else out


def listdir(url: str) -> list[str]:
    """Names (not paths) of the objects directly under ``url``; empty when it does not exist."""
    if is_s3(url):
        fs = s3_filesystem()
        path = _s3_path(url).rstrip("/")
        try:
            return sorted(posixpath.basename(p) for p in fs.ls(path, detail=False))
        except FileNotFoundError:
            return []
    return sorted(os.listdir(url)) if os.path.isdir(url) else []


def remove(url: str) -> None:
    if is_s3(url):
        s3_filesystem().rm_file(_s3_path(url))
    elif os.path.exists(url):
        os.unlink(url)


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> IO[bytes]:
    """webdataset ``gopen`` handler for ``s3://`` (webdataset 1.0.2 has none built in)."""
    if mode != "rb":
        raise ValueError(f"{url}: the s3:// opener is read-only (shards are written by jobs.shard)")
    return open_read(url)


def register_webdataset_s3() -> None:
    """Install the ``s3://`` handler in webdataset's ``gopen`` table (idempotent; creates no filesystem)."""
    from webdataset.gopen import gopen_schemes  # the dict webdataset's gopen() dispatches on

    gopen_schemes["s3"] = _gopen_s3
