"""Bad data is refused up front (one line, exit 2, before any process group) or skipped whole and counted."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from jobs.train import main as train_main
from pipeline import dist
from pipeline.data import build_eval_loader, build_train_loader, load_manifest
from pipeline.tracking import read_metrics

from .conftest import tiny

pytestmark = pytest.mark.timeout(120)


def _refused(capsys, argv: list[str], *needles: str) -> str:
    t0 = time.monotonic()
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("data error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not dist.is_initialized(), "refused before any process group started"
    assert time.monotonic() - t0 < 30
    return lines[0]


def test_missing_empty_unmanifested_and_too_small_data_is_refused_up_front(shards: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    _refused(capsys, tiny(tmp_path / "nowhere", run), "no such directory")
    (tmp_path / "empty").mkdir()
    _refused(capsys, tiny(tmp_path / "empty", run), "the directory is empty")
    os.unlink(shards / "manifest-val.json")
    _refused(capsys, tiny(shards, run), "no manifest-val.json", "'val'")
    (shards / "manifest-val.json").write_text("{not json")
    _refused(capsys, tiny(shards, run), "manifest-val.json is unusable")
    os.unlink(shards / "manifest-val.json")
    _refused(
        capsys,
        tiny(shards, run, "data.val_split=train", "data.batch_size=500"),
        "fewer than one batch",
        "data.batch_size=500",
    )
    assert not run.exists(), "nothing was written for a refused run"


def _truncate(shard: Path) -> None:
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])


def test_truncated_shard_stops_the_run_above_max_bad_fraction(shards: Path, tmp_path: Path, capsys):
    first = min(shards.glob("train-*.tar"))
    _truncate(first)
    line = _refused(
        capsys,
        tiny(shards, tmp_path / "run", "data.max_bad_fraction=0"),
        first.name,
        "manifest says",
        "data.max_bad_fraction=0",
    )
    assert "24 of 224 samples" in line


def test_truncated_shard_is_skipped_whole_logged_once_and_counted(shards: Path, tmp_path: Path, caplog):
    first = min(shards.glob("train-*.tar"))
    _truncate(first)
    run = tmp_path / "run"
    assert (
        train_main(
            tiny(shards, run, "data.max_bad_fraction=0.2", "train.max_steps=3", "eval.every=3", "checkpoint.every=3")
        )
        == 0
    )
    warnings = [r.getMessage() for r in caplog.records if first.name in r.getMessage()]
    assert len(warnings) == 1 and "skipped" in warnings[0], warnings
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "data_bad_shards" in r]
    assert rows and rows[-1]["data_bad_shards"] == 1 and abs(rows[-1]["data_bad_fraction"] - 24 / 224) < 1e-9


def _samples(shard: Path) -> list[dict]:
    import tarfile

    with tarfile.open(shard) as t:
        keys = sorted({m.name.split(".")[0] for m in t.getmembers()})
    return [{"__key__": k} for k in keys]


def test_sha256_catches_a_same_size_corruption_and_skips_the_shard_whole(shards: Path):
    manifest = load_manifest(str(shards / "manifest-train.json"))
    victim = Path(manifest.shard_urls()[1])
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0xFF  # same size: only the checksum can tell
    victim.write_bytes(bytes(data))
    victim_keys = {s["__key__"] for s in _samples(victim)}
    size_only = build_train_loader(manifest, 8, rank=0, world_size=1, num_workers=0, seed=1, verify="size")
    assert not size_only.bad_shards
    loader = build_train_loader(manifest, 8, rank=0, world_size=1, num_workers=0, seed=1, verify="sha256")
    seen = {k for b in loader for k in b["__key__"]}
    assert str(victim) in loader.bad_shards and loader.bad_samples() == manifest.shards[1].samples
    assert not seen & victim_keys, "no sample of the bad shard was used"
    exact = build_eval_loader(manifest, 8, rank=0, world_size=1, num_workers=2, verify="sha256")
    keys = {k for b in exact for k, ok in zip(b["__key__"], b["__valid__"].tolist()) if ok}
    assert len(keys) == manifest.total_samples - manifest.shards[1].samples and not keys & victim_keys
    assert exact.bad_shards == {str(victim)}


def test_a_bad_shard_found_while_reading_is_counted_and_stops_the_run_above_the_bound(
    shards: Path, tmp_path: Path, capsys
):
    val = load_manifest(str(shards / "manifest-val.json"))
    victim = Path(val.shard_urls()[0])  # 3 of the 7 val samples; same size, so only sha256 can tell
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    run = tmp_path / "run"
    common = ["data.verify=sha256", "train.max_steps=2", "eval.every=2", "checkpoint.every=2"]
    assert train_main(tiny(shards, run, *common, "data.max_bad_fraction=0.5")) == 0
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "val_samples" in r]
    assert [r["val_samples"] for r in rows] == [4.0, 4.0], "the bad shard's samples were not used"
    assert all(r["data_bad_shards"] == 1 and abs(r["data_bad_fraction"] - 3 / 7) < 1e-9 for r in rows), rows
    capsys.readouterr()
    assert train_main(tiny(shards, tmp_path / "run2", *common, "data.max_bad_fraction=0.2")) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("data error: ")]
    assert len(lines) == 1 and "42.9% of 'val'" in lines[0] and "data.max_bad_fraction=0.2" in lines[0], err[-2000:]
