"""The typed config: precedence, strict one-line errors naming the key, round trips, shipped configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch.distributed
import yaml

from pipeline.config import (
    Config,
    ConfigError,
    apply_overrides,
    flatten,
    from_dict,
    load_config,
    save_resolved,
    to_dict,
)

CONFIGS = Path(__file__).resolve().parents[1] / "launch" / "configs"


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def _error(config_path, overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(config_path, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_defaults_are_a_valid_config():
    cfg = load_config(None, [])
    assert cfg == from_dict({})
    assert cfg.run.dir == "runs/mango" and cfg.model.num_blocks == 12 and cfg.model.nll_weight == 0.01
    assert cfg.checkpoint.resume == "" and cfg.eval.metric == "val_bits_per_dim" and cfg.eval.mode == "min"


def test_precedence_defaults_then_yaml_then_overrides(tmp_path):
    path = _yaml(tmp_path, "run: {name: yrun}\noptim: {lr: 2.0e-3, warmup_steps: 7}\ntrain: {max_steps: 50}\n")
    cfg = load_config(path, ["optim.lr=3e-4", "data.modalities=[left,right]"])
    assert cfg.optim.lr == 3e-4  # override beats YAML
    assert cfg.optim.warmup_steps == 7  # YAML beats default
    assert cfg.optim.schedule == "cosine"  # default survives
    assert cfg.run.dir == "runs/yrun"  # the default interpolation follows the YAML's name
    assert cfg.data.modalities == ["left", "right"]
    assert load_config(path, ["run.name=cli"]).run.dir == "runs/cli"
    assert load_config(path, ["run.dir=/scratch/${run.name}"]).run.dir == "/scratch/yrun"


def test_empty_override_clears_a_string_and_later_overrides_win():
    cfg = load_config(
        CONFIGS / "mango_256.yaml",
        ["checkpoint.resume=", "train.max_steps=10", "train.max_steps=20", "optim.warmup_steps=5"],
    )
    assert cfg.checkpoint.resume == "" and cfg.train.max_steps == 20


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["optim.lrx=1"], "unknown config key 'optim.lrx' (from the command line); did you mean 'optim.lr'?"),
        (["nope.x=1"], "unknown config key 'nope'"),
        (["optim.lr=abc"], "optim.lr: expected a number (from the command line); got str 'abc'"),
        (["train.max_steps=1.5"], "train.max_steps: expected an integer"),
        (["train.max_steps=true"], "train.max_steps: expected an integer"),
        (["deepspeed.activation_checkpointing=2"], "deepspeed.activation_checkpointing: expected true or false"),
        (["run.name=null"], "run.name: expected a string"),
        (["data.modalities=rgb"], "data.modalities: expected a list of strings"),
        (["optim.betas=[0.9]"], "optim.betas: expected a list of 2 numbers"),
        (["optim=3"], "optim: expected a mapping"),
        (["model.partitions=x"], "model.partitions: unknown partition(s) ['x']"),
        (
            ["model.task=diffusion"],
            "model.task must be one of ['density', 'segmentation', 'translation', 'classification']; got 'diffusion'",
        ),
        (["model.memory=swap"], "model.memory must be one of"),
        (["model.encoder=resnet"], "model.encoder must be one of"),
        (["deepspeed.zero_stage=4"], "deepspeed.zero_stage must be ≤ 3; got 4"),
        (["optim.lr=0"], "optim.lr must be > 0.0; got 0.0"),
        (["optim.lr=.inf"], "optim.lr must be finite"),
        (["optim.betas=[0.9,1.0]"], "every entry of optim.betas must be < 1.0"),
        (["optim.ema=1.0"], "optim.ema must be < 1.0"),
        (["tracking.retries=11"], "tracking.retries must be ≤ 10"),
        (["checkpoint.remote=gs://b/x"], "checkpoint.remote must be empty or s3://"),
        (["data.shards=gs://b/x"], "data.shards must be a local directory or an s3:// URL"),
        (["data.modalities=[rgb,rgb]"], "data.modalities has duplicate entries"),
        (["data.modalities=[rgb,right,depth]"], "the density model takes 1 or 2 image modalities"),
        (["model.image_size=18"], "model.image_size must be divisible by model.patch_size·2^(model.levels−1)"),
        (["optim.warmup_steps=5000", "train.max_steps=100"], "optim.warmup_steps (5000) must not exceed"),
        (["run.name=a b"], "run.name must consist of letters, digits, '.', '_' or '-'; got 'a b'"),
        (["data.modalities=[RGB]"], "data.modalities: entry 'RGB' must consist of lowercase letters"),
        (["run.dir=${oc.env:MANGO_SURELY_UNSET}"], "run.dir:"),
        (["lr"], "override 'lr' is not of the form section.key=value"),
        (["=3"], "is not of the form"),
    ],
)
def test_bad_overrides_fail_with_one_line_naming_the_key(overrides, expected):
    assert expected in _error(None, overrides)


def test_bad_yaml_files_name_the_file_and_key(tmp_path):
    assert "(from " + str(tmp_path) in _error(_yaml(tmp_path, "model:\n  partitons: all\n"), [])
    assert "did you mean 'model.partitions'" in _error(_yaml(tmp_path, "model:\n  partitons: all\n"), [])
    assert "optim.lr: expected a number" in _error(_yaml(tmp_path, "optim:\n  lr: fast\n"), [])
    assert "not valid YAML" in _error(_yaml(tmp_path, "optim: [1, 2\n"), [])
    assert "top level must be a mapping" in _error(_yaml(tmp_path, "- 1\n- 2\n"), [])
    assert "top level must be a mapping" in _error(_yaml(tmp_path, "3\n"), [])
    assert "config file not found" in _error(tmp_path / "missing.yaml", [])
    assert load_config(_yaml(tmp_path, ""), []) == load_config(None, [])


def test_errors_come_before_any_process_group():
    _error(None, ["optim.lrx=1"])
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())


def test_round_trips_through_dict_yaml_and_flatten(tmp_path):
    cfg = load_config(CONFIGS / "demo.yaml", ["optim.betas=[0.8,0.95]"])
    assert from_dict(to_dict(cfg)) == cfg
    path = save_resolved(cfg, tmp_path / "run" / "config.yaml")
    text = path.read_text()
    assert "${" not in text  # resolved: the run directory is spelled out
    assert yaml.safe_load(text) == to_dict(cfg)
    assert load_config(path, []) == cfg
    flat = flatten(cfg)
    assert flat["optim.betas"] == "[0.8, 0.95]" and flat["data.modalities"] == '["rgb", "right"]'
    assert flat["deepspeed.activation_checkpointing"] == "False" and flat["run.dir"] == "runs/demo"
    n_fields = sum(len(dataclasses.fields(getattr(cfg, f.name))) for f in dataclasses.fields(Config))
    assert len(flat) == n_fields and all(isinstance(v, str) for v in flat.values())


def test_apply_overrides_for_sweep_trials():
    base = load_config(CONFIGS / "demo.yaml", [])
    trial = apply_overrides(base, {"optim.lr": 1e-4, "model.partitions": "mmca+imca", "optim.betas": (0.9, 0.95)})
    assert trial.optim.lr == 1e-4 and trial.model.partitions == "mmca+imca" and trial.optim.betas == (0.9, 0.95)
    assert base.optim.lr == 2e-3  # the base is not modified
    assert apply_overrides(base, ["train.max_steps=40"]).train.max_steps == 40
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        apply_overrides(base, {"optim.learning_rate": 1.0})


def test_from_dict_rejects_unknown_and_mistyped_entries():
    with pytest.raises(ConfigError, match="unknown config key 'model.depth'"):
        from_dict({"model": {"depth": 3}})
    with pytest.raises(ConfigError, match="a config must be a mapping"):
        from_dict(["run"])  # type: ignore[arg-type]


def test_shipped_configs():
    demo = load_config(CONFIGS / "demo.yaml", [])
    assert (demo.model.task, demo.model.image_size, demo.model.channels, demo.run.device) == ("density", 16, 3, "cpu")
    assert demo.train.max_steps <= 1000 and demo.deepspeed.precision == "fp32"
    big = load_config(CONFIGS / "mango_256.yaml", [])
    assert big.model.image_size == 256 and big.deepspeed.zero_stage == 2
    assert big.deepspeed.precision == "bf16" and big.deepspeed.activation_checkpointing


def test_every_model_field_declares_whether_it_fixes_the_architecture() -> None:
    # a new model.* key must say whether a resumed run may change it (arch=True: refused on resume)
    import dataclasses

    from pipeline.config import ModelConfig

    unmarked = [f.name for f in dataclasses.fields(ModelConfig) if "arch" not in f.metadata]
    assert not unmarked, f"model fields without arch=True/False in pipeline/config.py: {unmarked}"
