"""``launch/templates/node.sh`` on its own: which processes a forwarded signal reaches, and the exit status.

The stand-in launcher behaves like torchrun in the ways that matter: it does not handle SIGUSR2 (so a signal
sent to it would kill it), it starts its rank with LOCAL_RANK set, and it exits 1 when the rank fails.
The rank starts a DataLoader-like child (which inherits LOCAL_RANK) that must never be signalled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.launch.spec import TEMPLATES

LAUNCHER = """\
LOCAL_RANK=0 RANK=0 bash "$1/rank.sh" "$1" &
wait $!
rc=$?
echo "launcher saw rank exit $rc" >> "$1/events"
[ "$rc" -eq 0 ] && exit 0 || exit 1
"""
RANK = """\
trap 'echo "rank USR2" >> "$1/events"; kill -KILL $worker; exit 0' USR2
trap 'echo "rank TERM" >> "$1/events"; kill -KILL $worker; exit 143' TERM
bash -c 'trap "echo worker-signalled >> \\"$0/events\\"; exit 1" USR2 TERM; while :; do sleep 0.05; done' "$1" &
worker=$!
echo ready >> "$1/events"
while :; do sleep 0.05 & wait $!; done
"""


def _start(tmp_path: Path) -> subprocess.Popen:
    (tmp_path / "launcher.sh").write_text(LAUNCHER)
    (tmp_path / "rank.sh").write_text(RANK)
    proc = subprocess.Popen(
        ["bash", str(TEMPLATES / "node.sh"), "bash", str(tmp_path / "launcher.sh"), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not (tmp_path / "events").exists() or "ready" not in (tmp_path / "events").read_text():
        assert time.monotonic() < deadline and proc.poll() is None, "the stand-in rank did not start"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize(
    "sig, rank_event, launcher_rc, expected",
    [
        (signal.SIGUSR2, "rank USR2", 0, 0),  # saved, launcher clean, exit 0: the batch script requeues
        (signal.SIGTERM, "rank TERM", 1, 143),  # launcher reports failure (1), node.sh still says 143: restart me
    ],
)
def test_the_signal_reaches_only_the_rank(
    tmp_path: Path, sig: int, rank_event: str, launcher_rc: int, expected: int
) -> None:
    proc = _start(tmp_path)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    events = (tmp_path / "events").read_text().splitlines()
    assert proc.returncode == expected, out
    assert rank_event in events and "worker-signalled" not in events
    rank_rc = 0 if sig == signal.SIGUSR2 else 143
    assert f"launcher saw rank exit {rank_rc}" in events  # the launcher survived and reaped its rank
    assert f"forwarding SIG{signal.Signals(sig).name[3:]} to ranks" in out


def test_without_arguments_it_explains_itself() -> None:
    r = subprocess.run(["bash", str(TEMPLATES / "node.sh")], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr


# -- pod.sh: the Kubernetes entry point -------------------------------------------------------------

POD_RANK = """\
trap 'echo "rank $RANK TERM" >> "$1/events"; exit 143' TERM
echo "start $RANK $LOCAL_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE $MASTER_ADDR:$MASTER_PORT" >> "$1/events"
code_var="EXIT_RANK_$RANK"
if [ -n "${!code_var:-}" ]; then exit "${!code_var}"; fi
while :; do sleep 0.05 & wait $!; done
"""


def _pod(tmp_path: Path, node_rank: int, **env: str) -> subprocess.Popen:
    (tmp_path / "rank.sh").write_text(POD_RANK)
    pet = {
        "PET_NNODES": "2",
        "PET_NODE_RANK": str(node_rank),
        "PET_NPROC_PER_NODE": "2",
        "PET_MASTER_ADDR": "mango-demo-master-0",
        "PET_MASTER_PORT": "23456",
    }
    return subprocess.Popen(
        ["bash", str(TEMPLATES / "pod.sh"), "bash", str(tmp_path / "rank.sh"), str(tmp_path)],
        env={"PATH": os.environ["PATH"], **pet, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _events(tmp_path: Path, n: int = 0) -> list[str]:
    deadline = time.monotonic() + 20
    while True:
        lines = (tmp_path / "events").read_text().splitlines() if (tmp_path / "events").exists() else []
        if len([x for x in lines if x.startswith("start")]) >= n or time.monotonic() > deadline:
            return lines


def test_pod_starts_its_ranks_and_exits_143_when_evicted(tmp_path: Path) -> None:
    proc = _pod(tmp_path, node_rank=1)
    started = sorted(x for x in _events(tmp_path, 2) if x.startswith("start"))
    assert started == ["start 2 0 4 2 mango-demo-master-0:23456", "start 3 1 4 2 mango-demo-master-0:23456"]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143, out
    assert {"rank 2 TERM", "rank 3 TERM"} <= set(_events(tmp_path))


def test_pod_whose_ranks_stopped_for_a_peer_also_exits_143(tmp_path: Path) -> None:
    # the collective stop: these ranks were not signalled, but saved and exited 143 after the evicted pod's did
    proc = _pod(tmp_path, node_rank=0, EXIT_RANK_0="143", EXIT_RANK_1="143")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143, out


@pytest.mark.parametrize(
    "codes, expected", [({"EXIT_RANK_0": "0", "EXIT_RANK_1": "0"}, 0), ({"EXIT_RANK_0": "3"}, 3)]
)  # rank 1 would hang: it is killed
def test_pod_success_and_failure(tmp_path: Path, codes: dict[str, str], expected: int) -> None:
    proc = _pod(tmp_path, node_rank=0, **codes)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == expected, out


def test_pod_without_the_operator_variables_says_which_is_missing(tmp_path: Path) -> None:
    r = subprocess.run(
        ["bash", str(TEMPLATES / "pod.sh"), "true"], env={"PATH": os.environ["PATH"]}, capture_output=True, text=True
    )
    assert r.returncode == 2 and "PET_NNODES is not set" in r.stderr
