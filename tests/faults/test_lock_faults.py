"""A build killed half-way leaves torch's extension-build lock behind; the next run reports and clears it
(no live owner) instead of waiting forever, and leaves a lock a live build holds."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.extensions import _lock_holders, clear_stale_build_locks, extension_build_root
from tests.train.conftest import run


@pytest.mark.timeout(60)
def test_stale_lock_is_cleared_and_a_live_one_is_left(tmp_path: Path, capsys, caplog) -> None:
    stale = tmp_path / "py311_cpu" / "some_op" / "lock"
    live = tmp_path / "py311_cpu" / "other_op" / "lock"
    for p in (stale, live):
        p.parent.mkdir(parents=True)
        p.write_text("")
    holder = subprocess.Popen([sys.executable, "-c", f"f = open({str(live)!r}); import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 20
        while _lock_holders(str(live)) == [] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert clear_stale_build_locks(str(tmp_path)) == [str(stale)]
        err = capsys.readouterr().err + "\n".join(r.getMessage() for r in caplog.records)
        assert "removed a stale extension build lock" in err and str(stale) in err
        assert f"held by pid {holder.pid}" in err and str(live) in err
        assert not stale.exists() and live.exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.timeout(120)
def test_deepspeed_init_goes_through_a_stale_lock_on_its_comm_op(tmp_path: Path) -> None:
    # a copy of DeepSpeed's built CPU comm op with the lock a build killed half-way leaves; without the
    # clearing, deepspeed.init_distributed waits on it forever (issue 21, case 2)
    cache = tmp_path / "torch_extensions"
    for op in Path(extension_build_root()).glob("*/deepspeed_shm_comm*"):
        shutil.copytree(op, cache / op.parent.name / op.name)
    locks = [p / "lock" for p in cache.glob("*/deepspeed_shm_comm*")]
    assert locks
    for lock in locks:
        lock.write_text("")
    code = (
        "from pipeline import dist; info = dist.init_distributed(dist.world_info_from_env(), backend='gloo', "
        "use_deepspeed=True); print('group up', info.world_size)"
    )
    r = run([sys.executable, "-c", code], timeout=90, env={"TORCH_EXTENSIONS_DIR": str(cache)})
    assert r.returncode == 0 and "group up 1" in r.stdout, r.stderr[-3000:]
    assert r.stderr.count("removed a stale extension build lock") == len(locks), r.stderr[-3000:]
    assert not any(p.exists() for p in locks)
