"""Register a trained model in the MLflow registry as ``mango-<task>``; ``--promote`` runs the gate.

    python -m jobs.register --checkpoint runs/demo/model.safetensors
    python -m jobs.register --checkpoint runs/demo --promote                # newest complete checkpoint
    python -m jobs.register --run-id 3f2c... --promote                     # the training run's run.dir
    MLFLOW_TRACKING_URI=http://mlflow:5000 python -m jobs.register --checkpoint sweeps/lr/best.json --promote

The model is evaluated first (``--split``, default the config's ``data.val_split``, on ``--shards``, default
``data.shards``), then logged as a pyfunc model (safetensors weights + resolved config) in its training run
(a new ``register-<task>`` run when the store does not know it) and registered as a new version tagged with
its metrics, the evaluation and training manifests' checksums and the git commit; ``candidate`` points at
it. ``--promote`` moves ``champion`` only if ``eval.metric`` beats the champion's in ``eval.mode`` on the
same evaluation manifest (another manifest is refused). Exit codes: 0 registered (and promoted, if asked);
3 registered but not promoted (the reason is printed); 2 bad input.
The logged model is self-contained (its code, a signature, a held-out input example, requirements from the
package index; see docs/serving.md). Afterwards: ``mlflow.pyfunc.load_model("models:/mango-<task>@champion")``,
``mlflow models serve -m models:/mango-<task>@champion``, ``python -m jobs.predict --model ... --shards ... --out ...``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

NOT_PROMOTED = 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.register", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint",
        help="model.safetensors, a sweep's best.json, a run dir, checkpoints/ dir or a checkpoint tag dir",
    )
    src.add_argument("--run-id", help="an MLflow training run of this pipeline (its run.dir tag → newest checkpoint)")
    p.add_argument("--split", default="", help="evaluation split (default: the config's data.val_split)")
    p.add_argument("--shards", default="", help="evaluation shard store (default: the config's data.shards)")
    p.add_argument("--promote", action="store_true", help="move champion here if the gate allows it")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow store (default: tracking.uri, MLFLOW_TRACKING_URI, the project's local store)",
    )
    args = p.parse_args(argv)

    from pipeline import evaluation as ev  # heavy: torch + MLflow; --help stays light
    from pipeline.tracking import registry  # heavy: torch + MLflow; --help stays light

    try:
        with tempfile.TemporaryDirectory(prefix="mango-register-") as scratch:
            if args.run_id:
                source = registry.source_from_run(args.run_id, scratch, tracking_uri=args.tracking_uri)
            else:
                source = ev.resolve_checkpoint(args.checkpoint, scratch)
            cfg = source.cfg
            tracking_uri = args.tracking_uri or cfg.tracking.uri
            split, shards = args.split or cfg.data.val_split, args.shards or cfg.data.shards
            device = ev.pick_device(cfg, args.device)
            result = ev.evaluate_model(ev.load_source(source, device), cfg, shards, split, device=device)
            reg = registry.register(source, result, tracking_uri=tracking_uri, promote=args.promote)
    except (FileNotFoundError, LookupError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metric = reg.tags["eval.metric"]
    print(
        f"registered {reg.name} version {reg.version} (run {reg.run_id}; alias {registry.CANDIDATE}): "
        f"{metric}={result.metrics[metric]:.6g} on {shards} split {split} (manifest {result.manifest_sha256[:12]})"
    )
    if reg.gate is None:
        return 0
    print(("promoted: " if reg.gate.promote else "not promoted: ") + reg.gate.reason)
    return 0 if reg.gate.promote else NOT_PROMOTED


if __name__ == "__main__":
    sys.exit(main())
