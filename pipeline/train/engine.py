"""DeepSpeed engine construction from the typed config.

The DeepSpeed config is built in Python from :class:`pipeline.config.Config` (no JSON files to drift).
Mixed precision is *not* DeepSpeed's ``bf16.enabled`` — that casts every parameter and buffer (LU
factors, ActNorm state) to bf16 — but ``torch.autocast`` around the forward (see :func:`autocast`), with
the flow's sensitive ops pinned to fp32 inside the layers.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from pipeline.config import Config


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``cfg`` at ``world_size`` ranks."""
    zero: dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.zero_stage == 3:
        # Small flows: gather every parameter for each forward rather than prefetch-tuning; and collect
        # full weights on save so a checkpoint can be consolidated without the optimizer shards.
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": False})
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        # ZeRO with a plain torch optimizer (AdamW) is refused unless allowed explicitly.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def lr_multiplier(cfg: Config):
    """Step → LR multiplier: linear warmup, then cosine / linear decay to ``min_lr_ratio`` (or constant)."""
    warm, total, floor = cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio
    kind = cfg.optim.schedule

    def fn(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total - warm))
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if kind == "cosine" else 1.0 - frac
        return floor + (1 - floor) * decay

    return fn


def build_engine(model: nn.Module, cfg: Config, world_size: int):
    """``deepspeed.initialize`` with AdamW and the warmup schedule; returns ``(engine, optimizer, scheduler)``."""
    import deepspeed

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # Norm/ActNorm/gate vectors and biases are not weight-decayed (they set scales, not capacity).
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world_size)
    )
    return engine, optimizer, scheduler


def autocast(cfg: Config, device: torch.device):
    """The forward's precision context: bf16 autocast when ``deepspeed.precision=bf16``."""
    if cfg.deepspeed.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
