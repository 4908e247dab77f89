"""The MLflow model registry for MANGO task models: register, gate, look up.

Names and aliases: every task has one registered model ``mango-<task>``; versions carry the aliases
``candidate`` (the newest registration) and ``champion`` (the one to serve). Registry stages are
deprecated in MLflow 3 and never used.

A version is tagged with (all strings):

- ``metric.<name>`` for every evaluation metric (``metric.val_bits_per_dim``, ``metric.val_miou`` …);
- ``eval.metric`` / ``eval.mode`` (the gate's metric on the evaluated split and its direction, from
  ``cfg.eval``), ``eval.split``, ``eval.shards``, ``eval.manifest_sha256`` (the evaluation manifest);
- ``data.train_manifest_sha256`` (the training data: the training run's tag, else the train manifest in
  ``cfg.data.shards``), ``git.commit`` (+ ``git.dirty``), ``weights.sha256``, ``step``, ``source``.

The gate (:func:`gate`): a candidate becomes champion only when there is no champion yet, or both were
evaluated on the *same* manifest with the same metric and the candidate's value is strictly better
(``min``: lower). Another manifest or metric is refused with the reason; a worse or equal value leaves the
champion where it is, saying why.

Lookups (:func:`resolve_model_uri`): ``models:/mango-<task>@<alias>`` or ``models:/mango-<task>/<version>``
→ the version's weights and config, downloaded into a scratch directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow.pyfunc
from mlflow.exceptions import MlflowException

import pipeline
from pipeline.config import architecture_keys
from pipeline.data import load_manifest, manifest_name
from pipeline.data.storage import join
from pipeline.evaluation import metric_for_split
from pipeline.model_source import (  # noqa: F401  (re-exported: lookups callers reach through the registry)
    ModelSource,
    parse_model_uri,
    resolve_checkpoint,
    resolve_model_uri,
    weights_config,
)
from pipeline.train.consolidate import config_path

from .pyfunc_model import ARTIFACT, WEIGHTS_FILE, MangoPyfuncModel, pip_requirements
from .serving import input_example, io_for_weights, signature
from .store import client_for, ensure_experiment, project_root

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from pipeline.evaluation import EvalResult

log = logging.getLogger(__name__)

CANDIDATE, CHAMPION = "candidate", "champion"
MODEL_PATH = "model"  # the pyfunc model's artifact path in its run
GIT_COMMIT_ENV = "MANGO_GIT_COMMIT"


def registered_name(task: str) -> str:
    return f"mango-{task}"


# -- lookups ----------------------------------------------------------------------------------------------


def source_from_run(run_id: str, scratch: str | Path, tracking_uri: str = "") -> ModelSource:
    """The newest complete checkpoint of the training run ``run_id`` (its ``run.dir`` tag)."""
    client = client_for(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise LookupError(f"--run-id {run_id}: no such run at {client.tracking_uri} ({e.message})") from e
    run_dir = run.data.tags.get("run.dir")
    if not run_dir:
        raise LookupError(f"run {run_id} has no run.dir tag (not a training run of this pipeline?)")
    source = resolve_checkpoint(run_dir, scratch)
    source.run_id = source.run_id or run_id
    return source


# -- registration -----------------------------------------------------------------------------------------


@dataclass
class GateDecision:
    promote: bool
    reason: str


@dataclass
class Registration:
    name: str
    version: str
    run_id: str
    tags: dict[str, str]
    gate: GateDecision | None = None  # None when --promote was not asked for


def git_commit() -> tuple[str, bool]:
    """(commit sha, dirty) of the project checkout; ``MANGO_GIT_COMMIT`` for an installed copy without .git."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV], False
    root = project_root()
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout.strip()
            != ""
        )
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"cannot read the git commit of {root} ({e}); set {GIT_COMMIT_ENV}=<sha>") from e
    return sha, dirty


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def train_manifest_sha256(source: ModelSource, client: MlflowClient | None) -> str:
    """What the model was trained on: the training run's tag when the run is known, else the manifest."""
    if source.run_id and client is not None:
        try:
            tag = client.get_run(source.run_id).data.tags.get("data.train_manifest_sha256")
        except MlflowException:
            tag = None
        if tag:
            return tag
    cfg = source.cfg
    url = join(cfg.data.shards, manifest_name(cfg.data.train_split))
    try:
        return load_manifest(url).manifest_checksum()
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"the training manifest {url} is gone and the training run is unknown: cannot "
            "tag the version with its training data"
        ) from e


