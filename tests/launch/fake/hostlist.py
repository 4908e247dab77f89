"""SLURM hostlist expansion for the stand-ins (``127.0.0.[1-3],gpu[01-02]``), without importing torch via
pipeline.dist: the stand-ins run several times per script and must start fast."""

import re


def expand(hostlist: str) -> list[str]:
    hosts = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", hostlist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not m:
            hosts.append(item)
            continue
        for part in m.group(2).split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{m.group(1)}{str(i).zfill(len(lo))}{m.group(3)}")
    return hosts
