"""Stand-in for ``srun`` on one machine: runs the step's tasks locally with the variables srun sets per task.

What it shares with the real srun, because the batch scripts rely on it: tasks get SLURM_STEP_ID, SLURM_PROCID,
SLURM_LOCALID, SLURM_NODEID (index of the task's host in the job's node list), SLURMD_NODENAME and the step's
sizes; ``--output`` patterns (%n %t %N %j %%) with ``--open-mode=append``; USR2/TERM/INT received by srun are
forwarded to every task; ``--kill-on-bad-exit`` stops the others when a task fails; the exit status is the
highest task status. Each task runs in its own session, like a task on another node: only forwarded signals
reach it. Every invocation is appended as a JSON line to $FAKE_SLURM_LOG.
"""

import json
import os
import signal
import subprocess
import sys
import time

from hostlist import expand as expand_hostlist


def main(argv: list[str]) -> int:
    opts, i = {}, 0
    flags = {"--kill-on-bad-exit": "1"}
    while i < len(argv) and argv[i].startswith("-"):
        arg = argv[i]
        key, sep, value = arg.partition("=")
        if not sep and key in (
            "-N",
            "-n",
            "-w",
            "--nodes",
            "--ntasks",
            "--ntasks-per-node",
            "--output",
            "--open-mode",
            "--cpus-per-task",
            "--nodelist",
            "--exclude",
        ):
            value, i = argv[i + 1], i + 1
        elif not sep:
            value = flags.get(key, "")
        opts[{"-N": "--nodes", "-n": "--ntasks", "-w": "--nodelist"}.get(key, key)] = value
        i += 1
    command = argv[i:]
    hosts = expand_hostlist(os.environ["SLURM_JOB_NODELIST"])
    chosen = expand_hostlist(opts["--nodelist"]) if "--nodelist" in opts else list(hosts)
    if "--exclude" in opts:
        chosen = [h for h in chosen if h not in expand_hostlist(opts["--exclude"])]
    nodes = int(opts.get("--nodes", len(chosen)))
    chosen = chosen[:nodes]
    per_node = (
        int(opts["--ntasks-per-node"])
        if "--ntasks-per-node" in opts
        else max(1, int(opts.get("--ntasks", nodes)) // nodes)
    )
    ntasks = per_node * nodes
    step = int(os.environ.get("FAKE_SLURM_STEP", "0"))
    os.environ["FAKE_SLURM_STEP"] = str(step + 1)
    with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
        log.write(json.dumps({"srun": argv, "hosts": chosen, "per_node": per_node}) + "\n")
    procs = []
    for n, host in enumerate(chosen):
        for local in range(per_node):
            rank = n * per_node + local
            env = {
                **os.environ,
                "SLURM_STEP_ID": str(step),
                "SLURM_PROCID": str(rank),
                "SLURM_LOCALID": str(local),
                "SLURM_NODEID": str(hosts.index(host)),
                "SLURMD_NODENAME": host,
                "SLURM_STEP_NUM_TASKS": str(ntasks),
                "SLURM_STEP_NUM_NODES": str(nodes),
                "SLURM_STEP_NODELIST": ",".join(chosen),
                "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})",
            }
            out = None
            if "--output" in opts:
                path = (
                    opts["--output"]
                    .replace("%%", "\0")
                    .replace("%n", str(hosts.index(host)))
                    .replace("%t", str(rank))
                    .replace("%N", host)
                    .replace("%j", os.environ.get("SLURM_JOB_ID", "0"))
                    .replace("\0", "%")
                )
                out = open(path, "a" if opts.get("--open-mode") == "append" else "w")
            procs.append(
                subprocess.Popen(
                    command, env=env, stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True
                )
            )

    def forward(signum, frame):
        print(f"srun: forwarding {signal.Signals(signum).name} to {len(procs)} task(s)", file=sys.stderr, flush=True)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    killed = set()
    while any(p.poll() is None for p in procs):
        if "--kill-on-bad-exit" in opts and any(p.poll() not in (None, 0) for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    killed.add(p.pid)
        time.sleep(0.1)
    # like srun: the status of the task that failed, not of the ones it took down with it
    codes = [p.returncode if p.returncode >= 0 else 128 - p.returncode for p in procs if p.pid not in killed]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
