"""Consolidate a checkpoint into full fp32 weights: ``python -m jobs.consolidate CKPT_DIR --out model.safetensors``.

CKPT_DIR is a run directory, its ``checkpoints/`` directory (→ the newest complete checkpoint), or one
checkpoint tag directory, written at any ZeRO stage. Writes ``model.safetensors`` (parameters and
persistent buffers) and ``model.config.yaml`` (the resolved config) beside it.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.train.checkpoint import CheckpointError
from pipeline.train.consolidate import config_path, consolidate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.consolidate", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="run dir, checkpoints/ dir, or a checkpoint tag dir")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    args = parser.parse_args(argv)
    try:
        out = consolidate(args.checkpoint, args.out)
    except (FileNotFoundError, CheckpointError) as e:  # one line naming the file (checksums in state.json)
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} and {config_path(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
