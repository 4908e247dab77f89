"""Ray Tune sweep: ``python -m jobs.sweep --config CONFIG --space launch/sweeps/<name>.yaml [section.key=value ...]``.

Every trial runs ``pipeline.train.loop.train_loop`` (one process, or a Ray Train TorchTrainer when the space
file asks for several workers per trial); the space file holds the search space, the scheduler (ASHA by
default), num_samples, max_concurrent_trials, per-trial resources and the storage (see ``pipeline.tune``).

    # a local Ray cluster on this machine (2 CPUs), the tiny 4-trial ASHA sweep
    python -m jobs.sweep --config launch/configs/demo.yaml --space launch/sweeps/tiny.yaml --num-cpus 2
    # an existing cluster (ray start --head ...; or a KubeRay/SLURM-started head)
    RAY_ADDRESS=auto python -m jobs.sweep --config launch/configs/demo.yaml --space launch/sweeps/demo.yaml \\
        tracking.uri=http://mlflow:5000

The space file and the overrides are checked before Ray starts (exit 2, the key named). At the end the
results table is printed (and logged to the sweep's parent MLflow run), and the best trial's consolidated
weights, config and ``best.json`` are written to the sweep directory for ``jobs.register``.
Exit codes: 0 a best trial was found, 1 every trial failed or none reached a checkpointed validation, 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline.config import ConfigError, load_config
from pipeline.tune import load_space, run_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="base YAML config (launch/configs/*.yaml); defaults if omitted")
    parser.add_argument("--space", required=True, help="space file (launch/sweeps/*.yaml)")
    parser.add_argument("--name", help="sweep name (directory under the storage); default: the space file's name")
    parser.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster started when RAY_ADDRESS is unset")
    parser.add_argument("--quiet", action="store_true", help="no Tune progress tables while the sweep runs")
    parser.add_argument("overrides", nargs="*", help="base config overrides, e.g. data.shards=/data/stereo")
    args = parser.parse_args(argv)
    try:
        base = load_config(args.config, args.overrides)
        spec = load_space(args.space, base)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.num_cpus:
        import ray  # heavy: optional Ray dependency, only to size a local cluster

        if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
            ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    try:
        result = run_sweep(base, spec, sweep_name=args.name, verbose=0 if args.quiet else 1)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(
        f"\nsweep {spec.name if args.name is None else args.name}: {len(result.rows)} trials, "
        f"metric {spec.metric} ({spec.mode}), {result.extra['wall_s']:.0f} s"
    )
    print(result.table)
    for row in result.rows:
        if row.error:
            print(f"trial {row.trial_id} failed: {row.error}")
    if result.parent_run_id:
        print(f"MLflow parent run {result.parent_run_id} (nested runs: one per trial)")
    if result.best is None:
        print("no trial reached a checkpointed validation: nothing to register", file=sys.stderr)
        return 1
    print(f"best trial {result.best.trial_id}: {spec.metric}={result.best.last:.4f} -> {result.best_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
