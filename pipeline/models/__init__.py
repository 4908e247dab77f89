"""Task models. ``build_model(cfg, specs)`` builds the model of ``model.task`` (its :mod:`pipeline.tasks` object
decides the pieces: latent or not, the head, the input/target layout, the checks).

``specs`` (name, shape, bits per modality) come from the shard manifest at training time
(:func:`modality_specs`) and from the consolidated weights' metadata when a model is loaded for inference,
so no manifest is needed then. A modality's role follows from its batched shape: (C, H, W) = image
(8-bit colour, 16-bit depth), (H, W) = label map, (K,) = multi-hot target vector, () = text.

| ``model.task`` | model | inputs → target | task loss | eval sums |
|---|---|---|---|---|
| density | :class:`DensityModel` (multiscale flow) | 1–2 images | bits/dim | ``bits_per_dim_sum`` |
| segmentation | :class:`LatentTaskModel` + :class:`SegmentationHead` | 1–2 images → label | CE (ignore 255) | ``confusion`` |
| translation | :class:`LatentTaskModel` + :class:`TranslationHead` (``model.decoder=warp|select``: :class:`WarpTranslationHead`, :class:`SelectTranslationHead`) | 1–2 images → ``model.target`` image | L1 (+GAN) | ``abs_err_sum``, ``sq_err_sum``, ``numel`` |
| classification | :class:`LatentTaskModel` + :class:`ClassificationHead` | image and/or text → vector | BCE | ``tp``, ``fp``, ``fn``, ``samples_f1_sum`` |

Every task model's ``forward(batch, mode=...)`` is its single entry point (``"loss"`` → ``{"loss", ...}``,
``"eval"`` → sums + ``"count"`` for exact cross-rank reduction, ``"predict"`` per-sample outputs for the
latent tasks, ``"sample"`` for density), so the DeepSpeed engine (and ZeRO-3's parameter gathering) sees
every call. The metrics that turn the sums into numbers live in :mod:`pipeline.metrics`.
"""

from __future__ import annotations

import math

from torch import nn

from pipeline.config import Config, ConfigError
from pipeline.flows.plan import decide_memory
from pipeline.tasks import Task, get_task

from .augment import Augment
from .density import DensityModel, build_density
from .encoders import MIT_SIZES, ImageEncoder, MixVisionTransformer, load_mit_weights, read_state_dict
from .fusion import LatentTaskModel, Modality, build_head
from .heads import decoder_steps

__all__ = ["DensityModel", "LatentTaskModel", "Modality", "build_model", "modality_specs", "task_layout"]

Spec = tuple[str, tuple[int, ...], int]


def modality_specs(cfg: Config, manifest) -> list[Spec]:
    """(sample key, shape (C, H, W), bits) for each of ``data.modalities``, checked against the shard manifest.

    A config modality name (``rgb``) matches the manifest member whose stem it is (``rgb.png``); images are
    stored (H, W, C) / (H, W) and batched (C, H, W), so the shape is reported in the batched layout. For the
    tasks with classes the manifest's class names must agree with ``model.num_classes`` (ConfigError otherwise).
    """
    available = manifest.modalities
    by_stem = {key.split(".")[0]: key for key in available}
    needs_classes = get_task(cfg.model.task).needs_num_classes
    out = []
    for name in cfg.data.modalities:
        if name not in by_stem:
            raise ConfigError(
                f"data.modalities: '{name}' is not in the shards at {cfg.data.shards} (they hold {sorted(by_stem)})"
            )
        key = by_stem[name]
        spec = available[key]
        shape = tuple(spec.shape or ())
        if spec.kind in ("image", "depth") and len(shape) in (2, 3):
            shape = (shape[2] if len(shape) == 3 else 1, shape[0], shape[1])
        if spec.kind == "meta":
            raise ConfigError(f"data.modalities: '{name}' is metadata ({key}), not a modality a model can read")
        if (
            needs_classes
            and spec.kind in ("label", "target")
            and spec.classes is not None
            and len(spec.classes) != cfg.model.num_classes
        ):
            raise ConfigError(
                f"model.num_classes={cfg.model.num_classes} but the shards' {key} has "
                f"{len(spec.classes)} classes ({', '.join(spec.classes[:5])}, ...)"
            )
        bits = {"uint8": 8, "uint16": 16}.get(spec.dtype, 0)
        out.append((key, shape, bits))
    return out


