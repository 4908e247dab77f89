"""Stand-in for ``kubectl``: ``apply -f -`` (parses the manifests from stdin, prints what the real one does)
and ``-n NS wait --for=condition=complete job/NAME``; each call is recorded in $FAKE_SLURM_LOG."""

import json
import os
import sys

import yaml


def main(argv: list[str]) -> int:
    docs = list(yaml.safe_load_all(sys.stdin.read())) if argv[:3] == ["apply", "-f", "-"] else []
    with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
        log.write(json.dumps({"kubectl": {"argv": argv, "kinds": [d["kind"] for d in docs]}}) + "\n")
    for d in docs:
        print(f"{d['kind'].lower()}/{d['metadata']['name']} created")
    return 0 if docs or "wait" in argv else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
