#!/bin/bash
# {{title}}
# Rendered by `python -m jobs.launch shard-array`; runs after every array task succeeded
# (sbatch --dependency=afterok:<array job id>) and commits the split's manifest.
#SBATCH --job-name={{job_name}}
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task={{cpus_per_task}}
{{sbatch_resources}}#SBATCH --time={{time}}
#SBATCH --open-mode=append
#SBATCH --output={{log_dir}}/%x-%j.log
{{include slurm_env.sh}}
cd {{repo}}
{{python}} -m jobs.shard merge {{out}} --split {{split}}
