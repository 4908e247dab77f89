"""The report scripts that run where this suite cannot (a GPU) still run: each on a tiny CPU configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_report_runs_every_section_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "benchmarks/gpu_flow.py", "--device", "cpu", "--smoke", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {}
    assert max(report["kernel"].values()) < 5e-2  # bf16 kernel vs its fp64 reference
    assert report["roundtrip"]["logdet_dtype"] == "torch.float32"
    assert report["plan"].startswith("plan: bf16 autocast")
    assert 0 < report["flops"]["bf16_share"] <= 1
    for section in ("step", "step_store", "step_invert"):
        assert report[section]["step_ms"] > 0 and report[section]["achieved_tflops"] > 0
    assert report["max_batch"]["largest_batch"] >= 1


def test_the_flop_benchmark_counts_a_bf16_step_mostly_in_bf16() -> None:
    r = subprocess.run([sys.executable, "benchmarks/flops_dtype.py", "--sizes", "32", "--dim", "32", "--baseline"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    line = r.stdout.splitlines()[0]
    share = float(line.split("bf16 share ")[1].split(",")[0])
    base = float(line.split("| baseline ")[1].split("bf16 share ")[1].split(" ")[0])
    assert share > base  # the plan's bf16 attention moved work from fp32 to bf16
