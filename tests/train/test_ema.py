"""EMA of the weights: the update rule, exact swap-in/out, and a training run that validates, saves and
consolidates the EMA weights beside the trained ones."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import ConfigError, load_config
from pipeline.tracking import read_metrics
from pipeline.train.consolidate import consolidate, ema_path, load_model
from pipeline.train.ema import WeightEMA

from .conftest import TINY_TRAIN, run


def test_update_rule_and_exact_swap() -> None:
    net = torch.nn.Linear(3, 2)
    ema = WeightEMA(net, decay=0.9)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    torch.testing.assert_close(ema.shadow["weight"], start["weight"] + 0.1)
    torch.testing.assert_close(ema.shadow["bias"], start["bias"])
    trained = net.weight.detach().clone()
    with ema.swapped_in(net):
        torch.testing.assert_close(net.weight, start["weight"] + 0.1)
    assert torch.equal(net.weight, trained)


def test_ema_with_zero3_is_refused_before_launch() -> None:
    with pytest.raises(ConfigError, match="optim.ema.*ZeRO-3"):
        load_config(None, ["optim.ema=0.99", "deepspeed.zero_stage=3"])


def test_training_validates_saves_and_consolidates_ema(tiny_shards: str, tmp_path: Path) -> None:
    r = run(
        [
            sys.executable,
            "-m",
            "jobs.train",
            *TINY_TRAIN,
            f"data.shards={tiny_shards}",
            f"run.dir={tmp_path}",
            "train.max_steps=6",
            "eval.every=3",
            "checkpoint.every=3",
            "optim.ema=0.5",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    vals = [x for x in read_metrics(tmp_path / "metrics.jsonl") if "val_bits_per_dim" in x]
    assert all("val_ema_bits_per_dim" in x for x in vals) and len(vals) == 3
    weights = consolidate(tmp_path, tmp_path / "model.safetensors")
    plain, ema = load_file(str(weights)), load_file(str(ema_path(weights)))
    assert plain.keys() == ema.keys()
    differs = [k for k in plain if plain[k].is_floating_point() and not torch.equal(plain[k], ema[k])]
    assert differs, "EMA weights equal the trained weights after 6 steps at decay 0.5"
    assert all(torch.equal(plain[k], ema[k]) for k in plain if k.endswith(("initialized", "gather_in", "gather_out")))
    model, _ = load_model(ema_path(weights))  # loads like the trained weights
    assert sum(p.numel() for p in model.parameters()) > 0
