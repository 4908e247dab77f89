"""The fault suite (``pytest -m faults``): every guarantee of docs/operations.md against a real fault.

Budget: 5 minutes (20 tests took 278 s with ``pytest -m faults`` on one core shared with other work); the
slowest are DeepSpeed's comm-op rebuild in a copied extension cache (~50 s) and the ZeRO-2/3 resizes. Every
subprocess has a short timeout, so a regression to a hang fails instead of stalling CI. Single-rank cases
run ``jobs.train.main`` in-process (they fail before any process group); multi-rank cases use real torchrun
/ per-rank ``env://`` processes with gloo, batched into few launches.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.train.conftest import TINY_TRAIN, tiny_shards  # noqa: F401  (fixture re-exported)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.faults)


@pytest.fixture
def shards(tiny_shards: str, tmp_path: Path) -> Path:  # noqa: F811
    """A private copy of the tiny stereo shards (tests damage it)."""
    out = tmp_path / "shards"
    shutil.copytree(tiny_shards, out)
    return out


def tiny(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY_TRAIN, f"data.shards={shards}", f"run.dir={run_dir}", *extra]
