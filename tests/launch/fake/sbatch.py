"""Stand-in for ``sbatch --parsable [--dependency=...]``: reads the script from stdin, records the call and the
script in $FAKE_SLURM_LOG, prints a new job id (1000, 1001, ...) as the real one does with --parsable."""

import json
import os
import sys


def main(argv: list[str]) -> int:
    script = sys.stdin.read()
    if not script.startswith("#!"):
        print("sbatch: error: This does not look like a batch script.", file=sys.stderr)
        return 1
    with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
        log.write(json.dumps({"sbatch": {"argv": argv, "script": script}}) + "\n")
    with open(os.environ["FAKE_SLURM_LOG"]) as log:
        job_id = 999 + sum(1 for line in log if '"sbatch"' in line)
    print(job_id)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
