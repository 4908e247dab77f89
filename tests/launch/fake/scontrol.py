"""Stand-in for ``scontrol``: ``show hostnames [LIST]`` (SLURM's hostlist expansion) and ``requeue JOBID``
(recorded as a JSON line in $FAKE_SLURM_LOG). Anything else fails loudly."""

import json
import os
import sys

from hostlist import expand as expand_hostlist


def main(argv: list[str]) -> int:
    if argv[:2] == ["show", "hostnames"]:
        for host in expand_hostlist(argv[2] if len(argv) > 2 else os.environ["SLURM_JOB_NODELIST"]):
            print(host)
        return 0
    if len(argv) == 2 and argv[0] == "requeue":
        with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
            log.write(json.dumps({"requeue": argv[1]}) + "\n")
        return 0
    print(f"fake scontrol: unsupported {argv}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
