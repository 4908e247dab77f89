#!/bin/bash
# {{title}}
# Rendered by `python -m jobs.launch shard-array`; task i of {{tasks}} writes its share of the split, then the
# dependent merge job (slurm_shard_merge.sh, submitted with --dependency=afterok:<this job>) commits it.
#SBATCH --job-name={{job_name}}
#SBATCH --array=0-{{last_task}}
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task={{cpus_per_task}}
{{sbatch_resources}}#SBATCH --time={{time}}
#SBATCH --open-mode=append
#SBATCH --output={{log_dir}}/%x-%A_%a.log
{{include slurm_env.sh}}
cd {{repo}}
# $SLURM_ARRAY_TASK_ID is this array task's own index (each task runs its own copy of this script)
{{python}} -m jobs.shard {{shard_args}} --task-index "$SLURM_ARRAY_TASK_ID" --num-tasks {{tasks}} --quiet
