# Shared by every rendered SLURM batch script (pasted in by pipeline.launch.spec.load_template).
set -euo pipefail
set +u  # site set-up (module load, conda activate) often reads unset variables
{{setup}}
set -u
export PYTHONUNBUFFERED=1
{{exports}}
