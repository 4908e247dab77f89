"""Exact training epochs (pipeline.data.epochs): each sample of an epoch once, across resizes, damage and resume."""

from __future__ import annotations

import random
import shutil
from collections import Counter
from pathlib import Path

import pytest

from pipeline.data import LoaderState, build_eval_loader, build_train_loader, load_manifest
from pipeline.data.epochs import EpochCursor, take, total


def _positions(intervals) -> list[tuple[int, int]]:
    return [(e, p) for e, a, b in intervals for p in range(a, b)]


@pytest.mark.parametrize("seed", range(6))
def test_cursor_conserves_every_position_across_random_resizes(seed: int) -> None:
    """Consumed + still pending = each position of each started epoch exactly once, whatever the resizes."""
    rng = random.Random(seed)
    n = rng.randrange(40, 200)
    c = EpochCursor()
    c.start(0, n, world=rng.randrange(1, 5), batch_size=rng.randrange(1, 9))
    consumed: list[tuple[int, int]] = []
    for _ in range(12):
        steps = c.steps()
        k = rng.randrange(0, steps + 1)
        span = steps * c.batch_size
        for r in range(c.world):  # every rank trains its first k batches, in lockstep
            consumed += _positions(take(c.pending, r * span, r * span + k * c.batch_size))
        if k == steps:
            c.next_round(n)
        else:  # a requeue at another world / batch size
            c.resplit(k, rng.randrange(1, 5), rng.randrange(1, 9), n)
        assert total(c.pending) >= c.world * c.batch_size and c.steps() >= 1
    pending = _positions(c.pending)
    assert len(consumed) == len(set(consumed)), "a position was trained twice"
    assert not set(consumed) & set(pending), "a trained position is still pending"
    newest = max(e for e, _ in consumed + pending)
    assert sorted(consumed + pending) == [(e, p) for e in range(newest + 1) for p in range(n)], "a position was lost"


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["__key__"]]


def _take(loader, k: int) -> list[dict]:
    out = []
    for b in loader:
        out.append(b)
        if len(out) == k:
            break
    return out


@pytest.mark.timeout(120)
def test_an_epoch_is_every_sample_once_through_a_resize_a_batch_change_and_new_workers(stereo_shards: Path) -> None:
    manifest = load_manifest(str(stereo_shards / "manifest-train.json"))
    n = manifest.total_samples  # 224 in 14 shards of 16

    def loaders(world, batch, workers, state):
        return [
            build_train_loader(
                manifest, batch, rank=r, world_size=world, num_workers=workers, state=state[r], shuffle_buffer=8
            )
            for r in range(world)
        ]

    def carry(state, world):
        saved = state[0].state_dict()
        assert all(s.state_dict() == saved for s in state), "the cursor is global: identical on every rank"
        new = [LoaderState() for _ in range(world)]
        for s in new:
            s.load_state_dict(saved)
        return new

    seen: list[str] = []
    state = [LoaderState(seed=5) for _ in range(2)]
    for loader in loaders(2, 6, 2, state):  # 2 ranks × 2 workers, batches of 6: 3 batches each
        batches = _take(loader, 3)
        assert all(len(b["__key__"]) == 6 for b in batches)
        seen += _keys(batches)
    state = carry(state, 3)
    for loader in loaders(3, 4, 0, state):  # 3 ranks, no workers, batches of 4: 5 batches each
        seen += _keys(_take(loader, 5))
    state = carry(state, 1)
    (last,) = loaders(1, 7, 1, state)  # the rest of the round on 1 rank with batches of 7: 128 = 18·7 + 2
    rest = list(last)
    seen += _keys(rest)
    counts = Counter(seen)
    assert max(counts.values()) == 1, "a sample was trained twice within the epoch"
    carried = n - len(seen)
    assert carried == 2, "at most one batch's worth is carried into the next round"
    everything = set(_keys(build_eval_loader(manifest, 32, rank=0, world_size=1, num_workers=0)))
    nxt = _keys(_take(last, 1))  # the next round begins with the carried samples, then epoch 1
    assert set(seen) | set(nxt[:carried]) == everything and not set(nxt[:carried]) & set(seen)
    assert last.state.epoch == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_restored_cursor_yields_the_batches_the_run_would_have(stereo_shards: Path, num_workers: int) -> None:
    manifest = load_manifest(str(stereo_shards / "manifest-train.json"))

    def build(state):
        return build_train_loader(manifest, 6, rank=1, world_size=2, num_workers=num_workers, state=state)

    reference = build(LoaderState(seed=3))
    ref = [b["__key__"] for _ in range(2) for b in reference]  # two rounds
    first = build(LoaderState(seed=3))
    got = [b["__key__"] for b in _take(first, 7)]
    restored = LoaderState()
    restored.load_state_dict(first.state.state_dict())
    again = build(restored)
    got += [b["__key__"] for b in again] + [b["__key__"] for b in again]
    assert got == ref
    assert ref[: len(ref) // 2] != ref[len(ref) // 2 :], "every epoch has its own order"
    assert [b["__key__"] for b in build(LoaderState(seed=4))] != ref[: len(ref) // 2]


@pytest.mark.timeout(120)
def test_damaged_samples_keep_every_rank_at_full_batches_and_are_counted(stereo_shards: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(stereo_shards, shards)
    manifest = load_manifest(str(shards / "manifest-train.json"))
    victim = Path(manifest.shard_urls()[3])
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated in transit
    lens, keys, skipped = [], [], 0
    for rank in range(2):
        loader = build_train_loader(manifest, 8, rank=rank, world_size=2, num_workers=0, verify="off")
        batches = list(loader)
        lens.append(len(batches))
        assert all(len(b["__key__"]) == 8 for b in batches)
        keys += _keys(batches)
        skipped += loader.skipped_samples
    assert lens[0] == lens[1] == manifest.total_samples // 16, "damage never changes the step count"
    assert skipped >= 5, "the samples past the truncation are counted"
    repeats = sum(v - 1 for v in Counter(keys).values())
    assert repeats == skipped, "each damaged slot is filled by one repeat"
    verified = build_train_loader(manifest, 8, rank=0, world_size=2, num_workers=0, verify="size")
    assert len(list(verified)) == lens[0] and verified.bad_shards == {str(victim)}


def test_exact_epochs_need_a_manifest_and_reject_epoch_batches(stereo_shards: Path) -> None:
    manifest = load_manifest(str(stereo_shards / "manifest-train.json"))
    with pytest.raises(ValueError, match="exact epochs need each shard's sample count"):
        build_train_loader(manifest.shard_urls(), 8, rank=0, world_size=1, num_workers=0, sampling="exact")
    with pytest.raises(ValueError, match="epoch_batches applies to resampled streams"):
        build_train_loader(manifest, 8, rank=0, world_size=1, num_workers=0, sampling="exact", epoch_batches=3)
    with pytest.raises(ValueError, match="sampling must be"):
        build_train_loader(manifest, 8, rank=0, world_size=1, num_workers=0, sampling="shuffle")
