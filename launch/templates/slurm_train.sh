#!/bin/bash
# {{title}}
# Rendered by `python -m jobs.launch {{target}}` from {{config_source}}; re-render instead of editing.
#SBATCH --job-name={{job_name}}
#SBATCH --nodes={{nodes}}
#SBATCH --ntasks-per-node={{tasks_per_node}}
#SBATCH --cpus-per-task={{cpus_per_task}}
{{sbatch_resources}}#SBATCH --time={{time}}
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR2@{{signal_lead_s}}
#SBATCH --output={{log_dir}}/%x-%j.log
{{include slurm_env.sh}}
REPO={{repo}}
RUN_DIR={{run_dir}}
JOB_LOG_DIR={{log_dir}}/"$SLURM_JOB_NAME-$SLURM_JOB_ID"
SNAPSHOT="$RUN_DIR/code/$SLURM_JOB_ID"
mkdir -p "$JOB_LOG_DIR" "$RUN_DIR/code"
echo "job $SLURM_JOB_ID, start $(( ${SLURM_RESTART_COUNT:-0} + 1 )), nodes $SLURM_JOB_NODELIST, $(date -u +%FT%TZ)"

# Code snapshot: the first start of this job copies the code into the run dir; a requeued start (same job id)
# reuses it, so a resumed run never picks up code edited after submission.
if [ ! -e "$SNAPSHOT/.complete" ]; then
    rm -rf "$SNAPSHOT.partial" && mkdir -p "$SNAPSHOT.partial"
    tar -C "$REPO" --exclude=__pycache__ -cf - pipeline jobs launch pyproject.toml | tar -C "$SNAPSHOT.partial" -xf -
    { git -C "$REPO" rev-parse HEAD && git -C "$REPO" status --porcelain; } > "$SNAPSHOT.partial/VERSION" 2>/dev/null || true
    rm -rf "$SNAPSHOT" && mv "$SNAPSHOT.partial" "$SNAPSHOT" && touch "$SNAPSHOT/.complete"
fi
# The config as resolved and validated at render time; checkpoint.resume=latest makes a requeue continue.
cat > "$SNAPSHOT/config.yaml" <<'MANGO_CONFIG'
{{config_yaml}}MANGO_CONFIG
cd "$SNAPSHOT"

# Master / rendezvous: the first host of the allocation, a port every node derives from the job id.
# (no `| head -n 1`: under pipefail, scontrol killed by SIGPIPE would fail the script)
NODES=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD_NODE=${NODES%%$'\n'*}
PORT={{port}}
export MASTER_ADDR="$HEAD_NODE" MASTER_PORT="$PORT"
{{prepare}}
# Preemption: SLURM signals this batch shell (B:USR2) {{signal_lead_s}} s before the end. Forward it to the
# step (srun passes it to every task), let the ranks save, then requeue; the requeued start resumes.
mango_preempt() {
    MANGO_PREEMPTED=1
    MANGO_TRAPPED=1
    echo "USR2 at $(date -u +%FT%TZ): forwarding to the training step and waiting for its checkpoint"
    kill -USR2 "$STEP_PID" 2>/dev/null || true
}
MANGO_PREEMPTED=""
trap mango_preempt USR2

srun --kill-on-bad-exit=1 --nodes={{nodes}} --ntasks-per-node={{tasks_per_node}} --cpus-per-task={{cpus_per_task}} \
    --output="$JOB_LOG_DIR/{{task_log}}" --open-mode=append \
    {{step}} &
STEP_PID=$!
# the trap cuts `wait` short; wait again (bash keeps the step's status even if it ended during the trap)
while :; do
    MANGO_TRAPPED=""
    wait "$STEP_PID" && STEP_RC=0 || STEP_RC=$?
    [ -n "$MANGO_TRAPPED" ] || break
done
if [ -n "$MANGO_PREEMPTED" ]; then
    echo "training step exited $STEP_RC after the warning; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$STEP_RC"
