"""Helpers shared by the data tests: shard a source in-process and read every sample back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.data import ShardManifest, build_eval_loader, write_split

REPO = Path(__file__).resolve().parents[2]


def shard(source: str, src: str | Path | None, out: str | Path, split: str, **kwargs: Any) -> ShardManifest:
    return write_split(source, None if src is None else str(src), str(out), split, progress=False, **kwargs)


def read_all(manifest: ShardManifest | str, num_workers: int = 0) -> list[dict[str, Any]]:
    """Every sample of an exact pass, unbatched (batch size 1; values keep their batch dimension of 1)."""
    loader = build_eval_loader(manifest, 1, rank=0, world_size=1, num_workers=num_workers)
    return [b for b in loader]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m jobs.shard ARGS`` from the repository root (the way users run it)."""
    return subprocess.run(
        [sys.executable, "-m", "jobs.shard", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
