"""Joint samples of a density model as PNG grids (one row per sample, one column per modality).

    python -m jobs.sample --checkpoint runs/demo --n 16 --out samples.png
    python -m jobs.sample --model-uri models:/mango-density@champion --n 64 --temperature 0.7 --out s.png
    python -m jobs.sample --checkpoint runs/demo/model.safetensors --n 16 --grids 4 --out s.png   # s-0..3.png

Sampling is exact (z ~ N(0, T²·I) through the inverse flow, quantised to each modality's bit depth).
``--seed`` fixes the draw: the same model, seed, n and temperature give the same PNG. ``--npz`` also
writes the integer samples as arrays (keyed by modality). Only the density task samples; cross-modal
generation ("given A, sample B") is the translation task's job.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline.figures import density_sample_grid
from pipeline.flows import quantize
from pipeline.tasks import get_task, names_where


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.sample", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="model.safetensors, a run dir, checkpoints/ dir or a checkpoint tag dir")
    src.add_argument("--model-uri", help="models:/mango-density@<alias> or models:/mango-density/<version>")
    p.add_argument("--n", type=int, default=16, help="samples per grid (default: 16)")
    p.add_argument("--grids", type=int, default=1, help="number of grids (default: 1)")
    p.add_argument("--temperature", type=float, default=1.0, help="prior temperature T > 0 (default: 1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png", help="PNG path; with --grids > 1, <stem>-<k>.png")
    p.add_argument("--npz", default="", help="also write the integer samples here (.npz)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--tracking-uri", default="", help="MLflow store for --model-uri")
    args = p.parse_args(argv)
    if args.n < 1 or args.grids < 1 or not args.temperature > 0:
        p.error(f"need --n ≥ 1, --grids ≥ 1 and --temperature > 0; got {args.n}, {args.grids}, {args.temperature}")

    from pipeline import evaluation as ev  # heavy: imports MLflow (model sources); after the argument checks

    try:
        with tempfile.TemporaryDirectory(prefix="mango-sample-") as scratch:
            source = ev.resolve_source(args.checkpoint, args.model_uri, scratch, tracking_uri=args.tracking_uri)
            if not get_task(source.cfg.model.task).can_sample:
                raise ValueError(
                    f"{source.origin} is a {source.cfg.model.task!r} model; only "
                    f"{'/'.join(names_where('can_sample'))} models sample (use jobs.evaluate for its figures)"
                )
            device = ev.pick_device(source.cfg, args.device)
            model = ev.load_source(source, device)
            bits = {name: b for name, _, b in ev.weights_specs(source.weights)}
            out = Path(args.out)
            paths, arrays = [], {}
            torch.manual_seed(args.seed)
            for k in range(args.grids):
                with torch.no_grad():
                    draw = model(mode="sample", n=args.n, temperature=args.temperature)
                names = list(draw)
                path = out if args.grids == 1 else out.with_name(f"{out.stem}-{k}{out.suffix or '.png'}")
                paths.append(density_sample_grid([draw[m] for m in names], [bits[m] for m in names], names, path))
                for m in names:
                    arrays.setdefault(m, []).append(quantize(draw[m].float().cpu(), bits[m]).numpy())
            if args.npz:
                np.savez(args.npz, **{m: np.concatenate(v) for m, v in arrays.items()})
    except (FileNotFoundError, LookupError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.n * args.grids} joint samples of {source.origin} (T={args.temperature:g}, seed {args.seed}): "
        + ", ".join(map(str, paths))
        + (f" and {args.npz}" if args.npz else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
