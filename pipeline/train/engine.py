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

from pipeline.config import Config, ConfigError


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


def param_groups(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only; with ``optim.new_lr_mult`` ≠ 1, the parameters outside the
    model's pretrained-able backbones (``model.backbone_parameter_names()``: MiT encoders, MiniLM) get
    ``lr · new_lr_mult`` (TokenFusion's ×10 for newly initialised parts), as two more groups."""
    mult = cfg.optim.new_lr_mult
    backbone = (
        set(model.backbone_parameter_names()) if mult != 1.0 and hasattr(model, "backbone_parameter_names") else set()
    )
    if mult != 1.0 and not any(p.requires_grad for n, p in model.named_parameters() if n in backbone):
        raise ConfigError(
            f"optim.new_lr_mult={mult:g}: this model has no trainable pretrained-able backbone (MiT "
            f"encoder, trainable MiniLM), so every part is new; set optim.lr instead and new_lr_mult=1"
        )
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            # Norm/ActNorm/gate vectors and biases are not weight-decayed (they set scales, not capacity).
            buckets.setdefault((p.ndim > 1, mult != 1.0 and name not in backbone), []).append(p)
    groups = []
    for new in (False, True) if mult != 1.0 else (False,):
        lr = cfg.optim.lr * (mult if new else 1.0)
        groups += [
            {"params": buckets.get((True, new), []), "weight_decay": cfg.optim.weight_decay, "lr": lr},
            {"params": buckets.get((False, new), []), "weight_decay": 0.0, "lr": lr},
        ]
    return groups if mult == 1.0 else [g for g in groups if g["params"]]


def build_engine(model: nn.Module, cfg: Config, world_size: int):
    """``deepspeed.initialize`` with AdamW and the warmup schedule; returns ``(engine, optimizer, scheduler)``."""
    import deepspeed  # heavy: optional DeepSpeed dependency (engine's helpers import without it)

    groups = param_groups(model, cfg)
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
