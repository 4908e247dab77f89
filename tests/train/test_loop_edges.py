"""The train loop's contract at its edges: bad config fails before launch; a dead MLflow costs seconds."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from pipeline.tracking import read_metrics

from .conftest import TINY_TRAIN, free_port, run


def test_bad_config_key_or_type_fails_before_launch_naming_the_key(tmp_path: Path) -> None:
    r = run([sys.executable, "-m", "jobs.train", "optim.lrr=3e-4", f"run.dir={tmp_path}"])
    assert r.returncode == 2 and "optim.lrr" in r.stderr and "Traceback" not in r.stderr
    r = run([sys.executable, "-m", "jobs.train", "train.max_steps=ten", f"run.dir={tmp_path}"])
    assert r.returncode == 2 and "train.max_steps" in r.stderr
    assert not (tmp_path / "config.yaml").exists()  # nothing started


def test_the_demo_refuses_a_bad_override_in_one_line(tmp_path: Path, capsys) -> None:
    from jobs.demo import main as demo_main

    assert demo_main(["model.bogus=1", f"run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: unknown config key 'model.bogus'") and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir()), "nothing started"


def test_unreachable_tracking_server_costs_seconds_and_warns_once(tiny_shards: str, tmp_path: Path) -> None:
    common = [*TINY_TRAIN, f"data.shards={tiny_shards}", "train.max_steps=6", "eval.every=3", "checkpoint.every=100"]
    start = time.monotonic()
    r = run([sys.executable, "-m", "jobs.train", *common, f"run.dir={tmp_path / 'a'}", "tracking.enabled=false"])
    baseline = time.monotonic() - start
    assert r.returncode == 0, r.stderr[-3000:]
    start = time.monotonic()
    dead = f"http://127.0.0.1:{free_port()}"
    r = run(
        [
            sys.executable,
            "-m",
            "jobs.train",
            *common,
            f"run.dir={tmp_path / 'b'}",
            "tracking.enabled=true",
            f"tracking.uri={dead}",
            "tracking.timeout_s=2",
            "tracking.retries=1",
        ]
    )
    elapsed = time.monotonic() - start
    assert r.returncode == 0, r.stderr[-3000:]
    assert elapsed < baseline + 20, (baseline, elapsed)
    warnings = [line for line in r.stderr.splitlines() if "unreachable" in line.lower()]
    assert len(warnings) == 1, r.stderr[-3000:]
    # the run itself lost nothing: metrics.jsonl holds every step and the validations
    records = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [x["step"] for x in records if "loss" in x] == [1, 2, 3, 4, 5, 6]
    vals = [x for x in records if "val_bits_per_dim" in x]
    assert [x["step"] for x in vals] == [0, 3, 6]
    # the best eval.metric so far is logged beside every validation (eval.mode min)
    assert [x["best_val_bits_per_dim"] for x in vals] == [
        min(v["val_bits_per_dim"] for v in vals[: i + 1]) for i in range(len(vals))
    ]


def test_non_finite_losses_abort_after_k_in_a_row_with_a_clear_message(tiny_shards: str, tmp_path: Path) -> None:
    # (the flow stays finite even at absurd learning rates — gates, scales and q/k are bounded — so the fault
    # is injected: start from weights with a NaN in them)
    from safetensors.torch import save_file

    from pipeline.config import load_config
    from pipeline.data import load_manifest, manifest_name
    from pipeline.models import build_model, modality_specs

    overrides = [
        *TINY_TRAIN,
        f"data.shards={tiny_shards}",
        f"run.dir={tmp_path}",
        "train.max_steps=40",
        "eval.every=1000",
        "checkpoint.every=1000",
        "train.max_nonfinite=3",
    ]
    cfg = load_config(None, overrides)
    model = build_model(cfg, modality_specs(cfg, load_manifest(f"{tiny_shards}/{manifest_name('train')}")))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["flow.flows.0.blocks.0.layers.1.loc"][0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    r = run([sys.executable, "-m", "jobs.train", *overrides, f"model.init_weights={tmp_path / 'nan.safetensors'}"])
    assert r.returncode != 0
    assert "3 non-finite losses in a row (train.max_nonfinite=3)" in r.stderr, r.stderr[-3000:]
    assert r.stderr.count("micro-batch skipped") == 3


def test_watchdog_exits_3_when_no_step_completes_in_time() -> None:
    r = run(
        [
            sys.executable,
            "-c",
            "import time; from pipeline.train.loop import Watchdog; "
            "w = Watchdog(0.3); [w.beat() or time.sleep(0.05) for _ in range(10)]; time.sleep(30)",
        ],
        timeout=60,
    )
    assert r.returncode == 3, r.stderr[-2000:]
    assert "watchdog: no training step completed" in r.stdout


def test_resume_refuses_an_architecture_change_naming_the_key(tiny_shards: str, tmp_path: Path) -> None:
    common = [*TINY_TRAIN, f"data.shards={tiny_shards}", f"run.dir={tmp_path}", "eval.every=1000"]
    r = run([sys.executable, "-m", "jobs.train", *common, "train.max_steps=3", "checkpoint.every=3"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(
        [sys.executable, "-m", "jobs.train", *common, "train.max_steps=6", "checkpoint.resume=latest", "model.dim=8"]
    )
    assert r.returncode != 0 and "model.dim: the checkpoint was trained with 16 but the config says 8" in r.stderr
    # a key the old hand-kept list missed: the paper's block instead of ours would load into different parameters
    r = run(
        [
            sys.executable,
            "-m",
            "jobs.train",
            *common,
            "train.max_steps=6",
            "checkpoint.resume=latest",
            "model.channel_mix=false",
        ]
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "model.channel_mix: the checkpoint was trained with True but the config says False" in r.stderr


def test_every_architecture_field_is_checked_on_resume() -> None:
    # no key list here: the schema's arch flags are the list (tests/test_config.py checks every field has one)
    from dataclasses import fields

    from pipeline.config import ConfigError, ModelConfig, architecture_keys, load_config, to_dict
    from pipeline.train.loop import check_architecture

    cfg = load_config(None, [])
    saved = to_dict(cfg)
    for f in fields(ModelConfig):
        changed = {**saved, "model": {**saved["model"], f.name: ["something else"]}}
        if f.name in architecture_keys():
            with pytest.raises(ConfigError, match=f"^model.{f.name}: the checkpoint was trained with"):
                check_architecture(changed, cfg)
        else:
            check_architecture(changed, cfg)  # free to change between runs
    with pytest.raises(ConfigError, match="^optim.new_lr_mult: the checkpoint was trained with 1.0"):
        check_architecture(saved, load_config(None, ["optim.new_lr_mult=10"]))


def test_a_signal_whose_save_overruns_the_grace_time_still_exits_with_its_code() -> None:
    # the main thread is "stuck" (a step that never finishes): the grace timer must end the process
    code = (
        "import os, signal, time; from pipeline.train.signals import PreemptionWatch; "
        "w = PreemptionWatch(grace_s=0.5); os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)"
    )
    start = time.monotonic()
    r = run([sys.executable, "-c", code], timeout=60)
    assert r.returncode == 143 and time.monotonic() - start < 20
    assert "did not finish within checkpoint.grace_s=0.5s" in r.stdout


def test_a_fresh_run_refuses_a_run_dir_that_already_holds_checkpoints(tiny_shards: str, tmp_path: Path) -> None:
    common = [
        *TINY_TRAIN,
        f"data.shards={tiny_shards}",
        f"run.dir={tmp_path}",
        "eval.every=1000",
        "train.max_steps=2",
        "checkpoint.every=2",
    ]
    assert run([sys.executable, "-m", "jobs.train", *common]).returncode == 0
    r = run([sys.executable, "-m", "jobs.train", *common])
    assert r.returncode != 0 and "already holds checkpoints (newest step00000002)" in r.stderr
    assert "checkpoint.resume=latest" in r.stderr


def test_a_run_ends_the_process_group_it_started_and_keeps_one_it_was_given(tiny_shards: str, tmp_path: Path) -> None:
    # a group left to interpreter shutdown takes a finished gloo rank down with SIGABRT ("terminate called without
    # an active exception", seen on a 2-node run after its last step): the run destroys what it started ...
    import torch.distributed as tdist

    from pipeline.config import load_config
    from pipeline.train.loop import train_loop

    common = [
        *TINY_TRAIN,
        f"data.shards={tiny_shards}",
        "train.max_steps=2",
        "eval.every=1000",
        "checkpoint.every=1000",
    ]
    train_loop(load_config(None, [*common, f"run.dir={tmp_path / 'own'}"]))
    assert not tdist.is_initialized()
    # ... and leaves a group someone else started (Ray Train's) to its owner
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    train_loop(load_config(None, [*common, f"run.dir={tmp_path / 'given'}"]))
    assert tdist.is_initialized()