def version_tags(source: ModelSource, result: EvalResult, train_sha: str) -> dict[str, str]:

    sha, dirty = git_commit()
    cfg = source.cfg
    tags = {f"metric.{k}": repr(float(v)) for k, v in result.metrics.items()}
    tags |= {
        "eval.metric": metric_for_split(cfg.eval.metric, result.split),
        "eval.mode": cfg.eval.mode,
        "eval.split": result.split,
        "eval.shards": result.shards,
        "eval.manifest_sha256": result.manifest_sha256,
        "data.train_manifest_sha256": train_sha,
        "git.commit": sha,
        "git.dirty": str(dirty).lower(),
        "weights.sha256": file_sha256(source.weights),
        "task": cfg.model.task,
        "source": source.origin,
    }
    if source.step is not None:
        tags["step"] = str(source.step)
    if tags["eval.metric"] not in result.metrics:
        raise ValueError(
            f"eval.metric={cfg.eval.metric!r} is not among the evaluation's metrics "
            f"{sorted(result.metrics)}; the gate could never compare this version"
        )
    return tags


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    """Create ``name`` unless it exists (safe when two registrations race)."""
    try:
        client.get_registered_model(name)
        return
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(name, description=f"MANGO {name.removeprefix('mango-')} models")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _logging_run(client: MlflowClient, source: ModelSource) -> str:
    """The training run when this store knows it (the model joins its lineage), else a new ``register`` run."""
    if source.run_id:
        try:
            client.get_run(source.run_id)
            return source.run_id
        except MlflowException:
            log.warning(
                "training run %s is not in %s; logging the model in a new run", source.run_id, client.tracking_uri
            )
    exp = ensure_experiment(client, source.cfg.tracking.experiment)
    tags = {"mango.job": "register", "mango.source": source.origin}
    if source.run_id:
        tags["mango.trained_in_run"] = source.run_id
    return client.create_run(exp, run_name=f"register-{source.cfg.model.task}", tags=tags).info.run_id


def stage_code(tmp: str | Path) -> Path:
    """A clean copy of the ``pipeline`` package under ``tmp`` (no caches, no built libraries) for the
    model's ``code_paths``: the model carries the code it was logged with."""
    src = Path(pipeline.__file__).resolve().parent
    dst = Path(tmp) / "code" / "pipeline"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", ".*"))
    return dst


def pyfunc_arguments(weights: str | Path, tmp: str | Path, input_example=None) -> dict:
    """The ``mlflow.pyfunc.log_model`` / ``save_model`` arguments for consolidated ``weights``: the
    :class:`~pipeline.tracking.pyfunc_model.MangoPyfuncModel`, an artifact directory (weights + config,
    staged under ``tmp``), the ``pipeline`` package as ``code_paths``, the task's signature (inputs, outputs,
    params; :mod:`pipeline.tracking.serving`), ``input_example`` when given, and explicit pip requirements
    (no inference subprocess)."""
    bundle = Path(tmp) / ARTIFACT
    bundle.mkdir(parents=True)
    shutil.copy2(weights, bundle / WEIGHTS_FILE)
    shutil.copy2(config_path(weights), bundle / "model.config.yaml")
    io = io_for_weights(weights)
    args = {
        "python_model": MangoPyfuncModel(),
        "artifacts": {ARTIFACT: str(bundle)},
        "code_paths": [str(stage_code(tmp))],
        "pip_requirements": pip_requirements(text=any(f.kind == "text" for f in io.inputs)),
        "signature": signature(io),
        "metadata": {"mango": io.describe(), "architecture": architecture(weights_config(weights))},
    }
    if input_example is not None:
        args["input_example"] = input_example
    return args


def architecture(cfg) -> dict:
    """The model's architecture-fixing config fields (``arch=True`` in the schema), as logged with the model."""
    return {key: getattr(cfg.model, key) for key in architecture_keys()}


def example_for(weights: str | Path, shards: str, split: str, n: int = 2):
    """An input example from the first ``n`` held-out samples of ``split`` (density: dequantised by key)."""
    return input_example(io_for_weights(weights), shards, split, n)


