#!/bin/bash
# {{title}}
# Rendered by `python -m jobs.launch ray-slurm` from {{config_source}}; re-render instead of editing.
#SBATCH --job-name={{job_name}}
#SBATCH --nodes={{nodes}}
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task={{cpus_per_task}}
{{sbatch_resources}}#SBATCH --time={{time}}
#SBATCH --open-mode=append
#SBATCH --output={{log_dir}}/%x-%j.log
{{include slurm_env.sh}}
REPO={{repo}}
RUN_DIR={{run_dir}}
JOB_LOG_DIR={{log_dir}}/"$SLURM_JOB_NAME-$SLURM_JOB_ID"
mkdir -p "$JOB_LOG_DIR"
cat > "$JOB_LOG_DIR/config.yaml" <<'MANGO_CONFIG'
{{config_yaml}}MANGO_CONFIG
cd "$REPO"

# Ray head on the first node of the allocation, one worker per remaining node, then the sweep as the driver.
# (no `| head -n 1`: under pipefail, scontrol killed by SIGPIPE would fail the script)
NODES=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD_NODE=${NODES%%$'\n'*}
HEAD_IP=$(srun --nodes=1 --ntasks=1 -w "$HEAD_NODE" hostname --ip-address | awk '{print $1}')
RAY_PORT={{port}}
export RAY_ADDRESS="$HEAD_IP:$RAY_PORT"
srun --nodes=1 --ntasks=1 -w "$HEAD_NODE" --output="$JOB_LOG_DIR/ray-head.log" --open-mode=append \
    {{python}} -m ray.scripts.scripts start --head --block --node-ip-address="$HEAD_IP" --port="$RAY_PORT" \
    --num-cpus={{cpus_per_task}} --num-gpus={{gpus}} &
RAY_PIDS=$!
{{workers}}
# wait until every node has joined (ray status lists one "node_" line per alive node)
for _ in $(seq 120); do
    alive=$({{python}} -m ray.scripts.scripts status --address="$RAY_ADDRESS" 2>/dev/null | grep -c ' node_' || true)
    [ "$alive" -ge {{nodes}} ] && break
    sleep 5
done
[ "$alive" -ge {{nodes}} ] || { echo "only $alive of {{nodes}} Ray nodes joined" >&2; exit 1; }

STEP_RC=0
{{python}} -m jobs.sweep --config "$JOB_LOG_DIR/config.yaml" --space {{space}} || STEP_RC=$?
kill $RAY_PIDS 2>/dev/null || true
exit "$STEP_RC"
