"""The typed run configuration: nested dataclasses are the one source of truth.

Precedence (later wins), applied once, in :func:`load_config`::

    dataclass defaults  ←  YAML file (``--config launch/configs/<name>.yaml``)  ←  dotlist overrides (``optim.lr=3e-4``)

Every layer is checked against the dataclasses *before* it is merged: an unknown key, a wrong type or a
value outside its allowed set raises :class:`ConfigError` with a one-line message that names the dotted
key (and where it came from), so a bad launch fails before any process group starts. Types are strict:
a ``bool`` field takes only ``true``/``false``, an ``int`` field rejects ``1.5`` and ``true``, a ``float``
field takes ints. ``key=`` (an empty override) sets a string field to ``""``. String values may use
OmegaConf interpolation (``run.dir: /scratch/${run.name}``; ``${oc.env:VAR}``); the resolved value is
checked like any other.

Keys that scripts and operators rely on keep these names: ``run.dir``, ``train.max_steps``,
``checkpoint.every``, ``checkpoint.resume``, ``eval.every``.

Adding a field: add it to its section dataclass with a default and, if it has an allowed set or range,
``metadata`` (``choices``, ``ge``/``gt``/``le``/``lt``, ``pattern``; checked by :mod:`pipeline.config_rules`); the loader, the YAML dump and the
MLflow params pick it up with no other change.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

# the field-checking machinery (strict types, per-field rules) is in config_rules; ConfigError is re-exported
from pipeline.config_rules import IDENT as _IDENT
from pipeline.config_rules import NAME as _NAME
from pipeline.config_rules import ConfigError
from pipeline.config_rules import check_resolved as _check_resolved
from pipeline.config_rules import check_tree as _check_tree
from pipeline.config_rules import rule_field as _f
from pipeline.flows.base import KERNELS
from pipeline.flows.ica import ATTENTION, FORMS
from pipeline.flows.mango import MEMORY_POLICIES
from pipeline.flows.partitions import resolve_partitions
from pipeline.tasks import get_task, task_names

TASKS = task_names()  # the registry's tasks (pipeline.tasks)
ENCODERS = ("conv", "mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class RunConfig:
    """Where and how a run lives. ``dir`` holds checkpoints, ``config.yaml``, ``metrics.jsonl``."""

    name: str = _f("mango", pattern=_NAME)
    dir: str = _f("runs/${run.name}", nonempty=True)
    seed: int = _f(0, ge=0)
    device: str = _f("auto", choices=DEVICES)  # auto = cuda when available, else cpu


@dataclass
class DataConfig:
    """Shards written by ``jobs.shard``: a local directory or ``s3://`` URL holding ``manifest-<split>.json``."""

    shards: str = _f("shards/stereo", nonempty=True)
    train_split: str = _f("train", pattern=_NAME)
    val_split: str = _f("val", pattern=_NAME)
    batch_size: int = _f(8, ge=1)  # per rank and micro-batch; global = batch_size · world_size · grad_accum
    num_workers: int = _f(0, ge=0)
    modalities: list[str] = _f(factory=lambda: ["rgb", "right"], nonempty=True, item_pattern=_IDENT)
    crop_size: int = _f(0, ge=0)  # latent tasks, training only: random square crop (px); 0 = none
    crop_width: int = _f(0, ge=0)  # > 0: crops are crop_size rows × crop_width columns (e.g. 3:4 data); 0 = square
    scale_range: tuple[float, float] = _f((1.0, 1.0), item_gt=0.0)  # random rescale before the crop (per batch)
    hflip: bool = False  # random horizontal flips in training (never for stereo-geometry tasks)
    # each shard is checked against its manifest entry before its samples are used: size (stat), sha256 (read
    # once), off; a bad shard is skipped whole, logged once and counted (data_bad_shards)
    verify: str = _f("size", choices=("size", "sha256", "off"))
    max_bad_fraction: float = _f(0.05, ge=0.0, le=1.0)  # stop when more of a split's samples sit in bad shards
    # exact: every sample of an epoch trained once, at any world size and across resizes (pipeline.data.epochs);
    # resample: shards drawn with replacement per (rank, worker), total // (batch · world) batches an epoch
    sampling: str = _f("exact", choices=("exact", "resample"))


