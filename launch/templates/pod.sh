#!/bin/bash
# Kubernetes pod entry point (PID 1): starts this pod's ranks of "$@" (e.g. python -m jobs.train ...) and
# decides the pod's exit status from theirs.
#
#   bash launch/templates/pod.sh python -m jobs.train --config /etc/mango/config.yaml
#
# The Kubeflow training operator describes the job in PET_NNODES, PET_NODE_RANK, PET_NPROC_PER_NODE,
# PET_MASTER_ADDR and PET_MASTER_PORT; each rank gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
# MASTER_ADDR and MASTER_PORT (pipeline.dist reads them as an env:// launch).
# Why not torchrun here: when a pod is evicted, SIGTERM reaches one pod, yet every rank of the job stops
# after the same step, saves and exits 143 (the stop is collective). torchrun turns ranks that exited 143
# into its own exit status 1, which `restartPolicy: ExitCode` treats as permanent — the peers of the evicted
# pod would fail the whole job. Started directly, the ranks' 143 becomes the pod's 143 and every pod restarts.
# Exit status: 143 if any rank exited 143 (preempted, saved: restart me); else 0 if all exited 0; else the
# first failing rank's status, after the other ranks were killed (they would hang in a collective).
set -u
for var in PET_NNODES PET_NODE_RANK PET_NPROC_PER_NODE PET_MASTER_ADDR PET_MASTER_PORT; do
    if [ -z "${!var:-}" ]; then
        echo "pod.sh: $var is not set (run me in a PyTorchJob with spec.nprocPerNode, or set PET_* yourself)" >&2
        exit 2
    fi
done
if [ "$#" -eq 0 ]; then
    echo "usage: bash launch/templates/pod.sh COMMAND [ARGS...]" >&2
    exit 2
fi
nproc=$PET_NPROC_PER_NODE
export MASTER_ADDR=$PET_MASTER_ADDR MASTER_PORT=$PET_MASTER_PORT
export WORLD_SIZE=$((PET_NNODES * nproc)) LOCAL_WORLD_SIZE=$nproc
# A signal that arrives while the ranks are being started is held and forwarded once all of them run: without
# this, a TERM in that window killed pod.sh by default and orphaned the ranks it had started.
pending=""
trap 'pending=TERM' TERM
trap 'pending=USR2' USR2
pids=()
for ((i = 0; i < nproc; i++)); do
    RANK=$((PET_NODE_RANK * nproc + i)) LOCAL_RANK=$i "$@" &
    pids+=("$!")
done
running=("${pids[@]}")

forward() {  # forward SIGNAL: to every rank still running
    echo "pod.sh: forwarding SIG$1 to ranks ${running[*]}" >&2
    kill -s "$1" "${running[@]}" 2>/dev/null
}
trap 'forward TERM' TERM
trap 'forward USR2' USR2
if [ -n "$pending" ]; then
    forward "$pending"
fi

status="" preempted=""
while [ "${#running[@]}" -gt 0 ]; do
    finished=""
    wait -n -p finished "${running[@]}"
    rc=$?
    [ -n "${finished:-}" ] || continue  # a trap cut the wait short (it leaves -p unset)
    running=($(printf '%s\n' "${running[@]}" | grep -vx "$finished"))
    if [ "$rc" -eq 143 ]; then
        preempted=1
    elif [ "$rc" -ne 0 ] && [ -z "$status" ] && [ -z "$preempted" ]; then
        status=$rc
        echo "pod.sh: rank pid $finished exited $rc; stopping the other ranks" >&2
        kill -KILL "${running[@]}" 2>/dev/null
    fi
done
if [ -n "$preempted" ]; then
    exit 143
fi
exit "${status:-0}"
