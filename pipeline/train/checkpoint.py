"""Atomic DeepSpeed checkpoints: ``<run.dir>/checkpoints/<tag>/`` plus a ``latest`` pointer.

A save is a DeepSpeed ``save_checkpoint`` on every rank (model, optimizer and scheduler shards, and the
shared client state: step, resolved config, world size) plus one ``trainer-rank<r>.pt`` per rank (that
rank's RNG states and data-loader cursor — per rank, because DeepSpeed writes client state from one rank
only under ZeRO 0–2). Then every rank meets at a barrier, and only after it rank 0 writes ``COMPLETE`` in
the tag directory and atomically replaces ``latest`` (temp file + rename). A ``kill -9`` during a save
therefore leaves ``latest`` naming the previous, complete checkpoint, and a reader never trusts a tag
directory without ``COMPLETE``. Old checkpoints beyond ``checkpoint.keep`` are pruned after the pointer
moves.

History is never lost silently: ``state.json`` records the size and sha256 of every file of the tag
(``files``), verified on resume (:func:`resolve_resume`) and by ``jobs.consolidate``
(:func:`verify_files`); a mismatch or an unreadable file is one :class:`CheckpointError` line naming the file
and the previous complete checkpoint. ``latest`` naming a missing or incomplete tag falls back to the
newest complete one with one warning naming both; ``resume=latest`` in a run directory whose ``latest``
pointer exists (a checkpoint was completed once) but with no complete checkpoint left stops (exit 2) rather
than starting over. Every ``torch.load`` here is ``weights_only=True`` and a file that fails to load is
reported as corrupt by name (never with torch's advice to retry with ``weights_only=False``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import dist
from pipeline.config_rules import ConfigError

log = logging.getLogger(__name__)

LATEST = "latest"
COMPLETE = "COMPLETE"
STATE = "state.json"  # step, resolved config, world size: readable without torch or DeepSpeed


class SaveError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, file size limit): one line naming the tag and the
    checkpoint that stays in charge (``jobs.train`` exits 1; the run resumes from that one)."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used as asked (corrupt file, history without a complete checkpoint):
    one line naming the file or what is missing (``jobs.train`` / ``jobs.consolidate`` exit 2)."""


