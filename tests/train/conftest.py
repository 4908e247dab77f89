"""Tiny real shards (the embedded stereo pair, 8×8 patches) and a torchrun helper for training tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data import write_split
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
TINY_TRAIN = [
    "model.image_size=8",
    "model.levels=2",
    "model.blocks_per_level=1",
    "model.dim=16",
    "model.patch_size=2",
    "model.lica_group=0",
    "data.batch_size=4",
    "data.num_workers=0",
    "optim.lr=3e-3",
    "optim.warmup_steps=2",
    "train.log_every=1",
    "train.watchdog_s=300",
    "tracking.enabled=false",
]


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *args,
    ]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore::FutureWarning", **(extra or {})}


def run(cmd: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repo root to completion, capturing its output."""
    return subprocess.run(
        cmd, cwd=REPO, env=_env(kw.pop("env", None)), capture_output=True, text=True, timeout=timeout, **kw
    )


def popen(cmd: list[str]) -> subprocess.Popen:
    """Start ``cmd`` from the repo root (stdout and stderr merged), e.g. to signal it mid-run."""
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("shards") / "stereo8")
    # 224 train / 7 val patches; small val shards so two ranks each own one (an exact pass needs that)
    for split, per_shard in (("train", 24), ("val", 3)):
        write_split(
            "embedded",
            "stereo",
            out,
            split,
            options={"patch": 8, "downscale": 8},
            samples_per_shard=per_shard,
            progress=False,
        )
    return out
