"""Where a model comes from: one consolidated weights file + its config (:class:`ModelSource`).

Three ways to name a model, used by evaluation, sampling, registration and batch prediction alike:

- consolidated weights ``model.safetensors`` (config beside it as ``model.config.yaml``), or a sweep's ``best.json``;
- a run directory, its ``checkpoints/`` directory or one checkpoint tag directory (any ZeRO stage): consolidated
  into a scratch directory first (the run directory is never written to);
- a registry URI ``models:/mango-<task>@<alias>`` or ``models:/mango-<task>/<version>``: the version's logged
  weights and config are downloaded.

Both :mod:`pipeline.evaluation` and :mod:`pipeline.tracking.registry` build on this module (neither imports the
other's resolution code).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from safetensors import safe_open

from pipeline.config import Config
from pipeline.tracking.pyfunc_model import ARTIFACT, WEIGHTS_FILE
from pipeline.tracking.store import client_for
from pipeline.train import checkpoint as ckpt
from pipeline.train.consolidate import consolidate, load_model, resolve_tag_dir, weights_config

MODELS_URI_PREFIX = "models:/"
_URI = re.compile(r"^models:/(?P<name>mango-[a-z]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))$")


@dataclass
class ModelSource:
    """Where a model came from. ``run_id``: the MLflow run that trained (or registered) it, if known."""

    weights: Path
    cfg: Config
    step: int | None = None
    run_id: str | None = None
    model_uri: str | None = None  # models:/... when resolved through the registry
    version: str | None = None  # registry version number
    origin: str = ""  # what the user passed, for messages and tags


def resolve_checkpoint(path: str | Path, scratch: str | Path) -> ModelSource:
    """Consolidated weights, a sweep's ``best.json``, or a run / checkpoints / tag directory (consolidated
    into ``scratch``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path}: no such file or directory")
    if path.suffix == ".json":  # a sweep's best.json (pipeline.sweep.write_best): its weights and trial run
        info = json.loads(path.read_text())
        if not info.get("weights"):
            raise ValueError(f"--checkpoint {path}: a JSON checkpoint must be a sweep's best.json with 'weights'")
        source = resolve_checkpoint(info["weights"], scratch)
        source.run_id = info.get("mlflow_run_id") or source.run_id
        source.step = info.get("step", source.step)
        source.origin = f"{path} ({info['weights']})"
        return source
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(
                f"--checkpoint {path}: expected consolidated weights (*.safetensors) or a run / checkpoint directory"
            )
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        step = int(meta["step"]) if meta.get("step", "").isdigit() else None
        run_id = None
        source = Path(meta.get("source", ""))
        # the training run's id lives in the checkpoint the weights came from, while it is still kept
        if meta.get("source") and (source / ckpt.COMPLETE).exists():
            run_id = ckpt.read_state(source).get("mlflow_run_id") or None
        return ModelSource(path, weights_config(path), step=step, run_id=run_id, origin=str(path))
    tag_dir = resolve_tag_dir(path)
    state = ckpt.read_state(tag_dir)
    weights = consolidate(tag_dir, Path(scratch) / "model.safetensors")
    return ModelSource(
        weights,
        weights_config(weights),
        step=int(state["step"]),
        run_id=state.get("mlflow_run_id") or None,
        origin=str(tag_dir),
    )


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/mango-<task>@<alias>`` → (name, alias, None); ``models:/mango-<task>/<n>`` → (name, None, n)."""
    m = _URI.match(uri or "")
    if m is None:
        raise ValueError(
            f"--model-uri {uri!r}: expected models:/mango-<task>@<alias> or models:/mango-<task>/<version>"
        )
    return m["name"], m["alias"], m["version"]


def resolve_model_uri(uri: str, scratch: str | Path, tracking_uri: str = "") -> ModelSource:
    """Download the weights + config of the version ``uri`` names into ``scratch`` → ModelSource."""
    name, alias, version = parse_model_uri(uri)
    client = client_for(tracking_uri)
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as e:
        raise LookupError(f"{uri}: not found in the registry at {client.tracking_uri} ({e.message})") from e
    # the version's own artifact location, resolved by this client: a models:/ URI would be resolved against
    # MLflow's process-global registry URI instead of ``tracking_uri``
    where = client.get_model_version_download_uri(name, mv.version)
    local = Path(download_artifacts(artifact_uri=where, dst_path=str(scratch), tracking_uri=client.tracking_uri))
    spec = Model.load(str(local)).flavors["python_function"]["artifacts"][ARTIFACT]
    weights = local / spec["path"] / WEIGHTS_FILE
    step = mv.tags.get("step")
    return ModelSource(
        weights,
        weights_config(weights),
        step=int(step) if step and step.isdigit() else None,
        run_id=mv.run_id or None,
        model_uri=uri,
        version=str(mv.version),
        origin=uri,
    )


def resolve_source(
    checkpoint: str | None, model_uri: str | None, scratch: str | Path, tracking_uri: str = ""
) -> ModelSource:
    """Exactly one of ``checkpoint`` / ``model_uri`` → :class:`ModelSource` (files under ``scratch``)."""
    if bool(checkpoint) == bool(model_uri):
        raise ValueError("give exactly one of --checkpoint PATH or --model-uri models:/mango-<task>@<alias>")
    if checkpoint:
        return resolve_checkpoint(checkpoint, scratch)
    return resolve_model_uri(model_uri, scratch, tracking_uri=tracking_uri)


def load_source(source: ModelSource, device: str | torch.device = "cpu") -> torch.nn.Module:
    model, _ = load_model(source.weights, device=device)
    return model
