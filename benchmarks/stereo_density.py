"""Does the cross-modal attention capture the dependence between two views? Joint vs single-modality flows.

On the real Middlebury stereo pair (embedded in scikit-image; left and right views cut into 16×16 patches,
train and held-out from disjoint image regions), three density models of the same layer types, size and
training budget (same config, steps and batch) are trained through the DeepSpeed ``train_loop``:

- joint: the multiscale MANGO flow over (left, right);
- left only / right only: the single-modality flow (one image's tokens split even/odd).

Printed: held-out bits/dim of each, and the comparison in total bits per stereo pair — the joint model wins
when ``bpd_joint · 2M < bpd_left · M + bpd_right · M`` (M = dims per view), i.e. when it models the views'
mutual information. ``python benchmarks/stereo_density.py [--steps N] [overrides]``
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from jobs.demo import CONFIG, STEREO  # the demo's model and patches, so the figures speak for the demo
from pipeline.config import load_config
from pipeline.data import write_split
from pipeline.train.loop import train_loop


def run(tmp: Path, name: str, modalities: str, steps: int, extra: list[str]) -> tuple[float, float]:
    cfg = load_config(
        CONFIG,
        [
            f"data.shards={tmp / 'shards'}",
            f"run.dir={tmp / name}",
            f"data.modalities={modalities}",
            f"train.max_steps={steps}",
            f"eval.every={steps}",
            f"checkpoint.every={steps}",
            "tracking.enabled=false",
            *extra,
        ],
    )
    start = time.monotonic()
    result = train_loop(cfg)
    return result["val_bits_per_dim"], time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for split in ("train", "val"):
            write_split(
                "embedded", "stereo", str(tmp / "shards"), split, options=STEREO, samples_per_shard=64, progress=False
            )
        rows = {
            name: run(tmp, name, mods, args.steps, args.overrides)
            for name, mods in (("joint", "[rgb,right]"), ("left", "[rgb]"), ("right", "[right]"))
        }
    joint, left, right = (rows[k][0] for k in ("joint", "left", "right"))
    print(f"\nheld-out bits/dim after {args.steps} steps (same config, batch and steps for each model)")
    print(f"{'model':<22}{'bits/dim':>10}{'wall s':>9}")
    for name, (bpd, wall) in rows.items():
        print(f"{name:<22}{bpd:>10.4f}{wall:>9.0f}")
    print(f"{'(left + right) / 2':<22}{(left + right) / 2:>10.4f}")
    print(
        f"joint vs summed singles, bits per stereo pair per view-dim: {joint:.4f} vs {(left + right) / 2:.4f} "
        f"(ratio {joint / ((left + right) / 2):.4f}; < 1 means the joint flow captures cross-view dependence)"
    )


if __name__ == "__main__":
    main()
