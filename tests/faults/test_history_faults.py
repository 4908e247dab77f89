"""History is never lost silently: fallback warnings, refusals naming what is missing, metrics set aside,
per-file checksums verified on resume and by jobs.consolidate, corrupt files named in one line."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from jobs.consolidate import main as consolidate_main
from jobs.evaluate import main as evaluate_main
from jobs.train import main as train_main
from pipeline.tracking import read_metrics

from .conftest import tiny

pytestmark = pytest.mark.timeout(180)


def _one_line(err: str, prefix: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert "Traceback" not in err and "weights_only" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def trained(shards: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    assert (
        train_main(tiny(shards, run, "train.max_steps=4", "checkpoint.every=2", "checkpoint.keep=3", "eval.every=2"))
        == 0
    )
    return run


def test_fallback_refusal_and_fresh_start_keep_history(trained: Path, shards: Path, caplog, capsys):
    ckpts = trained / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step00000004"
    state = json.loads((ckpts / "step00000004" / "state.json").read_text())
    assert set(state["files"]) == {"mp_rank_00_model_states.pt", "trainer-rank0.pt"}
    # latest names a missing tag: one warning naming both, then the run continues from the older one
    shutil.rmtree(ckpts / "step00000004")
    caplog.set_level(logging.WARNING)
    assert (
        train_main(
            tiny(shards, trained, "train.max_steps=5", "checkpoint.every=5", "eval.every=5", "checkpoint.resume=latest")
        )
        == 0
    )
    fallback = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert len(fallback) == 1 and "step00000004" in fallback[0] and "step00000002" in fallback[0], fallback
    assert [r["step"] for r in read_metrics(trained / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5]
    capsys.readouterr()

    # history (a latest pointer) but no complete checkpoint left: exit 2 naming it, nothing touched
    for tag in ckpts.glob("step*"):
        (tag / "COMPLETE").unlink()
    before = (trained / "metrics.jsonl").read_text()
    assert train_main(tiny(shards, trained, "train.max_steps=6", "checkpoint.resume=latest")) == 2
    _one_line(capsys.readouterr().err, "checkpoint error: ", "no complete checkpoint is left", "step00000005")
    assert (trained / "metrics.jsonl").read_text() == before

    # a deliberate fresh start in a run dir with history but no checkpoint: metrics.jsonl is set aside
    shutil.rmtree(ckpts)
    assert train_main(tiny(shards, trained, "train.max_steps=2", "eval.every=2", "checkpoint.every=2")) == 0
    assert (trained / "metrics.1.jsonl").read_text() == before
    assert [r["step"] for r in read_metrics(trained / "metrics.jsonl") if "loss" in r] == [1, 2]


def test_corrupt_checkpoint_and_weights_are_named_in_one_line(
    trained: Path, shards: Path, tmp_path: Path, capsys, monkeypatch
):
    ckpts = trained / "checkpoints"
    # jobs.evaluate without --out writes into the run, never the current directory
    monkeypatch.chdir(tmp_path)
    assert evaluate_main(["--checkpoint", str(trained), "--no-tracking", "--num-figures", "2"]) == 0
    assert (trained / "eval" / "val-step4.json").is_file() and (trained / "eval" / "val-step4_figures").is_dir()
    assert not (tmp_path / "metrics.json").exists()
    weights = tmp_path / "model.safetensors"
    assert consolidate_main([str(trained), "--out", str(weights)]) == 0
    capsys.readouterr()

    model_file = ckpts / "step00000004" / "mp_rank_00_model_states.pt"
    _flip(model_file)
    assert train_main(tiny(shards, trained, "train.max_steps=6", "checkpoint.resume=latest")) == 2
    _one_line(
        capsys.readouterr().err,
        "checkpoint error: ",
        str(model_file),
        "corrupt",
        "previous complete checkpoint is",
        "step00000002",
    )
    assert consolidate_main([str(trained), "--out", str(tmp_path / "x.safetensors")]) == 2
    _one_line(capsys.readouterr().err, "error: ", str(model_file), "corrupt")
    # a checkpoint without recorded checksums (older format): the unreadable file is still named
    trainer = ckpts / "step00000002" / "trainer-rank0.pt"
    state = json.loads((ckpts / "step00000002" / "state.json").read_text())
    state.pop("files")
    (ckpts / "step00000002" / "state.json").write_text(json.dumps(state))
    trainer.write_bytes(trainer.read_bytes()[:100])
    assert train_main(tiny(shards, trained, "train.max_steps=6", f"checkpoint.resume={ckpts / 'step00000002'}")) == 2
    _one_line(capsys.readouterr().err, "checkpoint error: ", str(trainer), "corrupt or truncated")

    # corrupt consolidated weights: training from them, evaluating them
    weights.write_bytes(weights.read_bytes()[:-64])
    assert train_main(tiny(shards, tmp_path / "new", f"model.init_weights={weights}")) == 2
    _one_line(capsys.readouterr().err, "checkpoint error: ", str(weights), "not a readable safetensors file")
    assert evaluate_main(["--checkpoint", str(weights), "--no-tracking"]) == 2
    _one_line(capsys.readouterr().err, "error: ", str(weights), "safetensors")
