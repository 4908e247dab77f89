"""On the real stereo pair, the joint MANGO flow beats two single-modality flows of the same size and budget."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_joint_flow_beats_summed_single_modality_flows_on_held_out_patches() -> None:
    r = subprocess.run(
        [sys.executable, "benchmarks/stereo_density.py", "--steps", "100"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout[r.stdout.index("held-out") :])
    joint, summed = map(float, re.search(r"per view-dim: ([\d.]+) vs ([\d.]+)", r.stdout).groups())
    assert joint < summed, (joint, summed)
