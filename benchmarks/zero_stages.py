"""Per-step time and peak RSS of the tiny demo config on 2 torchrun ranks (gloo), ZeRO 0 vs 2 vs 3.

For each stage: ``torchrun --nproc_per_node=2 -m jobs.train --config launch/configs/demo.yaml`` on the embedded
stereo shards; the step time is the median interval between consecutive ``metrics.jsonl`` records (log every
step, after 5 warm-up steps); peak RSS is the largest sum over both rank processes, sampled every 50 ms.
Ratios are against ZeRO-0 measured in the same run. ``python benchmarks/zero_stages.py [--steps N]``
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from jobs.demo import STEREO
from pipeline.data import write_split
from pipeline.tracking import read_metrics

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(stage: int, shards: str, run_dir: Path, steps: int) -> tuple[float, float]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "jobs.train",
        "--config",
        "launch/configs/demo.yaml",
        f"data.shards={shards}",
        f"run.dir={run_dir}",
        f"deepspeed.zero_stage={stage}",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "eval.every=100000",
        "checkpoint.every=100000",
        "tracking.enabled=false",
        "optim.warmup_steps=0",
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            kids = [c for c in psutil.Process(proc.pid).children(recursive=True) if "python" in c.name()]
            peak = max(peak, sum(c.memory_info().rss for c in kids))
        except psutil.Error:
            pass
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"ZeRO-{stage} run failed ({proc.returncode}): {' '.join(cmd)}")
    times = [r["time"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    return statistics.median(b - a for a, b in zip(times[5:], times[6:])), peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        shards = str(Path(d) / "shards")
        for split in ("train", "val"):
            write_split("embedded", "stereo", shards, split, options=STEREO, samples_per_shard=8, progress=False)
        rows = {stage: measure(stage, shards, Path(d) / f"zero{stage}", args.steps) for stage in (0, 2, 3)}
    base_t, base_m = rows[0]
    print(f"tiny demo config, 2 gloo ranks, batch 8/rank, {args.steps} steps (median step after 5 warm-up)")
    print(f"{'stage':<8}{'step ms':>9}{'x ZeRO-0':>10}{'peak RSS MiB':>14}{'x ZeRO-0':>10}")
    for stage, (t, m) in rows.items():
        print(f"ZeRO-{stage:<3}{t * 1e3:>9.0f}{t / base_t:>10.2f}{m:>14.0f}{m / base_m:>10.2f}")


if __name__ == "__main__":
    main()
