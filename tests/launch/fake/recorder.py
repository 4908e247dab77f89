"""Stands in for the node's Python in dry runs: records its argv, working directory and the per-task
variables as one JSON line in $FAKE_SLURM_LOG; exits with $FAKE_EXIT_ON_NODE_<SLURM_NODEID> (default 0).
With FAKE_WAIT_FOR_USR2=1 it instead waits (≤ 60 s) for SIGUSR2, records it with its SLURM_PROCID, exits 0."""

import json
import os
import signal
import sys
import time

KEYS = (
    "SLURM_NODEID",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_STEP_ID",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NCCL_DEBUG",
    "RAY_ADDRESS",
)


def record(entry: dict) -> None:
    with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
        log.write(json.dumps(entry) + "\n")


def on_usr2(signum, frame) -> None:
    record({"signal": {"name": "USR2", "procid": os.environ.get("SLURM_PROCID")}})
    sys.exit(0)


signal.signal(signal.SIGUSR2, on_usr2)
record(
    {"python": {"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {k: os.environ[k] for k in KEYS if k in os.environ}}}
)
if os.environ.get("FAKE_WAIT_FOR_USR2") == "1":
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.05)
    sys.exit(1)
sys.exit(int(os.environ.get(f"FAKE_EXIT_ON_NODE_{os.environ.get('SLURM_NODEID', '0')}", "0")))
