"""Does bf16 autocast train the demo model as well as fp32? Held-out bits/dim after the same steps.

``python benchmarks/bf16_demo.py [--steps 100] [--seeds 0 1] [overrides]``

The demo's config (``launch/configs/demo.yaml``: the multiscale MANGO flow on 16×16 stereo patches of the real
Middlebury pair) trained through the DeepSpeed ``train_loop`` twice per seed, ``deepspeed.precision=fp32`` and
``=bf16`` (autocast over fp32 weights: the ICA attention in bf16 with fp32 log-dets, the couplings' conditioners in
bf16), same data order and initial weights. Printed per seed: held-out bits/dim of each, their ratio
bf16 / fp32, and the step times (this CPU has no native bf16: autocast is emulated here, so only the
accuracy figure means anything on CPU; speed is for a GPU). Goal: the ratio within 1 ± 0.02.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from jobs.demo import CONFIG, shard_stereo
from pipeline.config import load_config
from pipeline.train.loop import train_loop


def run(tmp: Path, precision: str, seed: int, steps: int, extra: list[str]) -> tuple[float, float]:
    cfg = load_config(
        CONFIG,
        [
            f"data.shards={tmp / 'shards'}",
            f"run.dir={tmp / f'{precision}-{seed}'}",
            f"run.seed={seed}",
            f"deepspeed.precision={precision}",
            f"train.max_steps={steps}",
            f"eval.every={steps}",
            f"checkpoint.every={steps}",
            "tracking.enabled=false",
            *extra,
        ],
    )
    start = time.monotonic()
    result = train_loop(cfg)
    return result["val_bits_per_dim"], (time.monotonic() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        shard_stereo(str(tmp / "shards"))  # the demo's own shards
        for seed in args.seeds:
            fp32, t32 = run(tmp, "fp32", seed, args.steps, args.overrides)
            bf16, t16 = run(tmp, "bf16", seed, args.steps, args.overrides)
            print(
                f"seed {seed}, {args.steps} steps: held-out bits/dim fp32 {fp32:.4f}, bf16 {bf16:.4f}, "
                f"ratio bf16/fp32 {bf16 / fp32:.4f} (|1 - ratio| = {abs(1 - bf16 / fp32):.2%}); "
                f"wall per step fp32 {t32:.3f} s, bf16 {t16:.3f} s (CPU bf16 is emulated)"
            )


if __name__ == "__main__":
    main()
