"""Exact training epochs: every sample of an epoch trained once, at any world size, across resizes.

The epoch's order. Epoch ``e`` of a split of ``N`` samples is a fixed sequence of *positions* ``0..N-1``:
the shards in an order shuffled by ``(seed, e)``, and inside each shard its samples in windows of ``window``
stored samples, each window permuted by ``(seed, e, shard, window)``. A position names one stored sample,
the same on every rank and in every run with that seed; a worker materialises a window from one sequential
read of its shard (memory: one window of raw samples, like a shuffle buffer).

Rounds. The cursor (:class:`EpochCursor`, identical on every rank) holds the *pending* positions as
``(epoch, start, stop)`` intervals. A round splits the pending sequence, of length ``R``, over ``W`` ranks
of ``B`` samples per batch: ``T = R // (B·W)`` batches per rank, rank ``r`` taking the contiguous slice
``[r·T·B, (r+1)·T·B)``. The ``R − W·T·B < B·W`` positions left over are carried into the next round, ahead
of the next epoch's positions, so nothing is dropped (and a round that would hold fewer than ``B·W``
positions takes in the next epoch first). ``batches`` counts the batches each rank has delivered in the round.

Resizes (the elastic-resume rule). When the world size or batch size changes, the positions not yet
trained are exactly: for every old rank ``r``, ``[r·T·B + batches·B, (r+1)·T·B)``, plus the carried
remainder. They become the new pending sequence (in that order) and a new round starts at the new size, so
across any chain of resizes every position of every epoch is trained exactly once. A change of
``num_workers`` needs nothing: batch ``i`` of a rank's slice is always positions ``[i·B, (i+1)·B)``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

Interval = tuple[int, int, int]  # (epoch, start, stop): positions start..stop-1 of that epoch's order


def total(intervals: Sequence[Interval]) -> int:
    return sum(stop - start for _, start, stop in intervals)


def take(intervals: Sequence[Interval], a: int, b: int) -> list[Interval]:
    """Positions ``a..b-1`` of the sequence the intervals spell, as intervals."""
    out: list[Interval] = []
    offset = 0
    for epoch, start, stop in intervals:
        n = stop - start
        lo, hi = max(a, offset), min(b, offset + n)
        if lo < hi:
            out.append((epoch, start + lo - offset, start + hi - offset))
        offset += n
        if offset >= b:
            break
    return out


def merged(intervals: Sequence[Interval]) -> list[Interval]:
    """Adjacent intervals of one epoch joined (the cursor stays short across resizes)."""
    out: list[Interval] = []
    for epoch, start, stop in intervals:
        if stop <= start:
            continue
        if out and out[-1][0] == epoch and out[-1][2] == start:
            out[-1] = (epoch, out[-1][1], stop)
        else:
            out.append((epoch, start, stop))
    return out


@dataclass
class EpochCursor:
    """The global data cursor of exact epochs (see the module docstring); part of :class:`LoaderState`."""

    pending: list[Interval] = field(default_factory=list)
    world: int = 0  # the split the current round was made for
    batch_size: int = 0

    def steps(self) -> int:
        """Batches per rank in the current round."""
        return total(self.pending) // (self.batch_size * self.world) if self.world else 0

    def start(self, epoch: int, epoch_size: int, world: int, batch_size: int) -> None:
        """A fresh cursor at the start of ``epoch``."""
        self.pending, self.world, self.batch_size = [], world, batch_size
        self._fill(epoch - 1, epoch_size)

    def _fill(self, last_epoch: int, epoch_size: int) -> None:
        while total(self.pending) < self.batch_size * self.world:
            last_epoch += 1
            self.pending = merged([*self.pending, (last_epoch, 0, epoch_size)])

    @property
    def epoch(self) -> int:
        """The newest epoch the round reaches into."""
        return max(e for e, _, _ in self.pending)

    def next_round(self, epoch_size: int) -> None:
        """The round is done: carry its remainder ahead of the next epoch."""
        steps = self.steps()
        last = self.epoch
        self.pending = take(self.pending, steps * self.batch_size * self.world, total(self.pending))
        self.pending = merged([*self.pending, (last + 1, 0, epoch_size)])
        self._fill(last + 1, epoch_size)

    def slice_for(self, rank: int) -> list[Interval]:
        """Rank ``rank``'s positions of the current round."""
        span = self.steps() * self.batch_size
        return take(self.pending, rank * span, (rank + 1) * span)

    def resplit(self, consumed: int, world: int, batch_size: int, epoch_size: int) -> None:
        """Re-split what is left after ``consumed`` batches per rank over ``world`` ranks of ``batch_size``."""
        span = self.steps() * self.batch_size
        left: list[Interval] = []
        for r in range(self.world):
            left += take(self.pending, r * span + min(consumed, self.steps()) * self.batch_size, (r + 1) * span)
        left += take(self.pending, self.world * span, total(self.pending))
        self.pending, self.world, self.batch_size = merged(left), world, batch_size
        last = max((e for e, _, _ in self.pending), default=-1)
        self._fill(last, epoch_size)

    def state_dict(self) -> dict:
        return {"pending": [list(i) for i in self.pending], "world": self.world, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.pending = [(int(e), int(a), int(b)) for e, a, b in state["pending"]]
        self.world, self.batch_size = int(state["world"]), int(state["batch_size"])


# -- positions -> stored samples ---------------------------------------------------------------------------


def shard_order(seed: int, epoch: int, shards: int) -> list[int]:
    order = list(range(shards))
    random.Random(f"mango-epoch/{seed}/{epoch}").shuffle(order)
    return order


def window_order(seed: int, epoch: int, shard: int, window: int, n: int) -> list[int]:
    order = list(range(n))
    random.Random(f"mango-epoch/{seed}/{epoch}/{shard}/{window}").shuffle(order)
    return order


def locate(
    interval: Interval, seed: int, shard_samples: Sequence[int], window: int
) -> Iterator[tuple[int, int, int, int]]:
    """The stored samples an interval covers, in order: ``(shard index, window index, window start, window
    stop)`` blocks plus — via :func:`window_slots` — which stored samples of each window are wanted."""
    epoch, start, stop = interval
    offset = 0
    for shard in shard_order(seed, epoch, len(shard_samples)):
        n = shard_samples[shard]
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            first, last = (lo - offset) // window, (hi - offset - 1) // window
            for w in range(first, last + 1):
                a, b = max(lo - offset, w * window), min(hi - offset, (w + 1) * window)
                yield shard, w, a, b
        offset += n
        if offset >= stop:
            break


def window_slots(seed: int, epoch: int, shard: int, w: int, window: int, n: int, a: int, b: int) -> list[int]:
    """Stored indices (within the shard) for in-shard positions ``a..b-1`` that lie in window ``w``."""
    lo = w * window
    size = min(window, n - lo)
    perm = window_order(seed, epoch, shard, w, size)
    return [lo + perm[p - lo] for p in range(a, b)]
