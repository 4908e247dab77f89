"""The shard writer: manifest as commit point, determinism, re-runs, array tasks + merge, and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest

from pipeline.data import ShardManifest, build_eval_loader, load_manifest, manifest_checksum, merge_split, resolve_task
from pipeline.data.writer import plan_shards

from .util import read_all, run_cli, shard

STEREO_VAL = {"patch": 32}  # 60 samples


def _keys(manifest):
    return sorted(
        k
        for b in build_eval_loader(manifest, 16, rank=0, world_size=1, num_workers=0, decode=None)
        for k in b["__key__"]
    )


def test_manifest_round_trip_and_checksum_identifies_the_data(tmp_path):
    m = shard("embedded", "stereo", tmp_path, "val", options=STEREO_VAL, samples_per_shard=16, args={"workers": 1})
    assert [s.samples for s in m.shards] == [16, 16, 16, 12]
    assert [s.name for s in m.shards] == [f"val-0000-{k:06d}.tar" for k in range(4)]
    text = (tmp_path / "manifest-val.json").read_text()
    assert text == m.to_json()
    again = ShardManifest.from_json(text, location=m.location)
    assert again == m and again.manifest_checksum() == manifest_checksum(m)
    assert json.loads(text)["modalities"]["depth.png"] == {
        "dtype": "uint16",
        "kind": "depth",
        "shape": [32, 32],
        "quantisation": "1 mm, 0 = invalid",
        "classes": None,
        "ignore_index": None,
    }
    assert dataclasses.replace(m, args={"workers": 8}).manifest_checksum() == m.manifest_checksum()
    tampered = dataclasses.replace(m, shards=[dataclasses.replace(m.shards[0], sha256="0" * 64), *m.shards[1:]])
    assert tampered.manifest_checksum() != m.manifest_checksum()
    with pytest.raises(ValueError, match="total_samples"):
        ShardManifest.from_json(text.replace('"total_samples": 60', '"total_samples": 61'), location="x.json")


def test_shards_are_byte_deterministic_across_worker_counts(tmp_path):
    one = shard("embedded", "stereo", tmp_path / "one", "val", options=STEREO_VAL, samples_per_shard=16)
    two = shard("embedded", "stereo", tmp_path / "two", "val", options=STEREO_VAL, samples_per_shard=16, workers=2)
    assert [s.sha256 for s in one.shards] == [s.sha256 for s in two.shards]
    assert one.manifest_checksum() == two.manifest_checksum()


def test_rerun_skips_matching_shards_and_rewrites_damaged_ones(tmp_path):
    m = shard("embedded", "stereo", tmp_path, "val", options=STEREO_VAL, samples_per_shard=16)
    mtimes = {s.name: os.stat(tmp_path / s.name).st_mtime_ns for s in m.shards}
    damaged = tmp_path / m.shards[1].name
    damaged.write_bytes(damaged.read_bytes()[:1000])
    again = shard("embedded", "stereo", tmp_path, "val", options=STEREO_VAL, samples_per_shard=16)
    assert again.manifest_checksum() == m.manifest_checksum()
    for s in m.shards:
        changed = os.stat(tmp_path / s.name).st_mtime_ns != mtimes[s.name]
        assert changed == (s.name == m.shards[1].name), s.name
    # Different content-affecting options never reuse a shard.
    other = shard(
        "embedded", "stereo", tmp_path, "val", options={"patch": 32, "downscale": 1, "stride": 8}, samples_per_shard=16
    )
    assert other.manifest_checksum() != m.manifest_checksum()


def test_a_failed_job_publishes_nothing(raw_datasets, tmp_path):
    src = tmp_path / "tf"
    shutil.copytree(raw_datasets["tokenfusion"], src)
    (src / "rgb" / "000005.png").write_bytes(b"garbage")  # the last shard's only sample
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="000005.png: unreadable image"):
        shard("nyudv2", src, out, "train", samples_per_shard=2)
    assert (out / "train-0000-000000.tar").exists(), "earlier shards were written"
    assert not (out / "manifest-train.json").exists()
    with pytest.raises(FileNotFoundError, match="manifest-train.json"):
        load_manifest(str(out / "manifest-train.json"))
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")], "no staging files left behind"


def test_array_tasks_write_parts_and_merge_verifies_them(tmp_path):
    keys = [f"k{i:03d}" for i in range(60)]
    plans = [plan_shards(keys, "val", 8, t, 3) for t in range(3)]
    assert [[p.index for p in ps] for ps in plans] == [[0, 1], [2, 3, 4], [5, 6, 7]]
    assert sorted(k for ps in plans for p in ps for k in p.keys) == keys, "disjoint key ranges covering all"

    for t in range(3):
        m = shard(
            "embedded", "stereo", tmp_path, "val", options=STEREO_VAL, samples_per_shard=8, task_index=t, num_tasks=3
        )
        assert m.location.endswith(f"manifest-val.part-{t:04d}-of-0003.json")
    assert not (tmp_path / "manifest-val.json").exists(), "parts are not a committed split"
    merged = merge_split(str(tmp_path), "val")
    assert merged.total_samples == 60 and len(merged.shards) == 8
    assert merged.shards[2].name == "val-0001-000002.tar"
    single = shard("embedded", "stereo", tmp_path / "single", "val", options=STEREO_VAL, samples_per_shard=8)
    assert _keys(merged) == _keys(single)

    victim = tmp_path / merged.shards[3].name
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF  # one flipped bit-pattern inside the first member
    victim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="val-0001-000003.tar: bytes do not match"):
        merge_split(str(tmp_path), "val")
    (tmp_path / "manifest-val.part-0002-of-0003.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing partial manifests for tasks \[2\] of 3"):
        merge_split(str(tmp_path), "val")


def test_task_coordinates_from_flags_slurm_and_kubernetes():
    assert resolve_task(None, None, {}) == (0, 1)
    assert resolve_task(2, 4, {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "9"}) == (2, 4)
    slurm = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert resolve_task(None, None, slurm) == (2, 4)
    assert resolve_task(None, 5, {"JOB_COMPLETION_INDEX": "4"}) == (4, 5)
    with pytest.raises(ValueError, match="--num-tasks"):
        resolve_task(None, None, {"JOB_COMPLETION_INDEX": "1"})
    with pytest.raises(ValueError, match="outside"):
        resolve_task(3, 3, {})


def test_cli_shards_merges_and_reports_bad_input(raw_datasets, tmp_path):
    out = tmp_path / "cli"
    base = [
        "embedded",
        "--src",
        "stereo",
        "--split",
        "val",
        "--out",
        str(out),
        "--patch",
        "32",
        "--samples-per-shard",
        "16",
        "--quiet",
    ]
    for task in range(2):  # a SLURM array of 2 tasks, the second with 2 local workers
        env = {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "2"}
        r = run_cli(*base, "--workers", str(1 + task), env=env)
        assert r.returncode == 0, r.stderr
        assert f"manifest-val.part-{task:04d}-of-0002.json" in r.stdout
    r = run_cli("merge", str(out), "--split", "val")
    assert r.returncode == 0, r.stderr
    assert len(read_all(str(out / "manifest-val.json"))) == 60
    reference = shard("embedded", "stereo", tmp_path / "ref", "val", options=STEREO_VAL, samples_per_shard=16)
    assert r.stdout.strip().startswith(f"committed {out / 'manifest-val.json'}: 60 samples in 4 shards")
    assert _keys(load_manifest(str(out / "manifest-val.json"))) == _keys(reference)

    r = run_cli("nyudv2", "--src", str(raw_datasets["nyudv2_v5"]), "--out", str(tmp_path / "bad"), "--quiet")
    assert r.returncode == 1
    assert "nyu_depth_v2_labeled.mat: MATLAB v5.0 MAT-file, expected v7.3" in r.stderr
    assert "Traceback" not in r.stderr
