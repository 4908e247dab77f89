"""The trainer's state between steps: exactly what a checkpoint saves and a resume restores.

Shared (identical on every rank, in the checkpoint's client state and ``state.json``): ``step``,
``skipped_steps``, ``best`` (the best ``eval.metric`` value so far, per ``eval.mode``). Per rank
(``trainer-rank<r>.pt``): the data cursor (:class:`~pipeline.data.loader.LoaderState`: epoch, batches, seed and
the exact-epoch cursor), the RNG states (added by :func:`pipeline.train.checkpoint.save`), and on rank 0 the EMA
weights. The model, optimizer and LR schedule live in the DeepSpeed engine and its checkpoint files.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.data.loader import LoaderState
from pipeline.train.ema import WeightEMA


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The per-rank RNG stream (dequantisation noise) from (seed, rank, step): a fresh run starts it at step 0;
    a resize re-derives it at the resumed step (a same-size resume restores the saved RNG states instead)."""
    return seed * 1000 + rank + 1 + 7919 * step


@dataclass
class TrainState:
    """Where a run is. ``nonfinite`` (non-finite losses in a row) is not saved: a resumed run starts at 0."""

    loader: LoaderState
    ema: WeightEMA | None = None
    step: int = 0
    skipped_steps: int = 0
    best: float | None = None
    nonfinite: int = 0
    last: dict[str, Any] = field(default_factory=dict)  # the newest logged / validated metrics (returned)

    def shared(self) -> dict[str, Any]:
        """The part every rank holds alike (checkpoint client state)."""
        return {"step": self.step, "skipped_steps": self.skipped_steps, "best": self.best}

    def per_rank(self, rank0: bool) -> dict[str, Any]:
        """This rank's part; the EMA is identical on every rank under ZeRO ≤ 2, so rank 0's copy is stored."""
        out: dict[str, Any] = {"loader": self.loader.state_dict()}
        if self.ema is not None and rank0:
            out["ema"] = self.ema.state_dict()
        return out

    def restore_shared(self, client: dict[str, Any]) -> None:
        self.step = int(client["step"])
        self.skipped_steps = int(client.get("skipped_steps", 0))
        best = client.get("best")
        self.best = None if best is None else float(best)

    def note_validation(self, value: float | None, mode: str) -> None:
        """Keep the best validation value of ``eval.metric`` (``mode`` min or max); non-finite values never win."""
        if value is None or not math.isfinite(value):
            return
        if self.best is None or (value < self.best if mode == "min" else value > self.best):
            self.best = value
