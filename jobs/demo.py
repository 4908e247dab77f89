"""The whole pipeline on embedded data, on CPU, in a few minutes: ``python -m jobs.demo [overrides]``.

1. shards the real Middlebury stereo pair shipped with scikit-image (left + right views, train and
   held-out patches from disjoint image regions) into ``shards/stereo`` (reused when already there);
2. trains the density model (multiscale MANGO flow) through the same DeepSpeed ``train_loop`` that
   torchrun / SLURM / Ray run, validating on the held-out split, logging to MLflow and ``metrics.jsonl``;
3. consolidates the weights to ``<run.dir>/model.safetensors`` (+ config);
4. prints held-out bits/dim before and after, where everything is, and how to open the MLflow UI.

Overrides go to the config, e.g. ``python -m jobs.demo train.max_steps=40``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from pipeline.config import ConfigError, load_config
from pipeline.data import load_manifest, manifest_name, write_split
from pipeline.data.storage import exists, join
from pipeline.data.verify import DataError
from pipeline.tracking import read_metrics
from pipeline.tracking.store import resolve_tracking_uri
from pipeline.train.consolidate import config_path, consolidate
from pipeline.train.loop import train_loop

CONFIG = Path(__file__).resolve().parent.parent / "launch" / "configs" / "demo.yaml"
STEREO = {"patch": 16, "downscale": 3}  # disparity ≈ 13 px: the two views share most of a patch


def shard_stereo(out: str) -> None:
    for split in ("train", "val"):
        if exists(join(out, manifest_name(split))):
            m = load_manifest(join(out, manifest_name(split)))
            if (
                m.source_config.get("patch") == STEREO["patch"]
                and m.source_config.get("downscale") == STEREO["downscale"]
            ):
                print(f"[demo] reusing {out}/{manifest_name(split)} ({m.total_samples} samples)")
                continue
        m = write_split("embedded", "stereo", out, split, options=STEREO, samples_per_shard=128, progress=False)
        print(f"[demo] sharded {m.total_samples} {split} samples into {len(m.shards)} shards under {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.max_steps=40")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(CONFIG, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    start = time.monotonic()
    shard_stereo(cfg.data.shards)
    run_dir = Path(cfg.run.dir)
    if (run_dir / "checkpoints").exists():  # the demo always starts fresh in its own run directory
        print(f"[demo] removing the previous demo run's checkpoints in {run_dir}")
        shutil.rmtree(run_dir / "checkpoints")
    try:
        train_loop(cfg)
    except (ConfigError, DataError) as e:
        print(f"{'data' if isinstance(e, DataError) else 'config'} error: {e}", file=sys.stderr)
        return 2
    weights = consolidate(run_dir, run_dir / "model.safetensors")
    val = [r for r in read_metrics(run_dir / "metrics.jsonl") if "val_bits_per_dim" in r]
    before, after = val[0], val[-1]
    print()
    print(
        f"[demo] held-out bits/dim: {before['val_bits_per_dim']:.4f} (step {before['step']}) -> "
        f"{after['val_bits_per_dim']:.4f} (step {after['step']}) on {int(after['val_samples'])} patches"
    )
    print(f"[demo] wall time {time.monotonic() - start:.0f}s")
    print(f"[demo] run directory  {run_dir.resolve()}  (config.yaml, metrics.jsonl, checkpoints/)")
    if (run_dir / "metrics.png").exists():
        print(f"[demo] loss plot      {(run_dir / 'metrics.png').resolve()}")
    print(f"[demo] weights        {weights.resolve()} + {config_path(weights).name}")
    if cfg.tracking.enabled:
        uri = resolve_tracking_uri(cfg.tracking.uri)
        print(
            f"[demo] MLflow UI      .venv/bin/mlflow ui --backend-store-uri {uri}  "
            f"(experiment '{cfg.tracking.experiment}')"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