def register(source: ModelSource, result: EvalResult, *, tracking_uri: str = "", promote: bool = False) -> Registration:
    """Log ``source`` as a pyfunc model, register a new ``mango-<task>`` version tagged as above, point
    ``candidate`` at it and, with ``promote``, move ``champion`` when :func:`gate` allows it."""
    client = client_for(tracking_uri)
    name = registered_name(source.cfg.model.task)
    tags = version_tags(source, result, train_manifest_sha256(source, client))
    run_id = _logging_run(client, source)
    # saved locally, uploaded with the client and registered from the run's artifacts: MLflow's fluent
    # log_model would need the process-global tracking URI (set_tracking_uri also exports
    # MLFLOW_TRACKING_URI to every later subprocess)
    with tempfile.TemporaryDirectory(prefix="mango-register-") as tmp:
        local = Path(tmp) / "model"
        example = example_for(source.weights, result.shards, result.split)
        mlflow.pyfunc.save_model(str(local), **pyfunc_arguments(source.weights, Path(tmp) / "staging", example))
        client.log_artifacts(run_id, str(local), MODEL_PATH)
    artifact_uri = client.get_run(run_id).info.artifact_uri
    _ensure_registered_model(client, name)
    mv = client.create_model_version(name, f"{artifact_uri}/{MODEL_PATH}", run_id=run_id, tags=tags)
    client.set_registered_model_alias(name, CANDIDATE, mv.version)
    decision = None
    if promote:
        decision = gate(client, name, str(mv.version))
        if decision.promote:
            client.set_registered_model_alias(name, CHAMPION, mv.version)
    return Registration(name, str(mv.version), run_id, tags, decision)


def gate(client: MlflowClient, name: str, version: str) -> GateDecision:
    """May ``version`` of ``name`` become champion? (see the module docstring)."""
    cand = client.get_model_version(name, version)
    aliases = client.get_registered_model(name).aliases
    if CHAMPION not in aliases:
        return GateDecision(True, f"no {CHAMPION} yet: version {version} becomes {CHAMPION}")
    champ_version = str(aliases[CHAMPION])
    if champ_version == str(version):
        return GateDecision(False, f"version {version} already is {CHAMPION}")
    champ = client.get_model_version(name, champ_version)
    ct, pt = cand.tags, champ.tags
    if ct.get("eval.manifest_sha256") != pt.get("eval.manifest_sha256"):
        return GateDecision(
            False,
            (
                f"refused: version {version} was evaluated on manifest {ct.get('eval.manifest_sha256')} "
                f"({ct.get('eval.shards')} split {ct.get('eval.split')}) but {CHAMPION} version {champ_version} on "
                f"{pt.get('eval.manifest_sha256')} ({pt.get('eval.shards')} split {pt.get('eval.split')}); metrics on "
                "different evaluation data are not comparable — evaluate on the champion's manifest"
            ),
        )
    metric, mode = ct.get("eval.metric"), ct.get("eval.mode")
    if metric != pt.get("eval.metric") or mode != pt.get("eval.mode"):
        return GateDecision(
            False,
            (
                f"refused: version {version} is gated on {metric} ({mode}) but {CHAMPION} "
                f"version {champ_version} on {pt.get('eval.metric')} ({pt.get('eval.mode')})"
            ),
        )
    missing = [
        f"version {v} ({role})"
        for v, role, t in ((version, "candidate", ct), (champ_version, CHAMPION, pt))
        if f"metric.{metric}" not in t
    ]
    if missing:
        return GateDecision(False, f"refused: no metric.{metric} tag on {' and '.join(missing)}")
    new, old = float(ct[f"metric.{metric}"]), float(pt[f"metric.{metric}"])
    better = new < old if mode == "min" else new > old
    verdict = "better" if better else ("equal" if new == old else "worse")
    reason = (
        f"{metric} ({mode}) {new:.6g} vs {CHAMPION} version {champ_version} {old:.6g} on the same manifest: {verdict}"
    )
    if better:
        return GateDecision(True, f"{reason}; version {version} becomes {CHAMPION}")
    return GateDecision(False, f"{reason}; {CHAMPION} stays at version {champ_version}")