@dataclass
class ModelConfig:
    """The model. ``density`` is the multiscale pixel-level flow; the other tasks are latent models E → G → head.

    Every field declares ``arch``: whether it fixes the architecture (the parameter set or what the weights mean).
    A resumed run must keep those (:func:`architecture_keys`); the rest (memory policy, kernels, loss weights,
    initial weights) may change between runs.
    """

    task: str = _f("density", choices=TASKS, arch=True)
    channels: int = _f(3, ge=1, arch=True)  # per modality, at pixel level
    image_size: int = _f(64, ge=1, arch=True)  # H = W, pixels
    levels: int = _f(3, ge=1, arch=True)  # multiscale levels (each after the first halves the token grid side)
    blocks_per_level: int = _f(4, ge=1, arch=True)
    dim: int = _f(64, ge=1, arch=True)  # conditioner width; token width D of the latent task models
    patch_size: int = _f(2, ge=1, arch=True)  # pixels per token side at level 0
    num_blocks: int = _f(12, ge=1, arch=True)  # G: MANGO blocks in the latent flow
    tokens: int = _f(0, ge=0, arch=True)  # tokens per modality in the latent models; 0 = (image_size / patch_size)²
    partitions: str = _f("all", partitions=True, arch=True)  # a preset or a '+'-joined list of partition names
    lica_group: int = _f(64, ge=0, arch=True)  # LICA token-group size; 0 = one full L×L mixer
    # latent models' G: ica = MANGO blocks; the Table 4 comparators built from the same flow layers, no cross-token
    # attention: coupling = ActNorm → affine coupling (RealNVP-style), glow = ActNorm → 1×1 channel mixer → coupling
    flow_layer: str = _f("ica", choices=("ica", "coupling", "glow"), arch=True)
    memory: str = _f("store", choices=MEMORY_POLICIES, arch=False)
    form: str = _f("gated", choices=FORMS, arch=True)
    channel_mix: bool = _f(
        True, arch=True
    )  # each MANGO block starts with a learned invertible channel mixer (ours); false = the paper's block
    attention: str = _f(
        "auto", choices=ATTENTION, arch=False
    )  # ICA forward: fused SDPA, plain reference, auto = fused from 512 tokens/half
    kernels: str = _f(
        "auto", choices=KERNELS, arch=False
    )  # flow implementations: auto (C++ nodes where they apply), python, reference
    compile: bool = _f(
        False, arch=False
    )  # torch.compile each MANGO block (runs the Python kernels; compile time at start-up)
    encoder: str = _f("conv", choices=ENCODERS, arch=True)
    encoder_weights: str = _f("", arch=False)  # local path to pretrained encoder weights; "" = random init
    init_weights: str = _f("", arch=False)  # consolidated model.safetensors to start a fresh run from; "" = random init
    nll_weight: float = _f(1e-2, ge=0.0, arch=False)  # λ in task loss + λ·NLL/(L·D)
    # let the NLL's gradient reach the encoders (default: stopped — E's Jacobian is not in the likelihood, so the
    # encoders could shrink their output to cheat it; the fusion study measures the lever)
    nll_to_encoders: bool = _f(False, arch=False)
    # latent models with a padded input (text): padded tokens held fixed by G, never attended to, and left out of
    # the NLL (exact for the real tokens); needs partitions without lica. False = the paper (pads are tokens)
    pad_mask: bool = _f(False, arch=True)
    num_classes: int = _f(0, ge=0, arch=True)  # segmentation / classification head size
    # latent models: G over the fused tokens; concat (no flow); xattn (bidirectional cross-attention blocks, no flow)
    fusion: str = _f("mango", choices=("mango", "concat", "xattn"), arch=True)
    xattn_mlp_ratio: float = _f(2.0, gt=0.0, arch=True)  # fusion=xattn: MLP width / D (depth = model.num_blocks)
    target: str = _f(
        "", arch=True
    )  # latent models: the predicted entry of data.modalities ("" = the one label / target modality)
    grid: list[int] = _f(
        factory=list, item_ge=1, arch=True
    )  # [gh, gw] token grid per modality; [] = square of model.tokens
    text_trainable: bool = _f(False, arch=False)  # fine-tune MiniLM (text modalities); false = frozen
    text_cache: int = _f(
        0, ge=0, arch=False
    )  # frozen MiniLM: hidden states of this many distinct texts kept in memory; 0 = off
    gan_weight: float = _f(0.0, ge=0.0, arch=True)  # translation: weight of the PatchGAN terms; 0 = no discriminator
    depth_max: float = _f(10000.0, gt=0.0, arch=True)  # 16-bit modalities: this value maps to 1.0 (mm: 10 m), clipped
    # translation head: direct = pixels decoded from the token grid; on a rectified stereo pair, warp = one regressed
    # horizontal shift per pixel, the source image warped by it (grid_sample); select = a per-pixel softmax over
    # the shifts -R..R of the source image (Deep3D's selection layer)
    decoder: str = _f("direct", choices=("direct", "warp", "select"), arch=True)
    warp_range: int = _f(16, ge=1, arch=True)  # decoder=warp|select: shifts bounded by / candidates in -R..R px
    warp_generate: bool = _f(
        False, arch=True
    )  # decoder=warp|select: add a directly decoded image (occlusion term / candidate)
    # segmentation / translation: the decoder also reads the encoders' multi-scale feature maps (strides 4-32 for
    # MiT), both modalities', through skip connections (SegFormer-style, as TokenFusion decodes); false = from the
    # fused latent grid alone
    skips: bool = _f(False, arch=True)


