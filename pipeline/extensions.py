"""torch's JIT extension builds (DeepSpeed's CPU comm op, the flow's C++ nodes): never a silent hang on a lock.

A build killed half-way leaves ``<cache>/<py>/<op>/lock`` behind, and every later build waits on it forever.
:func:`clear_stale_build_locks` reports and removes a lock no live process on this host holds (and reports, and
leaves, one a live build holds); :func:`prebuild_deepspeed_ops` builds DeepSpeed's CPU comm op at set-up with a
progress line (``make`` calls it), so the first training run does not spend minutes silent in it.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import time

log = logging.getLogger("pipeline.dist")


def extension_build_root() -> str:
    """torch's JIT extension cache (``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``)."""
    from torch.utils.cpp_extension import get_default_build_root  # heavy: pulls in setuptools (~0.15 s)

    return os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


def _lock_holders(path: str) -> list[int] | None:
    """PIDs of local processes with ``path`` open (torch's build lock keeps its fd open while building);
    None where /proc cannot tell."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    real, holders = os.path.realpath(path), []
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        try:
            for fd in os.listdir(fd_dir):
                if os.readlink(os.path.join(fd_dir, fd)) == real:
                    holders.append(int(fd_dir.split("/")[2]))
                    break
        except OSError:  # gone, or not ours to look at
            continue
    return holders


def clear_stale_build_locks(root: str | None = None) -> list[str]:
    """Report and remove torch extension-build locks (``<root>/*/<op>/lock``) that no live process holds
    (a build killed half-way leaves one, and every later build waits on it forever); report, and leave, a
    lock a live build holds. Only processes on this host are seen: a shared cache directory built from
    several hosts at once is not supported. Returns the removed paths."""
    root = root or extension_build_root()
    removed = []
    for lock in sorted(glob.glob(os.path.join(root, "*", "*", "lock")) + glob.glob(os.path.join(root, "*", "lock"))):
        try:
            before = os.stat(lock)
        except OSError:
            continue
        holders = _lock_holders(lock)
        if holders is None:
            continue
        if holders:
            _say(f"extension build lock {lock} is held by pid {holders[0]} (a build in progress); waiting for it")
            continue
        try:
            after = os.stat(lock)
            if (after.st_ino, after.st_mtime_ns) != (before.st_ino, before.st_mtime_ns):
                continue  # replaced meanwhile by a live build
            os.unlink(lock)
        except OSError:
            continue
        removed.append(lock)
        age = time.time() - before.st_mtime
        _say(
            f"removed a stale extension build lock {lock} ({age:.0f}s old, no live process holds it: a build "
            "was killed half-way); the op is rebuilt"
        )
    return removed


def _say(msg: str) -> None:
    """One warning line: through logging when it is configured, else straight to stderr."""
    if logging.getLogger().handlers:
        log.warning(msg)
    else:
        print(msg, file=sys.stderr, flush=True)


def deepspeed_ops_built(root: str | None = None) -> bool:
    """Whether DeepSpeed's CPU comm op (JIT-built by ``deepspeed.init_distributed``) is in the extension cache."""
    root = root or extension_build_root()
    return bool(glob.glob(os.path.join(root, "*", "deepspeed_shm_comm*", "*.so")))


def prebuild_deepspeed_ops() -> None:
    """Build DeepSpeed's CPU comm op now, with a progress line (``make`` calls this once at set-up)."""
    clear_stale_build_locks()
    if deepspeed_ops_built():
        print("DeepSpeed's CPU comm op: already built", flush=True)
        return
    from deepspeed.accelerator import get_accelerator  # heavy: optional DeepSpeed dependency

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        print("DeepSpeed's CPU comm op: not used on this accelerator", flush=True)
        return
    print("building DeepSpeed's CPU comm op (once, about 1-2 minutes) ...", flush=True)
    start = time.monotonic()
    builder.load()
    print(f"built DeepSpeed's CPU comm op in {time.monotonic() - start:.0f}s", flush=True)
