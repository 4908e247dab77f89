"""S3 end to end against a real S3 API (moto's server): write with the CLI, read with workers, kill a job.

The endpoint and credentials reach s3fs only through botocore's environment chain (``AWS_ENDPOINT_URL_S3``
etc.), exactly as in production.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pipeline.data import build_eval_loader, build_train_loader, load_manifest

from .conftest import STEREO_TRAIN_OPTIONS
from .util import REPO, run_cli


@pytest.mark.timeout(120)
def test_shards_written_to_s3_read_back_with_workers(s3_env, stereo_shards):
    out = s3_env.make_bucket() + "/mango/stereo"
    r = run_cli(
        "embedded",
        "--src",
        "stereo",
        "--split",
        "train",
        "--out",
        out,
        "--samples-per-shard",
        "16",
        "--workers",
        "2",
        "--quiet",
        *[f"--{k}={v}" for k, v in STEREO_TRAIN_OPTIONS.items()],
    )
    assert r.returncode == 0, r.stderr
    objects = s3_env.keys(out)
    assert "mango/stereo/manifest-train.json" in objects
    assert sum(o.endswith(".tar") for o in objects) == 14

    manifest = load_manifest(f"{out}/manifest-train.json")
    local = load_manifest(str(stereo_shards / "manifest-train.json"))
    assert manifest.manifest_checksum() == local.manifest_checksum(), "same data, byte for byte, as a local run"
    assert manifest.shard_urls()[0] == f"{out}/train-0000-000000.tar"

    # The manifest was just read here through s3fs; the forked workers must still open their own clients.
    loader = build_eval_loader(manifest, 16, rank=0, world_size=1, num_workers=2)
    keys = [k for b in loader for k in b["__key__"]]
    assert len(keys) == len(set(keys)) == 224 and loader.shard_errors == 0
    train = build_train_loader(f"{out}/manifest-train.json", 8, rank=0, world_size=1, num_workers=2, epoch_batches=3)
    assert [b["depth.png"].shape for b in train] == [(8, 1, 16, 16)] * 3


@pytest.mark.timeout(120)
def test_killed_job_leaves_nothing_readers_accept_and_rerun_reuses_shards(s3_env, raw_datasets, tmp_path):
    src = tmp_path / "tf"
    shutil.copytree(raw_datasets["tokenfusion"], src)
    blocker = src / "rgb" / "000003.png"  # first sample of the second shard
    original = blocker.read_bytes()
    blocker.unlink()
    os.mkfifo(blocker)  # reading it blocks: the job is deterministically stuck after shard 0 is published
    out = s3_env.make_bucket() + "/nyu"
    cmd = [
        sys.executable,
        "-m",
        "jobs.shard",
        "nyudv2",
        "--src",
        str(src),
        "--out",
        out,
        "--split",
        "train",
        "--samples-per-shard",
        "2",
        "--quiet",
    ]
    job = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while "nyu/train-0000-000000.tar.receipt.json" not in s3_env.keys(out):
            assert job.poll() is None, job.stderr.read().decode()
            assert time.monotonic() < deadline, "shard 0 was never published"
            time.sleep(0.1)
        job.send_signal(signal.SIGKILL)
    finally:
        job.wait(30)
        job.stdout.close()
        job.stderr.close()
    objects = s3_env.keys(out)
    assert "nyu/train-0000-000000.tar" in objects
    assert not [o for o in objects if "manifest" in o], "a killed job commits no manifest"
    with pytest.raises(FileNotFoundError, match="manifest-train.json"):
        build_eval_loader(f"{out}/manifest-train.json", 2, rank=0, world_size=1, num_workers=0)

    blocker.unlink()
    blocker.write_bytes(original)
    r = run_cli("nyudv2", "--src", str(src), "--out", out, "--split", "train", "--samples-per-shard", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "reused 1 of 3 shards" in r.stderr
    manifest = load_manifest(f"{out}/manifest-train.json")
    assert manifest.total_samples == 5
    assert len([b for b in build_eval_loader(manifest, 1, rank=0, world_size=1, num_workers=0)]) == 5
