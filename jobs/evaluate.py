"""Evaluate a trained model on one split: metrics JSON + figures, logged to MLflow with its run.

    python -m jobs.evaluate --checkpoint runs/demo --split val          # → runs/demo/eval/val-step<N>.json
    python -m jobs.evaluate --checkpoint runs/demo/model.safetensors --shards s3://bucket/stereo --split test
    python -m jobs.evaluate --model-uri models:/mango-density@champion --split val
    python -m jobs.evaluate --checkpoint runs/tx --inception-weights /weights/pt_inception.pth   # translation

``--checkpoint``: consolidated weights, a run directory, its ``checkpoints/`` directory or a tag directory.
``--model-uri``: ``models:/mango-<task>@<alias>`` or ``models:/mango-<task>/<version>``. The metrics and
figures go to the training run (known from the checkpoint or the registry version) at the checkpoint's
step, else to a new ``evaluate-<task>`` run; ``--no-tracking`` skips MLflow. Without ``--out`` the JSON
(and the figures beside it) go into the run: ``<run dir>/eval/<split>-step<N>.json`` for a run / checkpoint
directory, ``eval/`` beside a weights file or a sweep's ``best.json``, ``<run.dir>/eval/`` of the model's
config for a registry URI (``runs/eval/`` when that directory is not here) — never the current directory. The store is ``--tracking-uri``,
else ``tracking.uri`` of the model's config, else ``MLFLOW_TRACKING_URI``, else the project's local store.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from pipeline.tasks import get_task, names_where


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint",
        help="model.safetensors, a sweep's best.json, a run dir, checkpoints/ dir or a checkpoint tag dir",
    )
    src.add_argument("--model-uri", help="models:/mango-<task>@<alias> or models:/mango-<task>/<version>")
    p.add_argument("--split", default="", help="split to evaluate (default: the config's data.val_split)")
    p.add_argument("--shards", default="", help="shard store (local dir or s3://); default: the config's data.shards")
    p.add_argument("--out", default="", help="metrics JSON path (default: <run dir>/eval/<split>-step<N>.json)")
    p.add_argument("--figures", default="", help="figure directory (default: <out stem>_figures beside --out)")
    p.add_argument("--num-figures", type=int, default=8, help="samples per figure (default: 8)")
    p.add_argument("--batch-size", type=int, default=0, help="evaluation batch size (default: data.batch_size)")
    p.add_argument("--inception-weights", default="", help="local Inception weights for FID/KID (translation)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--tracking-uri", default="", help="MLflow store (see above)")
    p.add_argument("--no-tracking", action="store_true", help="write the JSON and figures only")
    args = p.parse_args(argv)

    from pipeline import evaluation as ev  # heavy: imports MLflow (model sources); after the argument checks

    try:
        with tempfile.TemporaryDirectory(prefix="mango-eval-") as scratch:
            source = ev.resolve_source(args.checkpoint, args.model_uri, scratch, tracking_uri=args.tracking_uri)
            cfg = source.cfg
            tracking_uri = args.tracking_uri or cfg.tracking.uri
            split, shards = args.split or cfg.data.val_split, args.shards or cfg.data.shards
            if args.inception_weights and not get_task(cfg.model.task).image_distances:
                raise ValueError(
                    f"--inception-weights is for the {'/'.join(names_where('image_distances'))} task; "
                    f"this model is {cfg.model.task!r}"
                )
            device = ev.pick_device(cfg, args.device)
            model = ev.load_source(source, device)
            result = ev.evaluate_model(
                model,
                cfg,
                shards,
                split,
                device=device,
                batch_size=args.batch_size or None,
                inception_weights=args.inception_weights or None,
            )
            out = Path(args.out) if args.out else default_out(args.checkpoint, source, split)
            out.parent.mkdir(parents=True, exist_ok=True)
            result.extra |= {"task": cfg.model.task, "model": source.origin, "step": source.step}
            out.write_text(result.to_json() + "\n")
            fig_dir = Path(args.figures) if args.figures else out.with_name(out.stem + "_figures")
            files = ev.task_figures(model, source, shards, split, fig_dir, n=args.num_figures, device=device)
            run_id = None
            if not args.no_tracking:
                run_id = ev.log_evaluation(result, source, [out, *files], tracking_uri=tracking_uri)
    except (FileNotFoundError, LookupError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        print(
            f"error: --checkpoint {args.checkpoint} is not a readable safetensors file: corrupt or truncated ({e})",
            file=sys.stderr,
        )
        return 2
    width = max(len(k) for k in result.metrics)
    print(
        f"{cfg.model.task} on {shards} split {split} ({result.samples} samples, manifest {result.manifest_sha256[:12]})"
    )
    for k, v in sorted(result.metrics.items()):
        print(f"  {k:<{width}}  {v:.6g}")
    logged = f"; logged to MLflow run {run_id}" if run_id else ""
    print(f"wrote {out} and {len(files)} figure(s) in {fig_dir}{logged}")
    return 0


def default_out(checkpoint: str | None, source, split: str) -> Path:
    """Where the metrics JSON goes without ``--out``: into the run (see the module docstring)."""
    name = f"{split}-step{source.step}.json" if source.step is not None else f"{split}.json"
    if checkpoint:
        path = Path(checkpoint)
        if path.is_dir():  # run / checkpoints / tag directory: source.origin is the tag directory
            return Path(source.origin).parent.parent / "eval" / name
        return path.parent / "eval" / name
    run_dir = Path(source.cfg.run.dir)
    return (run_dir if run_dir.is_dir() else Path("runs")) / "eval" / name


if __name__ == "__main__":
    sys.exit(main())
