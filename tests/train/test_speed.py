"""Training reports its own speed: the metrics of ``pipeline.train.speed`` and the FLOP count behind them."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.flops import DtypeFlopCounter
from pipeline.flows import MangoFlow, data_init
from pipeline.models.density import build_density
from pipeline.tracking import read_metrics
from pipeline.train.speed import SpeedMeter, StepFlops, count_step_flops

from .conftest import TINY_TRAIN

SPEED_KEYS = ("step_time_s", "data_wait_s", "achieved_tflops", "peak_memory_gib")


def test_every_log_line_carries_the_speed_metrics_and_the_run_ends_with_a_summary(
    tiny_shards: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pipeline.train.loop import train_loop

    cfg = load_config(
        None,
        [
            *TINY_TRAIN,
            f"data.shards={tiny_shards}",
            "train.max_steps=4",
            "train.log_every=2",
            "eval.every=1000",
            "checkpoint.every=1000",
            f"run.dir={tmp_path}",
        ],
    )
    with caplog.at_level(logging.INFO, logger="pipeline.train"):
        last = train_loop(cfg)
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["step_time_s"] > 0 and r["achieved_tflops"] > 0 and r["peak_memory_gib"] > 0
        assert 0 <= r["data_wait_s"] < r["step_time_s"]
        assert "mfu" not in r  # CPU: no tensor-core peak to divide by
    assert all(k in last for k in SPEED_KEYS)
    text = caplog.text
    assert "plan: fp32 on cpu; ZeRO-0; memory store" in text  # the start-up line names the plan
    assert "model FLOPs of a forward + backward" in text
    assert "speed: 4 steps" in text  # one summary line at the end


def _density(memory: str):
    cfg = load_config(
        None,
        [
            "model.image_size=8",
            "model.levels=2",
            "model.blocks_per_level=1",
            "model.dim=16",
            "model.patch_size=2",
            "model.lica_group=0",
        ],
    )
    return build_density(cfg.model, ["left", "right"], [8, 8], memory=memory)


def test_the_flop_count_is_per_sample_without_recompute_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    batch = {
        "left": torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8),
        "right": torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8),
        "__key__": list("abcd"),
    }
    store = _density("store")
    with torch.no_grad():
        data_init(store, batch, mode="loss")
    with DtypeFlopCounter() as whole:
        store(batch, mode="loss")["loss"].backward()
    store.zero_grad(set_to_none=True)
    flops = count_step_flops(store, batch, contextlib.nullcontext, torch.device("cpu"))
    assert flops.at(4) == pytest.approx(whole.total, rel=1e-9)  # fixed + per sample, from batches 1 and 2
    assert flops.fixed > 0 and flops.bf16_share == 0.0  # the flows' operators; an fp32 run
    ckpt = _density("checkpoint")
    ckpt.load_state_dict(store.state_dict())
    rng = torch.get_rng_state()
    assert count_step_flops(ckpt, batch, contextlib.nullcontext, torch.device("cpu")) == flops  # no recompute
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random streams are untouched
    assert all(m.memory == "checkpoint" for m in ckpt.modules() if isinstance(m, MangoFlow))
    assert all(p.grad is None for p in ckpt.parameters())
    bf16 = count_step_flops(store, batch, lambda: torch.autocast("cpu", dtype=torch.bfloat16), torch.device("cpu"))
    assert bf16.bf16_share > 0.5  # the same model under bf16 autocast: most of its work in bf16


def test_the_meter_excludes_validation_time_and_divides_flops_by_step_time() -> None:
    import time

    meter = SpeedMeter(StepFlops(fixed=1e8, per_sample=1e9, bf16_share=0.0), device=torch.device("cpu"))
    for _ in range(2):
        meter.micro_batch(4)
        meter.step()
    with meter.excluded():
        time.sleep(0.2)
    values = meter.window()
    assert values["step_time_s"] < 0.1  # the excluded 0.2 s is not step time
    assert values["achieved_tflops"] == pytest.approx(8.2e9 / (2 * values["step_time_s"]) / 1e12, rel=1e-6)
    assert meter.summary().startswith("speed: 2 steps")
