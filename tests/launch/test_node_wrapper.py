"""``launch/templates/node.sh`` on its own: which processes a forwarded signal reaches, and the exit status.

The stand-in launcher behaves like torchrun in the ways that matter: it does not handle SIGUSR2 (so a signal
sent to it would kill it), it starts its rank with LOCAL_RANK set, and it exits 1 when the rank fails.
The rank starts a DataLoader-like child (which inherits LOCAL_RANK) that must never be signalled.
"""

from __future__ import annotations

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
    proc = subprocess.Popen(["bash", str(TEMPLATES / "node.sh"), "bash", str(tmp_path / "launcher.sh"),
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 20
    while not (tmp_path / "events").exists() or "ready" not in (tmp_path / "events").read_text():
        assert time.monotonic() < deadline and proc.poll() is None, "the stand-in rank did not start"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("sig, rank_event, launcher_rc, expected", [
    (signal.SIGUSR2, "rank USR2", 0, 0),  # saved, launcher clean, exit 0: the batch script requeues
    (signal.SIGTERM, "rank TERM", 1, 143),  # launcher reports failure (1), node.sh still says 143: restart me
])
def test_the_signal_reaches_only_the_rank(tmp_path: Path, sig: int, rank_event: str, launcher_rc: int,
                                         expected: int) -> None:
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