def task_layout(cfg: Config, specs: list[Spec]) -> tuple[list[Modality], Modality]:
    """(input modalities, target modality) of a latent task, or a ConfigError saying what does not fit."""
    return get_task(cfg.model.task).layout(cfg, specs)


def _grid(cfg: Config) -> tuple[int, int]:
    m = cfg.model
    n = m.tokens or (m.image_size // m.patch_size) ** 2
    if m.grid:
        if len(m.grid) != 2:
            raise ConfigError(f"model.grid must be [rows, cols] or []; got {m.grid}")
        if m.tokens and m.grid[0] * m.grid[1] != m.tokens:
            raise ConfigError(f"model.grid {m.grid} holds {m.grid[0] * m.grid[1]} tokens but model.tokens={m.tokens}")
        return m.grid[0], m.grid[1]
    side = math.isqrt(n)
    if side * side != n:
        raise ConfigError(f"model.tokens={n} is not a square; give the grid explicitly (model.grid=[rows,cols])")
    return side, side


def _flow_kwargs(cfg: Config, tokens: int, memory: str) -> dict:
    """MangoFlow arguments for L = ``tokens``; ConfigError when the partitions cannot split that many tokens."""
    m = cfg.model
    per = tokens // 2  # tokens per (pseudo-)modality the partitions see
    if tokens % 2 or per % 2:
        raise ConfigError(
            f"model.tokens/model.grid: the latent flow sees {tokens} tokens; MMCA/IMCA/LICA need an even "
            f"count per modality, each even again (a multiple of 4 per modality half)"
        )
    group = 0 if m.lica_group == 0 or m.lica_group >= tokens else m.lica_group
    if group and (tokens % group or group % 2):
        raise ConfigError(
            f"model.lica_group={m.lica_group} must be even and divide the latent flow's {tokens} tokens "
            f"(or 0 for one full mixer)"
        )
    kwargs = {
        "num_blocks": m.num_blocks,
        "memory": memory,
        "partitions": m.partitions,
        "form": m.form,
        "lica_group": group,
        "attention": m.attention,
        "channel_mix": m.channel_mix,
    }
    return kwargs | ({"layer": m.flow_layer} if m.flow_layer != "ica" else {})


def _check_latent_options(cfg: Config, task: Task) -> None:
    """The build-time checks of the latent model's options (ConfigError), in the order they always ran."""
    m = cfg.model
    if m.encoder_weights and m.encoder == "conv":
        raise ConfigError(
            "model.encoder_weights: the conv encoder trains from scratch; pretrained weights need "
            f"model.encoder=mit_b0..mit_b5 (one of {list(MIT_SIZES)})"
        )
    if m.text_cache and m.text_trainable:
        raise ConfigError(
            "model.text_cache: cached MiniLM states need a frozen MiniLM; set model.text_trainable=false "
            "or model.text_cache=0"
        )
    if m.gan_weight and cfg.deepspeed.zero_stage == 3:
        # the generator's adversarial term runs the discriminator with detached parameters (functional_call),
        # which ZeRO-3's partitioned parameters do not support
        raise ConfigError(
            "model.gan_weight > 0 is not supported with deepspeed.zero_stage=3; use zero_stage ≤ 2 "
            "(the discriminator is small) or model.gan_weight=0"
        )
    task.check_model(cfg)


def _skips(cfg: Config, inputs: list[Modality]) -> tuple[list[int] | None, int]:
    """(skip channels per stride, finest stride) of ``model.skips``: the encoders' maps, finest first,
    concatenated over the (image) input modalities; (None, 1) without skips."""
    m = cfg.model
    if not m.skips:
        return None, 1
    if any(md.kind != "image" for md in inputs):
        raise ConfigError(
            f"model.skips: skip connections take image encoders' maps; inputs "
            f"{[md.key for md in inputs]} include a non-image modality"
        )
    per = MIT_SIZES[m.encoder].embed_dims if m.encoder in MIT_SIZES else (max(m.dim, 32),)
    return [c * len(inputs) for c in per], 4 if m.encoder in MIT_SIZES else m.patch_size


def _check_source(cfg: Config, inputs: list[Modality], target: Modality) -> None:
    """A warping / selecting decoder needs an input image shaped like the target (ConfigError)."""
    m = cfg.model
    if m.decoder != "direct" and not any(
        md.kind == "image" and (md.channels, md.bits) == (target.channels, target.bits) for md in inputs
    ):
        raise ConfigError(
            f"model.decoder={m.decoder} moves pixels of an input image like the target {target.key}; none of "
            f"{[md.key for md in inputs]} has its {target.channels} channels and {target.bits} bits"
        )


def _load_encoder_weights(model: LatentTaskModel, path: str) -> None:
    """``model.encoder_weights`` into every MiT image encoder (a mismatch is a ConfigError)."""
    state = read_state_dict(path)
    for enc in model.encoders.values():
        if isinstance(enc, ImageEncoder) and isinstance(enc.encoder, MixVisionTransformer):
            try:
                load_mit_weights(enc.encoder, state, source=f"model.encoder_weights={path!r}")
            except ValueError as e:
                raise ConfigError(str(e)) from None


def build_latent(cfg: Config, specs: list[Spec], memory: str) -> LatentTaskModel:
    """The latent model (E → G → head) of ``cfg.model.task``; loads ``model.encoder_weights`` into MiT encoders."""
    m, d = cfg.model, cfg.data
    task = get_task(m.task)
    inputs, target = task.layout(cfg, specs)
    grid = _grid(cfg)
    n = grid[0] * grid[1]
    if inputs[0].kind == "text" and len(inputs) == 1 and m.fusion == "mango" and n % 4:
        raise ConfigError(f"model.tokens={n}: the single-modality flow splits tokens even/odd; use a multiple of 4")
    flow_kwargs = _flow_kwargs(cfg, n * len(inputs), memory) if m.fusion == "mango" else None
    _check_latent_options(cfg, task)
    steps = decoder_steps(m.image_size, grid[0])
    task.check_decoder(m.decoder)
    skip_channels, skip_stride = _skips(cfg, inputs)
    head = build_head(
        m.task,
        target,
        m.dim,
        len(inputs),
        steps,
        m.num_classes,
        m.gan_weight,
        m.decoder,
        m.warp_range,
        m.warp_generate,
        skip_channels,
        skip_stride,
    )
    augment = Augment(d.crop_size, tuple(d.scale_range), d.hflip, d.crop_width)
    _check_source(cfg, inputs, target)
    model = LatentTaskModel(
        m.task,
        inputs,
        target,
        head,
        dim=m.dim,
        grid=grid,
        encoder=m.encoder,
        patch_size=m.patch_size,
        fusion=m.fusion,
        nll_weight=m.nll_weight,
        nll_to_encoders=m.nll_to_encoders,
        depth_max=m.depth_max,
        text_trainable=m.text_trainable,
        text_cache=m.text_cache,
        augment=augment,
        flow_kwargs=flow_kwargs,
        skips=m.skips,
        pad_mask=m.pad_mask,
        xattn_kwargs={"depth": m.num_blocks, "mlp_ratio": m.xattn_mlp_ratio} if m.fusion == "xattn" else None,
    )
    if m.encoder_weights:
        _load_encoder_weights(model, m.encoder_weights)
    return model


def build_model(cfg: Config, specs: list[Spec]) -> nn.Module:
    """The model for ``cfg.model.task`` on modalities ``specs`` = :func:`modality_specs` (mismatch → ConfigError)."""
    task = get_task(cfg.model.task)  # an unknown task is a ConfigError naming the registry's tasks
    memory = decide_memory(cfg.model.memory, cfg.deepspeed.activation_checkpointing)  # the plan's one memory rule
    task.check_specs(cfg, specs)
    if task.latent:
        return build_latent(cfg, specs, memory)
    return build_density(cfg.model, [s[0] for s in specs], [s[2] for s in specs], memory=memory)
