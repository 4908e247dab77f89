"""Score a split of a shard store with a registered model; write the predictions as shards + a manifest.

    python -m jobs.predict --model models:/mango-density@champion --shards shards/stereo --out preds/stereo
    python -m jobs.predict --model models:/mango-segmentation/3 --shards s3://bucket/scenes --split test \\
        --out s3://bucket/preds/scenes --ray --actors 8          # Ray Data actor pool (RAY_ADDRESS or local)

``--shards`` is a shard store written by ``jobs.shard`` (``--split``, default ``val``) or one
``manifest-<split>.json``. Every listed shard becomes an output shard of the same name with the same sample
keys (``<key>.bits_per_dim.npy`` per sample for density — the anomaly score —, ``<key>.pred.npy`` for
segmentation / translation, ``<key>.probs.npy`` for classification), then ``manifest-<split>.json`` is
committed last (counts, sha256 per shard, the model's name / version / run id and the input manifest's
checksum). Density outputs are deterministic per sample key (dequantisation noise seeded by the key), so the
local engine and ``--ray`` write equal shards. The registry comes from ``--tracking-uri``, else
``MLFLOW_TRACKING_URI``, else the project's local store. Exit status: 0 done; 2 bad input (one line on
stderr, before any model is loaded or Ray started).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.predict", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="models:/mango-<task>@<alias> or models:/mango-<task>/<version>")
    p.add_argument("--shards", required=True, help="shard store (local dir or s3://) or a manifest-<split>.json")
    p.add_argument("--split", default="val", help="split to score when --shards is a store (default: val)")
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--ray", action="store_true", help="run on Ray Data: map_batches over an actor pool")
    p.add_argument("--actors", type=int, default=2, help="--ray: actors in the pool (each loads the model once)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads per scorer (0: torch's default locally, 1 per Ray actor)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace predictions already in --out")
    p.add_argument("--tracking-uri", default="", help="MLflow registry (default: MLFLOW_TRACKING_URI, the local store)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    from pipeline.tracking import batch_predict as bp  # heavy: torch + the model stack; --help stays light

    try:
        if args.batch_size < 1 or args.actors < 1 or args.threads < 0:
            raise bp.InputError("--batch-size and --actors must be >= 1, --threads >= 0")
        manifest = _input_manifest(args.shards, args.split)
        bp.check_output(args.out, manifest.split, manifest.location, args.overwrite)
        model = bp.resolve_registered(args.model, args.tracking_uri)
        bp.check_inputs(model, manifest)
        if args.ray:
            try:
                import ray.data  # noqa: F401  (heavy: optional Ray Data dependency, only checked for --ray)
            except ImportError as e:
                raise bp.InputError(f"--ray needs Ray Data (pip install 'ray[data]'): {e}") from e
    except bp.InputError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the cause's layout
        return 2
    threads = args.threads or (1 if args.ray else 0)
    result = bp.predict_split(
        model,
        manifest,
        args.out,
        batch_size=args.batch_size,
        engine="ray" if args.ray else "local",
        actors=args.actors,
        threads=threads,
        progress=not args.no_progress,
    )
    m = result.manifest
    print(
        f"scored {m.total_samples} samples of {manifest.location} with {model.name} version {model.version} "
        f"({result.engine}): {len(m.shards)} shards, manifest {m.location} (sha256 {m.manifest_checksum()[:12]}"
        f"; input {result.input_manifest_sha256[:12]}; {m.skipped_samples} skipped)"
    )
    return 0


def _input_manifest(shards: str, split: str):
    from pipeline.data import load_manifest, manifest_name  # heavy: pipeline.data imports torch (see main)
    from pipeline.data.storage import join  # heavy: pipeline.data imports torch (see main)
    from pipeline.tracking.batch_predict import InputError  # heavy: torch, as in main

    url = shards if shards.endswith(".json") else join(shards, manifest_name(split))
    try:
        return load_manifest(url)
    except FileNotFoundError as e:
        raise InputError(
            f"--shards {shards}: no committed manifest {url} (was the split sharded with jobs.shard? --split {split})"
        ) from e
    except ValueError as e:
        raise InputError(f"--shards {shards}: {e}") from e
    except Exception as e:  # noqa: BLE001 - unreachable S3 and the like
        raise InputError(f"--shards {shards}: cannot read {url} ({e})") from e


if __name__ == "__main__":
    sys.exit(main())
