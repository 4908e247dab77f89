"""Consolidate a DeepSpeed checkpoint (any ZeRO stage) into one fp32 ``model.safetensors`` + its config.

The weights file holds every parameter *and persistent buffer* (ActNorm ``initialized`` flags, LICA's LU
permutations) in fp32 (integer/bool buffers keep their dtype); its metadata records the modality specs
(name, shape, bits) so :func:`load_model` rebuilds the model without the shard manifest. The resolved
config is written beside it as ``<stem>.config.yaml``.

ZeRO 1–3 shards are merged by DeepSpeed's own ``zero_to_fp32`` reader; the ZeRO-0 model file and every
file this project writes are loaded with ``weights_only=True`` or safetensors (no arbitrary unpickling).
Every file of the checkpoint is first checked against the checksums in its ``state.json``; a corrupt
checkpoint or weights file is one :class:`~pipeline.train.checkpoint.CheckpointError` line naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from pipeline.config import Config, from_dict, load_config, save_resolved
from pipeline.models import build_model
from pipeline.train import checkpoint as ckpt


def resolve_tag_dir(path: str | Path) -> Path:
    """A run dir, its ``checkpoints/`` dir, or one tag dir → a complete tag dir (FileNotFoundError otherwise)."""
    path = Path(path)
    if (path / ckpt.COMPLETE).exists():
        return path
    found = ckpt.latest_complete(path.parent if path.name == "checkpoints" else path)
    if found is not None:
        return found
    raise FileNotFoundError(
        f"{path}: no complete checkpoint here (expected a tag directory with a {ckpt.COMPLETE} "
        "marker, a checkpoints/ directory, or a run directory)"
    )


def consolidated_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict (parameters + persistent buffers) from a complete tag dir of any ZeRO stage."""
    state = ckpt.read_state(tag_dir)
    stage = state["config"]["deepspeed"]["zero_stage"]
    if stage == 0:
        module = ckpt.safe_load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import (  # heavy: optional DeepSpeed dependency, only for ZeRO 1-3
            get_fp32_state_dict_from_zero_checkpoint,
        )

        try:
            module = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except (RuntimeError, EOFError, ValueError, KeyError, OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            raise ckpt.CheckpointError(
                f"{tag_dir}: the ZeRO-{stage} shards do not load ({type(e).__name__}: {first}){ckpt._previous(tag_dir)}"
            ) from None
    return {k: (v.float() if v.is_floating_point() else v).detach().contiguous().clone() for k, v in module.items()}


def consolidate(checkpoint: str | Path, out: str | Path) -> Path:
    """Write ``out`` (safetensors) and ``<stem>.config.yaml`` from a checkpoint; returns ``out``."""
    tag_dir = resolve_tag_dir(checkpoint)
    ckpt.verify_files(tag_dir)  # the checksums state.json recorded at save time
    state = ckpt.read_state(tag_dir)
    cfg = from_dict(state["config"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = consolidated_state_dict(tag_dir)
    meta = {
        "step": str(state["step"]),
        "task": cfg.model.task,
        "modalities": json.dumps(state.get("modalities", [])),
        "source": str(tag_dir),
    }
    save_file(tensors, str(out), metadata=meta)
    save_resolved(cfg, config_path(out))
    if cfg.optim.ema:
        # the EMA weights with the same buffers, loadable exactly like the trained weights
        ema = {k: v.float().contiguous() for k, v in ckpt.read_ema(tag_dir).items()}
        save_file(tensors | ema, str(ema_path(out)), metadata=meta | {"weights": "ema"})
    return out


def ema_path(weights: str | Path) -> Path:
    weights = Path(weights)
    return weights.with_name(weights.stem + ".ema" + weights.suffix)


def config_path(weights: str | Path) -> Path:
    """``model.safetensors`` and ``model.ema.safetensors`` → ``model.config.yaml``."""
    weights = Path(weights)
    return weights.with_name(weights.stem.removesuffix(".ema") + ".config.yaml")


def weights_config(weights: str | Path) -> Config:
    """The resolved config written beside consolidated weights (``FileNotFoundError`` naming it when absent)."""
    cfg_path = config_path(weights)
    if not cfg_path.is_file():
        raise FileNotFoundError(
            f"{weights}: no config beside the weights (expected {cfg_path}, written by python -m jobs.consolidate)"
        )
    return load_config(cfg_path, [])


def read_weights(weights: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a file that does not parse is a CheckpointError naming it."""
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no such weights file")
    try:
        return load_file(str(weights), device=device)
    except Exception as e:  # noqa: BLE001 - SafetensorError (header / size mismatch), OSError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise ckpt.CheckpointError(
            f"{weights} is not a readable safetensors file: corrupt or truncated "
            f"({type(e).__name__}: {first}); re-create it with python -m jobs.consolidate"
        ) from None


def _weights_meta(weights: Path) -> dict[str, str]:
    try:
        with safe_open(str(weights), "pt") as f:
            return f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - SafetensorError (header / size mismatch), OSError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise ckpt.CheckpointError(
            f"{weights} is not a readable safetensors file: corrupt or truncated "
            f"({type(e).__name__}: {first}); re-create it with python -m jobs.consolidate"
        ) from None


def load_model(weights: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config]:
    """Rebuild the model from consolidated weights + config (strict: every key must match)."""
    weights = Path(weights)
    cfg = load_config(config_path(weights), [])
    specs = [(n, tuple(s), int(b)) for n, s, b in json.loads(_weights_meta(weights)["modalities"])]
    model = build_model(cfg, specs)
    model.load_state_dict(read_weights(weights, device=str(device)), strict=True)
    return model.to(device).eval(), cfg
