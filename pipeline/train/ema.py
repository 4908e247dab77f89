"""Exponential moving average of the weights, evaluated and saved beside the trained weights.

``shadow ← decay · shadow + (1 − decay) · θ`` after every optimizer step, in fp32, over the trainable
parameters (buffers are not averaged: ActNorm's ``initialized`` flag and LICA's permutations are fixed).
Under ZeRO 0–2 every rank holds the full, identical parameters after a step, so every rank keeps the same
shadow and rank 0's copy is what a checkpoint stores; ZeRO-3 partitions the parameters, which this class
does not support (the config refuses ``optim.ema`` with ``deepspeed.zero_stage=3``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class WeightEMA:
    """EMA of ``module``'s trainable parameters (see the module docstring)."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"WeightEMA: decay must be in (0, 1); got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for name, p in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ValueError(
                f"WeightEMA: checkpoint EMA keys differ from the model's "
                f"(missing {sorted(set(self.shadow) - set(state))[:3]}, "
                f"unexpected {sorted(set(state) - set(self.shadow))[:3]})"
            )
        for n, t in state.items():
            self.shadow[n].copy_(t)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self, module: nn.Module) -> Iterator[None]:
        """Temporarily load the EMA weights into ``module`` (e.g. to validate them); restored exactly after."""
        params = dict(module.named_parameters())
        backup = {n: params[n].detach().clone() for n in self.shadow}
        for n, t in self.shadow.items():
            params[n].copy_(t.to(params[n].dtype))
        try:
            yield
        finally:
            for n, t in backup.items():
                params[n].copy_(t)
