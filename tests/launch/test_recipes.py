"""The paper recipes against their declared protocols (``launch/protocols.yaml``), and each run end to end.

- every field of every paper recipe is traced to a source in its header (``[paper]``, ``[TokenFusion]``, …);
- an ablation recipe differs from its base recipe in exactly the fields its header lists; the ablation sweeps
  for Tables 4, 5 and 7 load against the NYUDv2 recipe and each swept key is traced;
- the rendered recipe matches its protocol: splits and the files that define them, crop and evaluation
  resolution, learning-rate groups (checked on the built model's AdamW groups), metric names (checked on
  what the metrics code returns), model selection;
- each recipe (and one arm of each ablation) trains two steps, validates and reports the protocol's metric
  names on a tiny fixture in its dataset's real file format, sharded by the real source. Translation's
  FID/KID without Inception weights come out as ``*_proxy`` with a warning in the log.

Budget: one module-scoped sharding of the four fixtures, then eight tiny runs in this process (~1-2 min on
one core).
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import metrics
from pipeline.config import apply_overrides, load_config, to_dict
from pipeline.tune.space import load_space

from ..data import make_fixtures

REPO = Path(__file__).resolve().parents[2]
CONFIGS, SWEEPS = REPO / "launch" / "configs", REPO / "launch" / "sweeps"
PROTOCOLS = yaml.safe_load((REPO / "launch" / "protocols.yaml").read_text())
PAPER = ("nyudv2", "sunrgbd", "taskonomy", "mmimdb")
TAGS = ("paper", "MANGO code", "TokenFusion", "MM-IMDB", "ours", "unverified")
TRACE = re.compile(r"^#\s{2,}([a-z_]+\.[a-z_0-9]+)\s+(.*)$")
ABLATIONS = {  # table → (file, base recipe)
    4: (SWEEPS / "nyudv2_table4_flow_layer.yaml", "nyudv2"),
    5: (SWEEPS / "nyudv2_table5_partitions.yaml", "nyudv2"),
    6: (CONFIGS / "nyudv2_table6_no_latent.yaml", "nyudv2"),
    7: (SWEEPS / "nyudv2_table7_blocks.yaml", "nyudv2"),
}


def leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        out |= leaves(v, key) if isinstance(v, dict) else {key: v}
    return out


def traced(path: Path) -> dict[str, str]:
    """dotted key → the first source tag of its header line."""
    out = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = TRACE.match(line)
        if m:
            assert m[1] not in out, f"{path.name}: {m[1]} is traced twice"
            tags = [t for t in re.findall(r"\[([^\]]+)\]", m[2]) if re.split(r"[:;]", t)[0].strip() in TAGS]
            out[m[1]] = tags[0] if tags else ""
    return out


# -- headers -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PAPER)
def test_every_field_of_a_paper_recipe_is_traced_to_a_source(name: str) -> None:
    path = CONFIGS / f"{name}.yaml"
    fields = leaves(yaml.safe_load(path.read_text()))
    trace = traced(path)
    assert sorted(set(fields) - set(trace)) == [], f"{path.name}: fields without a source line"
    assert sorted(set(trace) - set(fields)) == [], f"{path.name}: source lines for fields the recipe does not set"
    for key, tag in trace.items():
        assert tag, f"{path.name}: {key} names no source (one of {TAGS} in brackets)"


def test_the_ablation_recipe_differs_from_its_base_exactly_where_its_header_says() -> None:
    path, base = ABLATIONS[6]
    ours, theirs = (
        leaves(yaml.safe_load(path.read_text())),
        leaves(yaml.safe_load((CONFIGS / f"{base}.yaml").read_text())),
    )
    assert set(ours) == set(theirs)
    differ = {k for k in ours if ours[k] != theirs[k]}
    assert differ == set(traced(path)) and "model.encoder" in differ
    cfg = load_config(path)
    assert cfg.model.encoder == "conv" and cfg.optim.new_lr_mult == 1.0


@pytest.mark.parametrize("table", (4, 5, 7))
def test_each_ablation_table_is_a_sweep_over_its_recipe(table: int) -> None:
    path, base = ABLATIONS[table]
    spec = load_space(path, load_config(CONFIGS / f"{base}.yaml"))
    assert spec.scheduler["name"] == "fifo" and spec.metric == PROTOCOLS[base]["select"][0]
    text = path.read_text()
    for key, (kind, values) in spec.space.items():
        assert kind == "grid" and len(values) >= 3
        assert re.search(rf"^#\s+{re.escape(key)}\s", text, re.MULTILINE), f"{path.name}: the swept {key} is not traced"
    assert "[paper]" in text and "[unverified]" in text


# -- protocols ---------------------------------------------------------------------------------------------

TINY = [
    "run.device=cpu",
    "model.encoder=mit_b0",
    "model.dim=16",
    "model.num_blocks=1",
    "model.grid=[2,2]",
    "deepspeed.precision=fp32",
    "deepspeed.zero_stage=0",
    "deepspeed.activation_checkpointing=false",
    "model.memory=store",
    "tracking.enabled=false",
    "data.num_workers=0",
]


def _finalized(task: str) -> set[str]:
    """The metric names the validation reports for ``task`` (prefixed val_ as the loop logs them)."""
    sums = {
        "segmentation": {"confusion": torch.eye(3)},
        "translation": {"abs_err_sum": 1.0, "sq_err_sum": 1.0, "numel": 4.0},
        "classification": {"tp": torch.ones(3), "fp": torch.zeros(3), "fn": torch.zeros(3), "samples_f1_sum": 1.0},
    }
    return {f"val_{k}" for k in metrics.finalize(task, {**sums[task], "count": 2.0})}


@pytest.mark.parametrize("name", PAPER)
def test_the_rendered_recipe_follows_its_declared_protocol(name: str) -> None:
    proto, cfg = PROTOCOLS[name], load_config(CONFIGS / f"{name}.yaml")
    rendered = to_dict(cfg)
    assert rendered["data"]["train_split"] == proto["splits"]["train"]
    assert rendered["data"]["val_split"] == proto["splits"]["eval"]
    # the split files named by the protocol are the ones the dataset source reads
    source_text = (REPO / "pipeline" / "data" / "sources" / f"{proto['source']}.py").read_text()
    for split, files in proto["split_files"].items():
        assert split in (proto["splits"]["train"], proto["splits"]["eval"]) or name == "mmimdb"
        for f in files:
            assert f in source_text, f"{proto['source']} source does not read {f}"
    # resolution: training crop, and a token grid with the evaluated images' aspect
    crop = [cfg.data.crop_size, cfg.data.crop_width or cfg.data.crop_size]
    assert crop == proto["train_crop"]
    gh, gw = cfg.model.grid
    assert gh * crop[1] == gw * crop[0], "training crops and the token grid differ in aspect"
    if proto["eval_size"] != "varies":
        rows, cols = proto["eval_size"]
        assert gh * cols == gw * rows, "evaluated images and the token grid differ in aspect"
    assert (cfg.model.num_classes or 0) == proto["classes"]
    # learning-rate groups
    assert math.isclose(cfg.optim.lr, proto["lr"]["backbone"])
    assert math.isclose(cfg.optim.lr * cfg.optim.new_lr_mult, proto["lr"]["new"])
    # metric names: what the validation (and, for FID/KID, jobs.evaluate) reports
    reported = _finalized(cfg.model.task) | ({"val_fid", "val_kid"} if cfg.model.task == "translation" else set())
    for column, (metric, _) in proto["metrics"].items():
        assert metric in reported, f"{name}: the paper's {column} maps to {metric}, which nothing reports"
    assert [cfg.eval.metric, cfg.eval.mode] == proto["select"]
    # the paper's block, the full LICA mixer where the tokens allow it, skips on the dense tasks
    assert cfg.model.partitions == "all" and cfg.model.lica_group == 0 and not cfg.model.channel_mix
    assert cfg.model.skips == (cfg.model.task in ("segmentation", "translation"))


@pytest.mark.parametrize("name", ("nyudv2", "mmimdb", "taskonomy"))
def test_lr_groups_put_pretrained_parts_at_lr_and_new_parts_at_the_multiple(name: str) -> None:
    from pipeline.models import build_model
    from pipeline.train.engine import param_groups

    specs = {
        "nyudv2": [("rgb.png", (3, 48, 64), 8), ("depth.png", (1, 48, 64), 16), ("label.png", (48, 64), 8)],
        "mmimdb": [("rgb.png", (3, 32, 32), 8), ("text.txt", (), 0), ("labels.npy", (23,), 8)],
        "taskonomy": [
            ("reshading.png", (1, 32, 32), 8),
            ("edge_texture.png", (1, 32, 32), 16),
            ("rgb.png", (3, 32, 32), 8),
        ],
    }[name]
    cfg = load_config(CONFIGS / f"{name}.yaml", TINY)
    model = build_model(cfg, specs)
    groups = param_groups(model, cfg)
    by_param = {id(p): g["lr"] for g in groups for p in g["params"]}
    proto = PROTOCOLS[name]["lr"]
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        backbone = pname.startswith("encoders.") and (
            ".encoder.patch_embed" in pname
            or ".encoder.block" in pname
            or ".encoder.norm" in pname
            or ".bert." in pname
        )
        want = proto["backbone"] if backbone else proto["new"]
        assert math.isclose(by_param[id(p)], want), f"{pname}: lr {by_param[id(p)]} != {want}"
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_bad_new_lr_mult_or_crop_width_fails_with_one_line() -> None:
    from pipeline.config import ConfigError
    from pipeline.models import build_model
    from pipeline.train.engine import param_groups

    with pytest.raises(ConfigError, match="data.crop_width=8 needs data.crop_size"):
        load_config(CONFIGS / "nyudv2.yaml", ["data.crop_size=0", "data.crop_width=8"])
    with pytest.raises(ConfigError, match="optim.new_lr_mult"):
        load_config(CONFIGS / "nyudv2.yaml", ["optim.new_lr_mult=0"])
    with pytest.raises(ConfigError, match="model.skips"):
        load_config(CONFIGS / "mmimdb.yaml", ["model.skips=true"])
    with pytest.raises(ConfigError, match="model.flow_layer=glow"):
        load_config(CONFIGS / "demo.yaml", ["model.flow_layer=glow"])
    cfg = load_config(CONFIGS / "nyudv2_table6_no_latent.yaml", [*TINY, "model.encoder=conv", "optim.new_lr_mult=10"])
    model = build_model(cfg, [("rgb.png", (3, 48, 64), 8), ("depth.png", (1, 48, 64), 16), ("label.png", (48, 64), 8)])
    with pytest.raises(ConfigError, match="no trainable pretrained-able backbone"):
        param_groups(model, cfg)


# -- end to end on the datasets' real formats --------------------------------------------------------------

SHARDING = {  # recipe → (fixture builder, source, shard options, splits)
    "nyudv2": (make_fixtures.make_nyudv2, "nyudv2", {}, ("train", "test")),
    "sunrgbd": (make_fixtures.make_sunrgbd_list, "sunrgbd", {}, ("train", "test")),
    "taskonomy": (
        make_fixtures.make_taskonomy,
        "taskonomy",
        {"domains": "reshading,edge_texture,rgb", "size": 40},
        ("train", "val"),
    ),
    "mmimdb": (make_fixtures.make_mmimdb, "mmimdb", {"image_size": 40}, ("train", "dev")),
}
RUN = {  # recipe → overrides that make it a few-second CPU run (the protocol's structure is kept; MiT needs ≥ 32 px)
    "nyudv2": ["data.crop_size=48", "data.crop_width=64", "data.scale_range=[0.12,0.15]", "data.batch_size=2"],
    "sunrgbd": ["data.crop_size=32", "data.crop_width=40", "data.scale_range=[0.8,0.9]", "train.grad_accum=2"],
    "taskonomy": ["data.crop_size=32", "data.batch_size=2"],
    "mmimdb": ["data.crop_size=32", "model.grid=[4,4]", "data.batch_size=2"],
}
ARMS = {  # one non-default arm of each ablation, on the NYUDv2 fixture
    "table4_glow": ("nyudv2", ["model.flow_layer=glow"]),
    "table5_mmca_lica": ("nyudv2", ["model.partitions=mmca1+mmca2+lica+lica"]),
    "table6_no_latent": ("nyudv2_table6_no_latent", ["model.encoder=conv"]),
    "table7_blocks": ("nyudv2", ["model.num_blocks=2"]),
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from pipeline.data import write_split

    root = tmp_path_factory.mktemp("recipes")
    out = {}
    for name, (build, source, options, splits) in SHARDING.items():
        raw = build(root / "raw" / name)
        for split in splits:
            write_split(source, str(raw), str(root / name), split, options=options, samples_per_shard=4, progress=False)
        out[name] = root / name
    return out


def _run(recipe: str, data: Path, run_dir: Path, extra: list[str]) -> dict:
    from pipeline.train.loop import train_loop

    base = "nyudv2" if recipe.startswith("nyudv2") else recipe
    cfg = load_config(
        CONFIGS / f"{recipe}.yaml",
        [
            *TINY,
            *RUN[base],
            *extra,
            f"data.shards={data}",
            f"run.dir={run_dir}",
            "train.max_steps=2",
            "optim.warmup_steps=0",
            "eval.every=2",
            "checkpoint.every=2",
            "train.log_every=1",
        ],
    )
    return train_loop(cfg)


@pytest.mark.parametrize("name", PAPER)
def test_each_paper_recipe_runs_end_to_end_on_its_real_format(name: str, shards, tmp_path) -> None:
    torch.manual_seed(0)
    result = _run(name, shards[name], tmp_path / "run", [])
    proto = PROTOCOLS[name]
    for metric, _ in proto["metrics"].values():
        if metric not in ("val_fid", "val_kid"):
            assert metric in result and math.isfinite(result[metric]), f"{name}: {metric} missing from {sorted(result)}"
    assert math.isfinite(result["loss"]) and result["val_samples"] > 0


def test_translation_fid_kid_without_inception_weights_are_named_proxies(shards, tmp_path, caplog) -> None:
    from pipeline.evaluation import evaluate_model
    from pipeline.train.consolidate import consolidate, load_model

    _run("taskonomy", shards["taskonomy"], tmp_path / "run", [])
    model, cfg = load_model(consolidate(tmp_path / "run", tmp_path / "model.safetensors"))
    with caplog.at_level(logging.WARNING, logger="pipeline.metrics"):
        result = evaluate_model(model, cfg, str(shards["taskonomy"]), "val")
    assert {"val_fid_proxy", "val_kid_proxy"} <= set(result.metrics)
    assert not {"val_fid", "val_kid"} & set(result.metrics)
    assert any("not FID / KID" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_each_ablation_arm_runs_end_to_end(arm: str, shards, tmp_path) -> None:
    recipe, extra = ARMS[arm]
    result = _run(recipe, shards["nyudv2"], tmp_path / "run", extra)
    assert math.isfinite(result["val_miou"]) and math.isfinite(result["nll"])


def test_sweep_trials_render_to_valid_configs() -> None:
    base = load_config(CONFIGS / "nyudv2.yaml")
    for table in (4, 5, 7):
        spec = load_space(ABLATIONS[table][0], base)
        for key, (_, values) in spec.space.items():
            for value in values:
                assert getattr(apply_overrides(base, {key: value}).model, key.split(".")[1]) == value