def architecture_keys() -> tuple[str, ...]:
    """The ``model.*`` fields declared ``arch=True`` in :class:`ModelConfig` (checked on resume, recorded in the registry)."""
    return tuple(f.name for f in dataclasses.fields(ModelConfig) if f.metadata.get("arch"))


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (warmup, then decay to ``lr · min_lr_ratio`` at ``max_steps``)."""

    lr: float = _f(1e-3, gt=0.0)
    weight_decay: float = _f(0.0, ge=0.0)
    betas: tuple[float, float] = _f((0.9, 0.999), item_ge=0.0, item_lt=1.0)
    eps: float = _f(1e-8, gt=0.0)
    warmup_steps: int = _f(100, ge=0)
    schedule: str = _f("cosine", choices=SCHEDULES)
    min_lr_ratio: float = _f(0.1, ge=0.0, le=1.0)
    grad_clip: float = _f(1.0, ge=0.0)  # max global grad norm; 0 = off
    ema: float = _f(0.0, ge=0.0, lt=1.0)  # EMA decay of the weights; 0 = off
    # LR × this for the newly initialised parts (everything but the pretrained-able backbones: MiT encoders, MiniLM);
    # TokenFusion trains its decoder at ×10. 1 = one LR for all (two param groups, as before)
    new_lr_mult: float = _f(1.0, gt=0.0)


@dataclass
class TrainConfig:
    """Loop lengths and guards; all counts are optimizer steps."""

    max_steps: int = _f(1000, ge=1)
    grad_accum: int = _f(1, ge=1)
    log_every: int = _f(10, ge=1)  # metrics.jsonl and progress cadence
    max_nonfinite: int = _f(5, ge=1)  # this many skipped (non-finite) steps in a row abort the run
    watchdog_s: float = _f(1800.0, ge=0.0)  # abort when no step completes for this long; 0 = off
    collective_timeout_s: float = _f(600.0, gt=0.0)  # bound of every collective / barrier (a lost rank, a hang)
    log_keys: bool = False  # <run.dir>/keys/rank<r>.jsonl: the sample keys of every micro-batch trained


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine. bf16 runs through autocast; parameters and buffers stay fp32."""

    zero_stage: int = _f(0, ge=0, le=3)
    precision: str = _f("fp32", choices=PRECISIONS)
    activation_checkpointing: bool = False


@dataclass
class CheckpointConfig:
    """Checkpoints under ``<run.dir>/checkpoints``; ``resume`` is ``latest``, a checkpoint path, or ``""``."""

    every: int = _f(500, ge=1)  # steps
    keep: int = _f(3, ge=1)  # newest checkpoints kept
    resume: str = ""
    remote: str = _f("", url_schemes=("s3",))  # "" or s3://bucket/prefix mirrored after each save
    grace_s: float = _f(60.0, ge=0.0)  # time allowed for a final save after a preemption signal


@dataclass
class EvalConfig:
    """Validation on ``data.val_split``; ``metric`` and ``mode`` drive sweeps and the registry gate."""

    every: int = _f(500, ge=1)  # steps
    batches: int = _f(0, ge=0)  # per rank; 0 = one exact pass over the split
    metric: str = _f("val_bits_per_dim", pattern=_IDENT)
    mode: str = _f("min", choices=("min", "max"))