def file_checksums(tag_dir: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"}}`` of every file of a tag directory except state.json / COMPLETE."""
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(Path(tag_dir).rglob("*")):
        if f.is_file() and f.name not in (STATE, COMPLETE):
            size, sha = file_checksums_one(f)
            out[str(f.relative_to(tag_dir))] = {"size": size, "sha256": sha}
    return out


def verify_files(tag_dir: Path) -> None:
    """Raise :class:`CheckpointError` naming the first file of ``tag_dir`` that is missing or differs from
    the checksums in its ``state.json`` (checkpoints written before checksums were recorded pass)."""
    tag_dir = Path(tag_dir)
    try:
        state = json.loads((tag_dir / STATE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{tag_dir / STATE} is unreadable or corrupt ({type(e).__name__}){_previous(tag_dir)}"
        ) from None
    for rel, want in state.get("files", {}).items():
        f = tag_dir / rel
        if not f.is_file():
            raise CheckpointError(f"{f} is missing from the checkpoint{_previous(tag_dir)}")
        got = file_checksums_one(f)
        if got != (want["size"], want["sha256"]):
            what = "truncated" if got[0] != want["size"] else "corrupt (sha256 differs from state.json)"
            raise CheckpointError(f"{f} is {what}{_previous(tag_dir)}")


def file_checksums_one(f: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return f.stat().st_size, h.hexdigest()


def _previous(tag_dir: Path) -> str:
    """'; the previous complete checkpoint is X: …' for a message about ``tag_dir``."""
    tag_dir = Path(tag_dir)
    root = tag_dir.parent
    older = (
        sorted(p for p in root.glob("step*") if p.name < tag_dir.name and (p / COMPLETE).exists())
        if root.exists()
        else []
    )
    if not older:
        return "; no earlier complete checkpoint is left in " + str(root)
    return (
        f"; the previous complete checkpoint is {older[-1]}: resume from it with "
        f"checkpoint.resume={older[-1]} (or move {tag_dir.name} aside)"
    )


def safe_load(path: Path, **kw: Any) -> Any:
    """``torch.load(weights_only=True)``; a file that does not load is a :class:`CheckpointError` naming it."""
    path = Path(path)
    try:
        return torch.load(path, weights_only=True, **kw)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError (bad zip), EOFError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in first or "Weights only" in first:
            first = "not a valid weights-only checkpoint file"
        raise CheckpointError(
            f"{path} is corrupt or truncated ({type(e).__name__}: {first[:120]})"
            f"{_previous(path.parent) if path.parent.name.startswith('step') else ''}"
        ) from None


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors / plain values (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuples(v: Any) -> Any:
    # random.setstate needs tuples; torch.load returns what was saved, but be strict about nesting.
    return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


def save(
    engine, run_dir: str | os.PathLike, step: int, shared: dict[str, Any], per_rank: dict[str, Any], keep: int
) -> Path:
    """Collective: save on every rank, then mark complete and move ``latest`` on rank 0."""
    root = checkpoint_root(run_dir)
    tag = step_tag(step)
    rank = dist.get_rank()
    if engine.zero_optimization_stage() >= 1:
        # what DeepSpeed's universal-checkpoint converter requires of the client state (elastic resume)
        from deepspeed.checkpoint.constants import (  # heavy: optional DeepSpeed dependency
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        shared = {
            **shared,
            UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
        }
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=shared, save_latest=False)
        torch.save({**per_rank, "rng": rng_state()}, root / tag / f"trainer-rank{rank}.pt")
    except (OSError, RuntimeError) as e:  # ENOSPC, EDQUOT, EFBIG (RLIMIT_FSIZE); torch wraps them in RuntimeError
        first = " ".join(str(e).split())[:200]
        prev = latest_complete(run_dir)
        raise SaveError(
            f"rank {rank}: saving checkpoint {root / tag} failed ({type(e).__name__}: {first}); disk full "
            f"or over quota? {prev if prev else 'no earlier checkpoint'} stays in charge "
            f"(checkpoint.resume=latest continues from it once there is space)"
        ) from None
    dist.barrier()
    if rank == 0:
        for f in (root / tag).iterdir():  # every rank's files reach the disk before the marker says so
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        # one checksum per file, verified on resume and by jobs.consolidate
        _write_durable(
            root / tag / STATE, json.dumps({**shared, "files": file_checksums(root / tag)}, indent=1, default=str)
        )
        _write_durable(root / tag / COMPLETE, f"{step}\n")
        tmp = root / f".{LATEST}.tmp"
        _write_durable(tmp, tag + "\n")
        os.replace(tmp, root / LATEST)
        _fsync_dir(root)
        _prune(root, keep)
    dist.barrier()
    return root / tag


def _write_durable(path: Path, text: str) -> None:
    """Write and fsync: after a power loss a marker or pointer must never name unflushed data."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep: int) -> None:
    tags = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
    complete = [p for p in tags if (p / COMPLETE).exists()]
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    if (root / UNIVERSAL).is_dir():  # a conversion outlives its source tag by nothing
        for conv in (root / UNIVERSAL).iterdir():
            if not (root / conv.name.lstrip(".").split(".")[0]).is_dir():
                shutil.rmtree(conv, ignore_errors=True)
    newest = complete[-1].name if complete else ""
    for partial in tags:  # a partial save newer than the newest complete one is a killed save: drop it
        if not (partial / COMPLETE).exists() and partial.name < newest:
            shutil.rmtree(partial, ignore_errors=True)


def latest_complete(run_dir: str | os.PathLike, warn: bool = False) -> Path | None:
    """The tag directory ``latest`` names, if it is complete; else the newest complete one (with ``warn``:
    one warning naming both); else None."""
    root = checkpoint_root(run_dir)
    pointer = root / LATEST
    named = None
    if pointer.exists():
        named = root / pointer.read_text().strip()
        if (named / COMPLETE).exists():
            return named
    tags = sorted(p for p in root.glob("step*") if (p / COMPLETE).exists()) if root.exists() else []
    found = tags[-1] if tags else None
    if warn and named is not None and found is not None:
        state = "missing" if not named.exists() else f"incomplete (no {COMPLETE})"
        log.warning(
            "checkpoint %s named by %s is %s: falling back to %s, the newest complete checkpoint",
            named,
            pointer,
            state,
            found,
        )
    return found


def resolve_resume(resume: str, run_dir: str | os.PathLike) -> Path | None:
    """``checkpoint.resume`` → a complete tag directory (or None to start fresh). Run on every rank:
    rank 0 resolves and broadcasts, so all ranks load the same checkpoint even if ``latest`` moves."""
    path: Path | None = None
    error = ""
    if dist.get_rank() == 0 and resume:
        if resume == "latest":
            path = latest_complete(run_dir, warn=True)
            pointer = checkpoint_root(run_dir) / LATEST
            if path is None and pointer.exists():
                # a checkpoint was completed here once: starting over would silently drop that history
                error = (
                    f"checkpoint.resume=latest: {pointer} names {pointer.read_text().strip()!r} but no complete "
                    f"checkpoint is left in {pointer.parent} (deleted or never finished copying?); restore it, "
                    "or start over deliberately with checkpoint.resume= and a new run.dir"
                )
        else:
            path = Path(resume)
            if path.is_dir() and (path / LATEST).exists():
                path = latest_complete(path.parent) if path.name == "checkpoints" else path
            if path is None or not (path / COMPLETE).exists():
                error = (
                    f"checkpoint.resume={resume!r}: not a complete checkpoint directory "
                    f"(no {COMPLETE} marker in {path})"
                )
        if path is not None and not error:
            try:
                verify_files(path)
            except CheckpointError as e:
                error = str(e)
    # the verdict travels with the answer: raising on rank 0 alone would leave the others in the broadcast
    found, error = dist.broadcast_object((str(path) if path else "", error), src=0)
    if error:
        raise CheckpointError(error)
    return Path(found) if found else None


UNIVERSAL = "universal"  # <checkpoints>/universal/<tag>: DeepSpeed universal conversions of ZeRO 1–3 tags


def universal_checkpoint(tag_dir: Path) -> Path:
    """The DeepSpeed universal checkpoint of a ZeRO 1–3 tag, converted once (rank 0; the others wait at the
    caller's barrier) with ``python -m deepspeed.checkpoint.ds_to_universal`` into a temporary folder that is
    renamed into place with a ``COMPLETE`` marker (a killed conversion is redone, never half-used), and
    reused by the next resize. Raises :class:`CheckpointError` with the converter's last line on failure."""
    tag_dir = Path(tag_dir)
    out = tag_dir.parent / UNIVERSAL / tag_dir.name
    if (out / COMPLETE).exists():
        return out
    tmp = tag_dir.parent / UNIVERSAL / f".{tag_dir.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(tag_dir),
        "--output_folder",
        str(tmp),
        "--inject_missing_state",
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
    ]
    log.warning("converting %s to a DeepSpeed universal checkpoint in %s (once; reused by later resizes)", tag_dir, out)
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or r.stdout.strip().splitlines() or ["?"])[-1][:200]
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"converting {tag_dir} to a universal checkpoint failed ({last}); resume at the world "
            f"size that wrote it, or consolidate it: python -m jobs.consolidate {tag_dir}"
        )
    _write_durable(tmp / COMPLETE, tag_dir.name + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    _fsync_dir(out.parent)
    return out


def load_universal(engine, tag_dir: Path) -> dict[str, Any]:
    """Load a universal conversion (:func:`universal_checkpoint`) of ``tag_dir`` into ``engine`` at this world
    size: fp32 weights, Adam moments and step per parameter, scheduler; returns the client state."""
    conv = Path(tag_dir).parent / UNIVERSAL / Path(tag_dir).name
    engine._config.load_universal_checkpoint = True  # DeepSpeed's `checkpoint.load_universal`, for this load
    try:
        _, client = engine.load_checkpoint(str(conv.parent), tag=conv.name)
    finally:
        engine._config.load_universal_checkpoint = False  # later saves and loads are ordinary ones
    if client is None:
        raise CheckpointError(f"DeepSpeed could not load the universal checkpoint {conv}")
    # DeepSpeed 0.19.8's ZeRO-3 universal load gives every parameter sub-group the *same* step tensor; Adam
    # increments it in place once per group, so the step (and the bias correction) would advance twice per
    # step with two groups (decay / no decay). Give each group its own copy.
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for st in getattr(base, "state", {}).values():
        if isinstance(st.get("step"), torch.Tensor):
            st["step"] = st["step"].clone()
    return client


def read_rank_state(tag_dir: Path) -> dict[str, Any]:
    """This rank's trainer state (RNG states, loader cursor) of a complete checkpoint."""
    mine = Path(tag_dir) / f"trainer-rank{dist.get_rank()}.pt"
    if not mine.exists():
        raise FileNotFoundError(f"{mine} is missing: the checkpoint was written by fewer ranks than this run has")
    return safe_load(mine)


def load(engine, tag_dir: Path) -> dict[str, Any]:
    """Load model, optimizer and scheduler into ``engine``; returns the shared client state."""
    _, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if client is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {tag_dir}")
    return client


def read_state(tag_dir: Path) -> dict[str, Any]:
    """The shared client state (step, resolved config, world size, modalities) of a complete checkpoint."""
    return json.loads((Path(tag_dir) / STATE).read_text())


def read_ema(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The EMA weights stored with a checkpoint (in rank 0's trainer state)."""
    state = safe_load(Path(tag_dir) / "trainer-rank0.pt")
    if "ema" not in state:
        raise FileNotFoundError(f"{tag_dir} holds no EMA weights (it was trained with optim.ema=0)")
    return state["ema"]
