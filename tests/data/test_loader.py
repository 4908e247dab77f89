"""The loader on one rank: decoded layouts, resume reproducibility, corruption handling, clear errors."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from pipeline.data import LoaderState, build_eval_loader, build_train_loader, load_manifest


def _manifest(folder: Path) -> str:
    return str(folder / "manifest-train.json")


def test_decoded_batches_keep_dtypes_through_workers(stereo_shards):
    loader = build_train_loader(_manifest(stereo_shards), 8, rank=0, world_size=1, num_workers=2, epoch_batches=4)
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    b = batches[0]
    assert b["rgb.png"].dtype == torch.uint8 and b["rgb.png"].shape == (8, 3, 16, 16)
    assert b["depth.png"].dtype == torch.uint16 and b["depth.png"].shape == (8, 1, 16, 16)
    assert len(b["__key__"]) == 8 and isinstance(b["json"][0], dict)
    assert not any(k.startswith("__") and k != "__key__" for k in b)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(build_eval_loader(_manifest(stereo_shards), 8, rank=0, world_size=1, num_workers=2))
    assert torch.equal(torch.rand(3), expected), "iterating a loader leaves the global torch RNG alone"
    default = build_train_loader(_manifest(stereo_shards), 8, rank=0, world_size=2, num_workers=0)
    assert len(default) == 224 // (8 * 2), "epoch size comes from the manifest"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restoring_state_reproduces_the_next_batches(stereo_shards, num_workers):
    def build(state):
        return build_train_loader(
            _manifest(stereo_shards), 6, rank=1, world_size=2, num_workers=num_workers, epoch_batches=9, state=state
        )

    reference = build(LoaderState(seed=7))
    ref = [b["__key__"] for _ in range(2) for b in reference]  # two epochs
    assert reference.state.state_dict() == {"epoch": 2, "batches": 0, "seed": 7}
    assert ref[:9] != ref[9:], "every epoch draws a new stream"

    first = build(LoaderState(seed=7))
    got = []
    for i, b in enumerate(first):
        got.append(b["__key__"])
        if i == 4:
            break
    saved = first.state.state_dict()
    assert saved == {"epoch": 0, "batches": 5, "seed": 7}

    restored = LoaderState()
    restored.load_state_dict(saved)
    resumed = build(restored)
    got += [b["__key__"] for b in resumed] + [b["__key__"] for b in resumed]
    assert got == ref
    other_seed = [b["__key__"] for b in build(LoaderState(seed=8))]
    assert other_seed != ref[:9]


def _rewrite(path: Path, change) -> None:
    """Rebuild a tar member by member; ``change(name, data)`` returns new bytes or None to drop it."""
    with tarfile.open(path) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(path, "w") as dst:
        for m, data in members:
            data = change(m.name, data)
            if data is not None:
                m.size = len(data)
                dst.addfile(m, io.BytesIO(data))


def _intact_keys(path: Path, cut: int) -> set[str]:
    """Keys whose every member lies before byte ``cut`` of the tar."""
    whole, broken = set(), set()
    with tarfile.open(path) as t:
        for m in t.getmembers():
            key = m.name.split(".")[0]
            (whole if m.offset_data + m.size <= cut else broken).add(key)
    return whole - broken


@pytest.fixture
def corrupted(stereo_shards, tmp_path):
    """A copy of the stereo shards with four kinds of damage; returns (manifest url, keys still readable)."""
    shutil.copytree(stereo_shards, tmp_path / "s")
    folder = tmp_path / "s"
    manifest = load_manifest(_manifest(folder))
    names = [s.name for s in manifest.shards]
    all_keys = {
        k
        for b in build_eval_loader(manifest, 64, rank=0, world_size=1, num_workers=0, decode=None)
        for k in b["__key__"]
    }

    truncated = folder / names[0]
    with tarfile.open(truncated) as t:
        member = t.getmembers()[20]
    cut = member.offset_data + member.size // 2  # mid-member: tarfile reports it (a cut on a block
    # boundary would look like a clean end, leaving only an incomplete last sample, counted as skipped)
    lost = {k for k in all_keys if k in _shard_keys(stereo_shards / names[0])} - _intact_keys(truncated, cut)
    truncated.write_bytes(truncated.read_bytes()[:cut])

    victims = sorted(_shard_keys(folder / names[1]))
    _rewrite(folder / names[1], lambda n, d: None if n == f"{victims[2]}.depth.png" else d)  # missing modality
    bad_png = sorted(_shard_keys(folder / names[2]))[5]
    _rewrite(folder / names[2], lambda n, d: b"\x89PNG garbage" if n == f"{bad_png}.rgb.png" else d)
    garbage = folder / names[3]
    lost |= _shard_keys(garbage) | {victims[2], bad_png}
    garbage.write_bytes(b"this is not a tar file" * 100)
    return _manifest(folder), all_keys - lost


def _shard_keys(path: Path) -> set[str]:
    with tarfile.open(path) as t:
        return {m.name.split(".")[0] for m in t.getmembers()}


@pytest.mark.timeout(60)
def test_corrupt_shards_and_samples_are_skipped_and_counted(corrupted):
    url, readable = corrupted
    loader = build_eval_loader(url, 8, rank=0, world_size=1, num_workers=2)
    keys = [k for b in loader for k, ok in zip(b["__key__"], b["__valid__"]) if ok]
    assert len(keys) == len(set(keys)) and set(keys) == readable
    assert loader.shard_errors == 2  # the truncated tar and the non-tar
    assert loader.skipped_samples >= 2  # missing depth, undecodable rgb (+ the truncated tail sample)

    train = build_train_loader(url, 8, rank=0, world_size=1, num_workers=2, epoch_batches=30)
    batches = list(train)
    assert len(batches) == 30 and all(len(b["__key__"]) == 8 for b in batches), "step count never changes"
    assert {k for b in batches for k in b["__key__"]} <= readable
    assert train.skipped_samples > 0 and train.shard_errors > 0


@pytest.mark.timeout(60)
def test_unreadable_shard_set_fails_instead_of_spinning(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar" * 10)
    loader = build_train_loader([str(bad)], 4, rank=0, world_size=1, num_workers=0, epoch_batches=2)
    with pytest.raises(RuntimeError, match="shards in a row without a usable sample"):
        list(loader)


def test_exact_pass_is_complete_and_errors_are_clear(stereo_shards):
    manifest = load_manifest(_manifest(stereo_shards))
    loader = build_eval_loader(manifest, 10, rank=0, world_size=1, num_workers=2)
    batches = list(loader)
    assert len(batches) == len(loader)
    assert sum(int(b["__valid__"].sum()) for b in batches) == manifest.total_samples == 224
    # fewer shards than ranks x workers is fine: a rank or worker without a shard only pads
    assert len(build_eval_loader(manifest, 10, rank=3, world_size=4, num_workers=4)) >= 1
    with pytest.raises(ValueError, match="epoch_batches is required"):
        build_train_loader(manifest.shard_urls(), 10, rank=0, world_size=1, num_workers=0)
    with pytest.raises(FileNotFoundError, match="manifest-val.json"):
        build_eval_loader(str(stereo_shards / "manifest-val.json"), 10, rank=0, world_size=1, num_workers=0)
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        next(iter(build_eval_loader(manifest, 10, rank=0, world_size=2, num_workers=0)))
