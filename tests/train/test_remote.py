"""Checkpoint mirroring to S3 (``checkpoint.remote``) against a real S3 API: moto's server on 127.0.0.1.

The tag directories are structurally real (DeepSpeed's file names, ``trainer-rank<r>.pt``, ``state.json``,
``COMPLETE``, a local ``latest``) but hold random bytes: what is under test is the commit protocol and the
byte-exact round trip, not DeepSpeed. The endpoint reaches s3fs only through ``AWS_*`` environment
variables, as in production.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import time
from pathlib import Path

import pytest

from pipeline.data import storage
from pipeline.train import remote
from pipeline.train.checkpoint import checkpoint_root, latest_complete, step_tag
from pipeline.train.remote import RemoteSync, download, latest_remote
from tests.conftest import S3Server

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def s3(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The moto server's ``AWS_*`` variables in ``os.environ``, and this process's s3fs rebuilt from them."""
    # storage caches one s3fs per process, built from the environment of its first use; an instance from an
    # earlier test (another endpoint, e.g. the unreachable one below) would otherwise be reused here.
    monkeypatch.setattr(storage, "_S3_BY_PID", {})
    return s3_env


def make_tag(run_dir: Path, step: int, size: int = 4096, world: int = 2) -> Path:
    """A complete local checkpoint as ``checkpoint.save`` leaves it (random payloads, ``latest`` moved)."""
    root = checkpoint_root(run_dir)
    tag = root / step_tag(step)
    tag.mkdir(parents=True)
    rng = random.Random(step)
    for r in range(world):
        (tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(rng.randbytes(size))
        (tag / f"trainer-rank{r}.pt").write_bytes(rng.randbytes(512))
    (tag / "mp_rank_00_model_states.pt").write_bytes(rng.randbytes(size))
    (tag / "state.json").write_text(json.dumps({"step": step, "world_size": world}))
    (tag / "COMPLETE").write_text(f"{step}\n")
    (root / "latest").write_text(tag.name + "\n")
    return tag


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def remote_tree(s3: S3Server, url: str) -> dict[str, bytes]:
    bucket, _, prefix = url[len("s3://") :].partition("/")
    client = s3.client()
    return {k[len(prefix) + 1 :]: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in s3.keys(url)}


def tags_in(s3: S3Server, url: str) -> list[str]:
    return sorted({name.split("/")[0] for name in remote_tree(s3, url) if name.startswith("step")})


class Recording:
    """The real s3fs, with the order of its writes recorded (and an optional fault on one call)."""

    def __init__(self, fs, fail_on: str = "", after: int = 0) -> None:
        self.fs, self.calls, self.fail_on, self.after = fs, [], fail_on, after

    def __getattr__(self, name):
        method = getattr(self.fs, name)
        if name not in ("put_file", "pipe_file", "get_file", "rm_file", "rm"):
            return method

        def call(*args, **kw):
            self.calls.append((name, args[1] if name in ("put_file", "get_file") else args[0]))
            if name == self.fail_on and sum(c[0] == name for c in self.calls) > self.after:
                raise ConnectionError(f"injected fault in {name}")
            return method(*args, **kw)

        return call


def synced(url: str, run_dir: Path, *steps: int, keep: int = 3) -> RemoteSync:
    sync = RemoteSync(url, run_dir, keep=keep)
    for step in steps:
        sync.submit(checkpoint_root(run_dir) / step_tag(step))
        assert sync.wait(30)
    sync.close()
    assert sync.failures == 0
    return sync


def test_upload_puts_every_file_then_complete_then_latest(s3, tmp_path, monkeypatch):
    url = s3.make_bucket() + "/runs/a"
    tag = make_tag(tmp_path, 100)
    rec = Recording(storage.s3_filesystem())
    monkeypatch.setattr(remote, "s3_filesystem", lambda: rec)

    sync = synced(url, tmp_path, 100)

    assert sync.uploaded == ["step00000100"]
    objects = remote_tree(s3, url)
    assert objects.pop("latest") == b"step00000100\n"
    assert objects == {f"step00000100/{k}": v for k, v in tree(tag).items()}, "byte-identical mirror"
    writes = [target.rpartition("/")[2] for name, target in rec.calls if name in ("put_file", "pipe_file")]
    assert writes[-2:] == ["COMPLETE", "latest"], "the marker is the commit point, the pointer follows it"
    assert sorted(writes[:-2]) == sorted(set(tree(tag)) - {"COMPLETE"})


def test_partial_remote_tag_is_never_trusted(s3, tmp_path):
    url = s3.make_bucket() + "/runs/b"
    assert latest_remote(url) is None, "an empty remote has no checkpoint"
    make_tag(tmp_path, 1)
    synced(url, tmp_path, 1)
    # A killed upload of step 2: every object but COMPLETE. Even if `latest` names it (a re-upload that was
    # killed after uncommitting), readers fall back to the newest complete tag.
    bucket, _, prefix = url[len("s3://") :].partition("/")
    for name, data in tree(make_tag(tmp_path, 2)).items():
        if name != "COMPLETE":
            s3.client().put_object(Bucket=bucket, Key=f"{prefix}/step00000002/{name}", Body=data)
    assert latest_remote(url) == "step00000001"
    s3.client().put_object(Bucket=bucket, Key=f"{prefix}/latest", Body=b"step00000002\n")
    assert latest_remote(url) == "step00000001"
    s3.client().delete_object(Bucket=bucket, Key=f"{prefix}/latest")
    assert latest_remote(url) == "step00000001", "without a pointer: the lexically newest complete tag"
    with pytest.raises(FileNotFoundError, match="not a complete remote checkpoint"):
        download(url, "step00000002", tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "checkpoints" / "step00000002").exists()


def test_download_to_an_empty_run_dir_restores_an_identical_checkpoint(s3, tmp_path, monkeypatch):
    url = s3.make_bucket() + "/runs/c"
    source = make_tag(tmp_path / "old-node", 7)
    synced(url, tmp_path / "old-node", 7)
    new_node = tmp_path / "new-node"
    assert latest_complete(new_node) is None

    # A download killed half-way leaves nothing that looks like a checkpoint (and no temp directory).
    rec = Recording(storage.s3_filesystem(), fail_on="get_file", after=2)
    monkeypatch.setattr(remote, "s3_filesystem", lambda: rec)
    with pytest.raises(ConnectionError):
        download(url, "step00000007", new_node)
    assert latest_complete(new_node) is None
    assert list(checkpoint_root(new_node).iterdir()) == []

    rec = Recording(storage.s3_filesystem())
    monkeypatch.setattr(remote, "s3_filesystem", lambda: rec)
    tag = latest_remote(url)
    local = download(url, tag, new_node)
    assert local == checkpoint_root(new_node) / "step00000007"
    assert tree(local) == tree(source), "byte-identical"
    assert latest_complete(new_node) == local
    assert [c for c in rec.calls if c[0] == "get_file"][-1][1].endswith("/COMPLETE"), "marker fetched last"
    assert sorted(p.name for p in checkpoint_root(new_node).iterdir()) == ["latest", "step00000007"]

    # Once per node, or again after a restart: already complete locally, so nothing is fetched.
    fetched = len(rec.calls)
    assert download(url, tag, new_node) == local and len(rec.calls) == fetched


def test_download_replaces_a_partial_local_tag(s3, tmp_path):
    url = s3.make_bucket() + "/runs/d"
    source = make_tag(tmp_path / "old-node", 3)
    synced(url, tmp_path / "old-node", 3)
    killed_save = checkpoint_root(tmp_path / "new-node") / "step00000003"
    killed_save.mkdir(parents=True)
    (killed_save / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    (killed_save / "stale-extra-file").write_bytes(b"x")
    assert tree(download(url, "step00000003", tmp_path / "new-node")) == tree(source)


def test_prune_keeps_the_newest_complete_tags_and_the_one_latest_names(s3, tmp_path):
    url = s3.make_bucket() + "/runs/e"
    for step in (1, 2, 3, 4):
        make_tag(tmp_path, step, size=256)
    bucket, _, prefix = url[len("s3://") :].partition("/")
    s3.client().put_object(Bucket=bucket, Key=f"{prefix}/step00000000/mp_rank_00_model_states.pt", Body=b"killed")
    synced(url, tmp_path, 1, 2, 3, 4, keep=2)
    assert tags_in(s3, url) == ["step00000003", "step00000004"], "older complete and partial tags pruned"

    # Re-uploading an older tag moves `latest` back to it; pruning must keep it beside the newest `keep`.
    synced(url, tmp_path, 3, keep=1)
    assert tags_in(s3, url) == ["step00000003", "step00000004"]
    assert latest_remote(url) == "step00000003"
    assert remote_tree(s3, url)["step00000003/COMPLETE"] == b"3\n"


def test_submit_returns_at_once_and_a_newer_tag_supersedes_a_queued_one(s3, tmp_path):
    url = s3.make_bucket() + "/runs/f"
    tags = [make_tag(tmp_path, step, size=3 << 20) for step in (10, 20, 30)]  # ~6 MB of shards each
    sync = RemoteSync(url, tmp_path, keep=3)
    start = time.perf_counter()
    sync.submit(tags[0])
    submit_s = time.perf_counter() - start
    assert sync.wait(30)
    upload_s = time.perf_counter() - start
    assert submit_s < 0.05 and submit_s < upload_s / 5, (submit_s, upload_s)

    for tag in tags[1:]:  # back to back: the first is still uploading (or queued) when the next arrives
        sync.submit(tag)
    sync.submit(tags[0])  # submit an older one last so something is surely superseded
    assert sync.wait(60)
    sync.close()
    assert sync.failures == 0
    assert sync.skipped, "a tag superseded while queued is skipped"
    assert sorted(sync.uploaded[1:] + sync.skipped) == ["step00000010", "step00000020", "step00000030"]
    assert sync.uploaded[-1] == "step00000010" == latest_remote(url)

    (tmp_path / "checkpoints" / "step00000040").mkdir()  # a save still in progress
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        sync.submit(tmp_path / "checkpoints" / "step00000040")


def test_an_unreachable_endpoint_is_counted_and_warned_never_raised(s3, tmp_path, monkeypatch, caplog):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries; this test is about what follows
    make_tag(tmp_path, 5)
    make_tag(tmp_path, 6)
    sync = RemoteSync("s3://nowhere/runs/g", tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.train.remote"):
        for step, failures in ((5, 1), (6, 2)):
            sync.submit(checkpoint_root(tmp_path) / step_tag(step))
            assert sync.wait(30)
            assert sync.failures == failures
    sync.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [("step00000005" in r.getMessage(), "step00000006" in r.getMessage()) for r in warnings] == [
        (True, False),
        (False, True),
    ], "exactly one warning per failure, naming its tag"
    assert sync.uploaded == []


def test_a_tag_missing_ranks_is_refused_not_committed(s3, tmp_path, caplog):
    url = s3.make_bucket() + "/runs/h"
    tag = make_tag(tmp_path, 9, world=2)
    (tag / "trainer-rank1.pt").unlink()  # rank 1's files on another node's local disk
    sync = RemoteSync(url, tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.train.remote"):
        sync.submit(tag)
        assert sync.wait(30)
    assert sync.failures == 1 and "trainer-rank1.pt" in caplog.text
    assert latest_remote(url) is None and s3.keys(url) == []
