"""Train MANGO: ``python -m jobs.train --config launch/configs/<name>.yaml [section.key=value ...]``.

The same entry point serves every launcher (they only set the environment; see ``pipeline.dist``):

    # 1 process (CPU or 1 GPU)
    python -m jobs.train --config launch/configs/demo.yaml train.max_steps=50
    # 1 node, 2 ranks
    torchrun --standalone --nproc_per_node=2 -m jobs.train --config launch/configs/demo.yaml deepspeed.zero_stage=2
    # 2 nodes (run on each node; HOST = first node)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m jobs.train --config launch/configs/mango_256.yaml checkpoint.resume=latest
    # resume the newest complete checkpoint of a run
    python -m jobs.train --config launch/configs/demo.yaml run.dir=runs/demo checkpoint.resume=latest

A bad key or type, and bad data (a missing or empty shard store, a missing manifest, too few samples, too
many shards that fail their manifest check), fail before any process group starts with one line. Exit
codes: 0 done (or saved after SIGUSR2, requeue me), 143 saved after SIGTERM (restart me), 2 bad config /
data / checkpoint (one line naming it), 3 watchdog, 1 error (a lost rank or a collective past
``train.collective_timeout_s``: one line naming the lost rank).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from pipeline import dist
from pipeline.config import ConfigError, load_config
from pipeline.data.verify import DataError
from pipeline.train.checkpoint import CheckpointError
from pipeline.train.checkpoint import SaveError as CheckpointSaveError
from pipeline.train.loop import train_loop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML config (launch/configs/*.yaml); defaults if omitted")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.max_steps=100")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = train_loop(cfg)
    except (ConfigError, DataError) as e:  # found once the run's state is known (checkpoint / shards vs config)
        kind = "data" if isinstance(e, DataError) else "checkpoint" if isinstance(e, CheckpointError) else "config"
        print(f"{kind} error: {e}", file=sys.stderr, flush=True)
        if dist.is_initialized() and dist.get_world_size() > 1:
            os._exit(2)  # every rank raised alike; tearing the group down could wait on a peer
        return 2
    except CheckpointSaveError as e:
        print(f"checkpoint error: {e}", file=sys.stderr, flush=True)
        if dist.is_initialized() and dist.get_world_size() > 1:
            os._exit(1)  # the other ranks may wait in the save's barrier (bounded by the collective timeout)
        return 1
    except Exception as e:
        line = dist.describe_collective_failure(e) or dist.describe_rendezvous_failure(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # never wait on the lost peer (interpreter shutdown would join gloo's threads)
    if result:
        print(json.dumps({k: v for k, v in result.items()}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