@dataclass
class TrackingConfig:
    """MLflow on rank 0. ``uri`` "" = ``MLFLOW_TRACKING_URI`` if set, else the project's shared local store."""

    enabled: bool = True
    uri: str = ""
    experiment: str = _f("mango", nonempty=True)
    log_every: int = _f(10, ge=1)  # steps between metric sends
    queue_size: int = _f(1000, ge=1)  # pending sends; the oldest is dropped when full
    timeout_s: float = _f(10.0, gt=0.0)  # per HTTP request, and for the final flush
    retries: int = _f(2, ge=0, le=10)  # per send (MLflow caps HTTP retries at 10)
    parent_run_id: str = ""  # nest this run under that MLflow run (a sweep's parent; set by jobs.sweep per trial)


@dataclass
class LaunchConfig:
    """Cluster settings read only by ``python -m jobs.launch`` (SLURM scripts, Kubernetes manifests).

    Credentials never live here: Kubernetes pods read them from the Secret ``secret`` (``envFrom``), SLURM
    jobs from the submitting environment. ``env`` holds plain ``KEY=VALUE`` settings (e.g. NCCL_SOCKET_IFNAME).
    """

    image: str = _f("mango-pipeline", nonempty=True)  # container image repository (k8s, kuberay)
    tag: str = ""  # image tag; required for k8s and kuberay (the tag you built with the Dockerfile)
    partition: str = ""  # SLURM partition; "" = the cluster default
    account: str = ""
    qos: str = ""
    time: str = _f("24:00:00", nonempty=True)  # SLURM time limit
    cpus_per_gpu: int = _f(8, ge=1)
    log_dir: str = ""  # "" = <run.dir>/logs; each job writes <log_dir>/<job name>-<job id>/
    rdzv_port: int = _f(0, ge=0, lt=65536)  # 0 = 20000 + job id % 40000 (SLURM), 29500 (k8s)
    python: str = _f("python", nonempty=True)  # interpreter on the nodes (SLURM)
    setup: str = ""  # shell line(s) run first on the nodes, e.g. "source /shared/mango/.venv/bin/activate"
    env: list[str] = _f(factory=list)  # plain KEY=VALUE settings exported to every node / pod
    namespace: str = _f("default", nonempty=True)
    env_from: str = _f(
        "mango-credentials", nonempty=True
    )  # k8s Secret (its name; envFrom) with AWS_* and MLFLOW_TRACKING_* keys
    pvc: str = ""  # ReadWriteMany claim holding run dirs (checkpoints); "" needs checkpoint.remote=s3://...
    pvc_mount: str = _f("/mnt/mango", nonempty=True)
    shm_size: str = _f("16Gi", nonempty=True)  # /dev/shm (memory-backed emptyDir) per pod
    max_restarts: int = _f(20, ge=0)  # pod restarts (preemptions) before Kubernetes gives up


@dataclass
class Config:
    """The whole run configuration (see the module docstring for how it is assembled)."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


# -- public API ---------------------------------------------------------------------------------------


def load_config(config_path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Defaults ← YAML at ``config_path`` (None or "" = none) ← ``overrides`` (``"a.b=value"`` strings)."""
    layers = []
    if config_path:
        layers.append((_load_yaml(Path(config_path)), f"from {config_path}"))
    if overrides:
        layers.append((_parse_overrides(overrides), "from the command line"))
    return _build(layers)


def apply_overrides(cfg: Config, overrides: Sequence[str] | Mapping[str, Any]) -> Config:
    """A new config: ``cfg`` with dotlist strings or a ``{"optim.lr": 3e-4}`` mapping applied (e.g. a sweep trial)."""
    if isinstance(overrides, Mapping):
        tree: dict[str, Any] = {}
        for key, value in overrides.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(f"override keys must be dotted strings such as 'optim.lr'; got {key!r}")
            _set_dotted(tree, key, list(value) if isinstance(value, tuple) else value)
        layer = (tree, "from overrides")
    else:
        layer = (_parse_overrides(overrides), "from overrides")
    return _build([(to_dict(cfg), "from the base config"), layer])


