"""Render or submit cluster jobs: ``python -m jobs.launch TARGET --config FILE --nodes N --gpus-per-node G``.

    # SLURM: torchrun on each of 2 nodes (c10d on the first), USR2 → checkpoint → requeue
    python -m jobs.launch slurm --config launch/configs/mango_256.yaml --nodes 2 --gpus-per-node 8 --submit
    python -m jobs.launch slurm ... --launcher deepspeed        # or accelerate: the same jobs.train per node
    python -m jobs.launch srun --config launch/configs/mango_256.yaml --nodes 2 --gpus-per-node 8 --print
    python -m jobs.launch shard-array --config launch/configs/demo.yaml --nodes 1 --gpus-per-node 0 --tasks 16 \\
        --submit -- sunrgbd --src /data/SUNRGBD --out /shared/shards/sun --split train
    python -m jobs.launch ray-slurm --config launch/configs/demo.yaml --nodes 4 --gpus-per-node 4 \\
        --space launch/sweeps/<name>.yaml
    # Kubernetes (image from the Dockerfile; credentials in the Secret named by launch.env_from)
    python -m jobs.launch k8s --config launch/configs/mango_256.yaml --nodes 2 --gpus-per-node 8 \\
        launch.tag=0.1.0 launch.pvc=mango-runs --submit
    python -m jobs.launch kuberay --config launch/configs/demo.yaml --nodes 2 --gpus-per-node 1 \\
        --space launch/sweeps/<name>.yaml launch.tag=0.1.0 launch.pvc=mango-runs

Trailing ``section.key=value`` overrides apply to the config the job runs (``launch.*`` included). ``--print``
(the default) writes the files to stdout, ``--out DIR`` into DIR, ``--submit`` hands them to ``sbatch`` /
``kubectl apply`` (exit 2, naming the tool, when it is missing). Exit 2 also for a bad config or request.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config
from pipeline.launch import TARGETS, LaunchError, LaunchSpec, SubmitError, render, submit
from pipeline.launch.slurm import log_dir_for
from pipeline.launch.spec import LAUNCHERS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.launch", description=__doc__.split("\n")[0])
    p.add_argument("target", choices=TARGETS)
    p.add_argument("--config", help="YAML config (launch/configs/*.yaml); defaults if omitted")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="0 = CPU nodes, one process each")
    p.add_argument("--launcher", default="torchrun", choices=LAUNCHERS, help="per-node launcher (slurm only)")
    p.add_argument("--space", default="", help="ray-slurm / kuberay: launch/sweeps/<name>.yaml")
    p.add_argument("--tasks", type=int, default=0, help="sharding: array tasks / indexed completions")
    p.add_argument("--out", help="also write the rendered files into this directory")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--submit", action="store_true", help="sbatch / kubectl apply the rendered files")
    mode.add_argument("--print", action="store_true", help="print the rendered files (the default)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. launch.partition=gpu")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    shard_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    args = _parser().parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        spec = LaunchSpec(
            args.target,
            args.nodes,
            args.gpus_per_node,
            launcher=args.launcher,
            config_source=args.config or "defaults",
            space=args.space,
            tasks=args.tasks,
            shard_args=tuple(shard_args),
        )
        rendered = render(cfg, spec)
    except (ConfigError, LaunchError) as e:
        print(f"launch error: {e}", file=sys.stderr)
        return 2
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for art in rendered.artifacts:
            (out / art.name).write_text(art.text)
    if args.submit:
        try:
            for line in submit(
                rendered, log_dir_for(cfg) if args.target in ("slurm", "srun", "shard-array", "ray-slurm") else None
            ):
                print(line)
        except SubmitError as e:
            print(f"submit error: {e}", file=sys.stderr)
            return 2
        return 0
    if not args.out or args.print:
        for art in rendered.artifacts:  # one file prints bare, so `--print | sbatch` works
            if len(rendered.artifacts) > 1:
                print(f"# ==> {art.name} ({art.tool}{', after ' + art.after if art.after else ''}) <==")
            print(art.text, end="" if art.text.endswith("\n") else "\n")
    for note in rendered.notes:
        print(f"# {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
