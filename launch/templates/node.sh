#!/bin/bash
# One node's launcher, with preemption signals forwarded to the training ranks it starts.
#
#   bash launch/templates/node.sh LAUNCHER ARGS...     e.g.  python -m torch.distributed.run ... -m jobs.train ...
#
# torchrun handles only SIGTERM/SIGINT/SIGHUP/SIGQUIT and does not forward SIGUSR2; the deepspeed launcher and
# accelerate die on an unhandled SIGUSR2 and leave the ranks behind. So this script runs the launcher in the
# background and, on USR2 or TERM, signals the ranks themselves: the outermost descendants of the launcher
# whose environment defines LOCAL_RANK (every launcher sets it for its ranks, none for itself; DataLoader
# workers below a rank inherit it but are never signalled, their rank handles the stop).
# The ranks finish their step, save a checkpoint and exit (USR2 -> 0, TERM -> 143; pipeline/train/signals.py).
# Exit status: the launcher's, except after a TERM forwarded here, which is always 143 (torchrun itself reports
# ranks that exited 143 as a failure, exit 1). Kubernetes pods use launch/templates/pod.sh instead.
set -u

mango_ranks() {  # mango_ranks PID: the training ranks below PID, one per line
    local child
    for child in $(pgrep -P "$1"); do
        if tr '\0' '\n' < "/proc/$child/environ" 2>/dev/null | grep -q '^LOCAL_RANK='; then
            echo "$child"
        else
            mango_ranks "$child"
        fi
    done
}

mango_forward() {  # mango_forward SIGNAL: deliver SIGNAL to every rank of this node
    MANGO_SIGNAL=$1
    MANGO_TRAPPED=1
    local ranks="" tries=0
    # a signal during start-up: give the launcher up to 60 s to spawn its ranks
    while ranks=$(mango_ranks "$MANGO_LAUNCHER_PID") && [ -z "$ranks" ] && [ "$tries" -lt 60 ] \
            && kill -0 "$MANGO_LAUNCHER_PID" 2>/dev/null; do
        sleep 1
        tries=$((tries + 1))
    done
    if [ -z "$ranks" ]; then
        echo "node.sh: SIG$1 but no training rank is running; stopping the launcher (no new checkpoint)" >&2
        kill -TERM "$MANGO_LAUNCHER_PID" 2>/dev/null
        return
    fi
    echo "node.sh: forwarding SIG$1 to ranks" $ranks "on $(hostname)" >&2
    kill -s "$1" $ranks 2>/dev/null
}

if [ "$#" -eq 0 ]; then
    echo "usage: bash launch/templates/node.sh LAUNCHER [ARGS...]" >&2
    exit 2
fi
MANGO_SIGNAL=""
"$@" &
MANGO_LAUNCHER_PID=$!
trap 'mango_forward USR2' USR2
trap 'mango_forward TERM' TERM
# A trap cuts `wait` short (status > 128); wait again. Bash keeps a reaped child's status, so the second wait
# returns the launcher's own exit status even if it ended while the trap ran.
while :; do
    MANGO_TRAPPED=""
    wait "$MANGO_LAUNCHER_PID"
    rc=$?
    [ -n "$MANGO_TRAPPED" ] || break
done
if [ "$MANGO_SIGNAL" = TERM ]; then
    exit 143
fi
exit "$rc"
