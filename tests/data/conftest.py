"""Data-test fixtures: the converter fixtures in real formats and embedded stereo shards.

The S3 server fixtures (``s3_server``, ``s3_env``) live in ``tests/conftest.py``: one moto server per session.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from . import make_fixtures


@pytest.fixture(scope="session")
def raw_datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every converter fixture, built once per session by ``make_fixtures.build_all``."""
    return make_fixtures.build_all(tmp_path_factory.mktemp("raw"))


STEREO_TRAIN_OPTIONS = {"patch": 16, "downscale": 4}  # 224 train samples of 16x16


@pytest.fixture(scope="session")
def stereo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Embedded-stereo train split in 14 shards of 16 samples (read-only: copy before corrupting)."""
    from pipeline.data import write_split

    out = tmp_path_factory.mktemp("stereo")
    write_split(
        "embedded", "stereo", str(out), "train", options=STEREO_TRAIN_OPTIONS, samples_per_shard=16, progress=False
    )
    return out