def from_dict(d: Mapping[str, Any]) -> Config:
    """Build and validate a config from a (possibly partial) nested mapping, e.g. a checkpoint's copy."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"a config must be a mapping of sections; got {type(d).__name__}")
    return _build([(dict(d), "from the given mapping")])


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested ``dict``/``list``/scalars (YAML-, JSON- and ``torch.load(weights_only=True)``-safe)."""
    return _plain(dataclasses.asdict(cfg))


def save_resolved(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically: a reader never sees half a file); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None))
    os.replace(tmp, path)
    return path


def flatten(cfg: Config) -> dict[str, str]:
    """``{"optim.lr": "0.001", "data.modalities": '["rgb", "right"]', ...}`` — MLflow params."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, list):
            out[prefix] = json.dumps(value)
        else:
            out[prefix] = str(value)

    walk("", to_dict(cfg))
    return out


# -- building -----------------------------------------------------------------------------------------


def _build(layers: list[tuple[dict[str, Any], str]]) -> Config:
    for tree, source in layers:
        _check_tree(tree, Config, "", source)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), *(OmegaConf.create(t) for t, _ in layers))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        msg = str(getattr(e, "msg", None) or e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}") from None
    assert isinstance(cfg, Config)
    _check_resolved(cfg, Config, "")
    _check_cross(cfg)
    return cfg


def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        conf = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    except OSError as e:  # OmegaConf raises OSError("Invalid loaded object type") for a bare scalar file
        if "Invalid loaded object type" not in str(e):
            raise ConfigError(f"{path}: cannot read the config file ({e})") from None
        conf = None
    if not OmegaConf.is_dict(conf):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (run, data, model, ...)")
    return OmegaConf.to_container(conf, resolve=False)  # type: ignore[return-value]


def _parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of 'key=value' strings; got the single string {overrides!r}")
    tree: dict[str, Any] = {}
    for item in overrides:
        if not isinstance(item, str) or "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. optim.lr=3e-4)")
        key, raw = (s.strip() for s in item.split("=", 1))
        if raw == "":
            value: Any = ""  # `checkpoint.resume=` clears a string field
        else:
            try:
                value = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]), resolve=False)["v"]
            except (yaml.YAMLError, OmegaConfBaseException) as e:
                raise ConfigError(f"override {item!r}: cannot parse the value ({' '.join(str(e).split())})") from None
        _set_dotted(tree, key, value)
    return tree


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override key {key!r} has an empty component")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override key {key!r} conflicts with a value already given for {p!r}")
        node = nxt
    node[parts[-1]] = value


# -- checks -------------------------------------------------------------------------------------------


def _check_cross(cfg: Config) -> None:
    """Rules that involve more than one field."""
    m, shards = cfg.model, cfg.data.shards
    if "://" in shards and not shards.startswith("s3://"):
        raise ConfigError(f"data.shards must be a local directory or an s3:// URL; got {shards!r}")
    get_task(m.task).check_config(cfg)  # the task's own cross-field rules (model.skips, model.flow_layer, ...)
    if m.pad_mask and m.fusion == "mango" and m.flow_layer == "ica" and "lica" in resolve_partitions(m.partitions):
        raise ConfigError(
            f"model.pad_mask: partitions {m.partitions!r} include lica, whose token mixer mixes padded tokens into "
            "real ones; choose partitions without lica (e.g. model.partitions=mmca+imca)"
        )
    if cfg.optim.ema and cfg.deepspeed.zero_stage == 3:
        raise ConfigError(
            "optim.ema: an EMA of ZeRO-3-partitioned weights is not supported; use "
            "deepspeed.zero_stage ≤ 2 with EMA, or optim.ema=0"
        )
    if m.memory == "invert" and cfg.deepspeed.zero_stage == 3:
        # the reconstruction backward returns gradients for ZeRO-3's partitioned parameter placeholders
        raise ConfigError(
            "model.memory=invert (backprop by reconstruction) is not supported with "
            "deepspeed.zero_stage=3; use model.memory=checkpoint with ZeRO-3, or zero_stage ≤ 2"
        )
    if cfg.data.crop_width and not cfg.data.crop_size:
        raise ConfigError(f"data.crop_width={cfg.data.crop_width} needs data.crop_size (the crop's rows) > 0")
    if cfg.optim.warmup_steps > cfg.train.max_steps:
        raise ConfigError(
            f"optim.warmup_steps ({cfg.optim.warmup_steps}) must not exceed train.max_steps ({cfg.train.max_steps})"
        )


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
