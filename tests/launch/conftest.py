"""A fake SLURM on one machine: ``srun`` / ``scontrol`` / ``sbatch`` stand-ins on PATH, and the job environment.

``FakeSlurm.env(job_id, ...)`` is what slurmd gives a batch script: SLURM_JOB_ID/NAME/NODELIST/NUM_NODES,
SLURM_NODEID=0 (the batch shell runs on the first node) and SLURM_RESTART_COUNT. The node list is
``127.0.0.[1-N]``: distinct names that all reach this machine, so the script's master-address discovery
(``scontrol show hostnames`` → first host) is real and yields 127.0.0.1. ``records()`` reads what the
stand-ins logged (srun invocations, requeues, sbatch submissions).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

FAKE = Path(__file__).with_name("fake")


@dataclass
class FakeSlurm:
    root: Path
    bin: Path
    log: Path

    def env(self, job_id: int, nodes: int = 2, restart: int = 0, name: str = "mango-demo") -> dict[str, str]:
        return {
            "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            "FAKE_SLURM_LOG": str(self.log),
            "SLURM_JOB_ID": str(job_id),
            "SLURM_JOB_NAME": name,
            "SLURM_JOB_NODELIST": f"127.0.0.[1-{nodes}]",
            "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_NODEID": "0",
            "SLURM_RESTART_COUNT": str(restart),
            "PYTHONWARNINGS": "ignore",
        }

    def records(self, key: str) -> list:
        if not self.log.exists():
            return []
        return [r[key] for r in map(json.loads, self.log.read_text().splitlines()) if key in r]


def _stand_in(bin_dir: Path, name: str, script: Path) -> None:
    path = bin_dir / name
    path.write_text(f'#!/bin/sh\nexec {sys.executable} {script} "$@"\n')
    path.chmod(0o755)


@pytest.fixture(scope="module")
def fake_slurm(tmp_path_factory: pytest.TempPathFactory) -> FakeSlurm:
    root = tmp_path_factory.mktemp("fake_slurm")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for tool in ("srun", "scontrol", "sbatch", "kubectl"):
        _stand_in(bin_dir, tool, FAKE / f"{tool}.py")
    return FakeSlurm(root, bin_dir, root / "slurm.jsonl")
