"""Stands in for the node's Python in dry runs: records its argv, working directory and the per-task
variables as one JSON line in $FAKE_SLURM_LOG; exits with $FAKE_EXIT_ON_NODE_<SLURM_NODEID> (default 0)."""

import json
import os
import sys

KEYS = ("SLURM_NODEID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_ID", "MASTER_ADDR", "MASTER_PORT",
        "NCCL_DEBUG", "RAY_ADDRESS")

with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    log.write(json.dumps({"python": {"argv": sys.argv[1:], "cwd": os.getcwd(),
                                     "env": {k: os.environ[k] for k in KEYS if k in os.environ}}}) + "\n")
sys.exit(int(os.environ.get(f"FAKE_EXIT_ON_NODE_{os.environ.get('SLURM_NODEID', '0')}", "0")))
