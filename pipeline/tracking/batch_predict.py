"""Batch scoring: stream a split's WebDataset shards through a registered model, write predictions as shards.

:func:`predict_split` is what ``python -m jobs.predict`` runs. The unit of work is one input shard: a
:class:`ShardScorer` reads it in key order, cuts it into batches of ``batch_size`` samples, runs the model's
pyfunc ``predict`` on each batch and writes one output shard with the *same name* and the *same keys*
(members ``<key>.<output>.npy``: ``bits_per_dim`` for density — per sample, the basis of anomaly
scores —, ``pred`` for segmentation / translation, ``probs`` for classification). Shards are written like
``jobs.shard`` writes them (byte-deterministic tars, staged then published, S3 read back) and the split's
``manifest-<split>.json`` comes last, built with the same :class:`~pipeline.data.manifest.ShardManifest`
code: per-shard counts, sha256 and key ranges; ``source_config`` names the model (URI, registered name,
version, run id, task) and the input manifest's checksum (``args`` holds how the job ran: engine, batch
size, actors — not part of the manifest checksum).

Engines: ``local`` — in this process, shard after shard, with a progress bar; ``ray`` — Ray Data
``map_batches`` over an actor pool (``ActorPoolStrategy``): each actor builds one :class:`ShardScorer`
(the model is downloaded and loaded once per actor) and scores whole shards, so a shard is batched exactly
as the local engine batches it. Outputs are deterministic per sample key: the density task's dequantisation
noise is drawn from a generator seeded by (key, modality) (:func:`pipeline.tracking.serving.dequantise`), so
local and Ray runs (at the same intra-op thread count) write equal shards, key by key and byte for byte.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from pipeline.data import ShardInfo, ShardManifest, load_manifest, manifest_name, storage
from pipeline.data.manifest import ModalitySpec
from pipeline.data.storage import register_webdataset_s3
from pipeline.data.writer import encode_sample, staged_shard
from pipeline.tasks import get_task

from .serving import Field, ModelIO, io_for_weights, request_from_samples

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")


class InputError(ValueError):
    """A bad argument or input found before any heavy work (``jobs.predict`` exits 2 with the message)."""


@dataclass(frozen=True)
class RegisteredModel:
    """A registry version resolved from ``models:/…`` (picklable: shipped to Ray actors)."""

    uri: str
    name: str
    version: str
    run_id: str
    download_uri: str
    tracking_uri: str
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def task(self) -> str:
        return self.metadata.get("task") or self.name.removeprefix("mango-")


def resolve_registered(uri: str, tracking_uri: str = "") -> RegisteredModel:
    """Look ``uri`` up in the registry and read its MLmodel (a few KB): InputError when it is not there."""
    from mlflow.artifacts import download_artifacts  # heavy: optional tracking dependency
    from mlflow.exceptions import MlflowException  # heavy: optional tracking dependency

    from .registry import client_for, parse_model_uri  # heavy: the registry imports MLflow

    try:
        name, alias, version = parse_model_uri(uri)
    except ValueError as e:
        raise InputError(str(e).replace("--model-uri", "--model")) from e
    client = client_for(tracking_uri)
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        where = client.get_model_version_download_uri(name, mv.version)
    except MlflowException as e:
        raise InputError(f"--model {uri}: not found in the registry at {client.tracking_uri} ({e.message})") from e
    except Exception as e:  # noqa: BLE001 - an unreachable server is a bad input here, not a crash
        raise InputError(f"--model {uri}: cannot reach the registry at {client.tracking_uri} ({e})") from e
    quiet = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # a progress bar for one small file would precede errors
    saved = os.environ.get(quiet)
    os.environ[quiet] = "false"
    with tempfile.TemporaryDirectory(prefix="mango-mlmodel-") as tmp:
        try:
            path = download_artifacts(
                artifact_uri=f"{where.rstrip('/')}/MLmodel", dst_path=tmp, tracking_uri=client.tracking_uri
            )
        except Exception as e:  # noqa: BLE001
            raise InputError(f"--model {uri}: version {mv.version} has no readable MLmodel at {where} ({e})") from e
        finally:
            if saved is None:
                os.environ.pop(quiet, None)
            else:
                os.environ[quiet] = saved
        meta = (yaml.safe_load(Path(path).read_text()) or {}).get("metadata") or {}
    return RegisteredModel(
        uri, name, str(mv.version), mv.run_id or "", where, client.tracking_uri, dict(meta.get("mango") or {})
    )


def _batched_shape(spec) -> tuple[int, ...]:
    """A manifest modality's per-sample shape as the loader batches it ((H, W, C) images → (C, H, W))."""
    shape = tuple(spec.shape or ())
    if spec.kind in ("image", "depth") and len(shape) in (2, 3):
        return (shape[2] if len(shape) == 3 else 1, shape[0], shape[1])
    return shape


def check_inputs(model: RegisteredModel, manifest) -> None:
    """The model's inputs (MLmodel metadata) against the input manifest's modalities: InputError naming
    what is missing or shaped differently."""
    inputs = model.metadata.get("inputs")
    if not inputs:
        raise InputError(
            f"--model {model.uri}: version {model.version} was registered without the input layout "
            "(re-register it with this version of jobs.register)"
        )
    where = manifest.location
    missing = [k for k in inputs if k not in manifest.modalities]
    if missing:
        raise InputError(
            f"--shards {where}: the model reads {sorted(inputs)} but the shards hold "
            f"{sorted(manifest.modalities)} (missing {missing})"
        )
    for key, want in inputs.items():
        spec = manifest.modalities[key]
        if want.get("kind") == "text":
            if spec.dtype != "str":
                raise InputError(f"--shards {where}: {key} is {spec.dtype}, the model reads text")
            continue
        got = _batched_shape(spec)
        if list(got) != list(want["shape"][1:]):
            raise InputError(
                f"--shards {where}: {key} is {list(got)} per sample, the model reads {list(want['shape'][1:])}"
            )


# -- one shard ----------------------------------------------------------------------------------------------


def output_modalities(io, input_manifest) -> dict[str, Any]:
    """ModalitySpecs of the prediction members (``<output>.npy``)."""
    member = get_task(io.task).prediction_member(input_manifest)  # kind, classes / quantisation
    return {f"{name}.npy": ModalitySpec(dtype, shape=shape, **member) for name, dtype, shape in io.outputs}


class ShardScorer:
    """Scores whole shards with one loaded model (a Ray Data actor, or the local engine's only instance).

    ``__call__`` is the ``map_batches`` entry point: a batch of shard rows (``url``, ``name``) → one receipt
    row per shard (name, samples, sha256, size, first/last key, skipped)."""

    def __init__(
        self, model: RegisteredModel, input_manifest_url: str, out: str, batch_size: int, threads: int = 0
    ) -> None:
        import mlflow.pyfunc  # heavy: optional tracking dependency
        from mlflow.artifacts import download_artifacts  # heavy: optional tracking dependency

        from .pyfunc_model import ARTIFACT, WEIGHTS_FILE  # heavy: the pyfunc wrapper imports MLflow

        if threads:
            torch.set_num_threads(threads)
        self.manifest = load_manifest(input_manifest_url)
        self.out, self.batch_size = out, batch_size
        self._tmp = tempfile.TemporaryDirectory(prefix="mango-predict-model-")
        local = download_artifacts(
            artifact_uri=model.download_uri, dst_path=self._tmp.name, tracking_uri=model.tracking_uri
        )
        self.pyfunc = mlflow.pyfunc.load_model(local)
        self.io = io_for_weights(Path(local) / "artifacts" / ARTIFACT / WEIGHTS_FILE)
        self.modalities = output_modalities(self.io, self.manifest)
        self.keys = [f.key for f in self.io.inputs]

    def _samples(self, url: str, skipped: list[dict[str, str]]) -> Iterator[dict[str, Any]]:
        from webdataset.tariterators import tarfile_samples  # heavy: the shard reader (webdataset)

        from pipeline.data.stream import decode_sample  # heavy: imports webdataset

        register_webdataset_s3()
        errors: list[Exception] = []

        def handler(exc: Exception) -> bool:
            errors.append(exc)
            return True

        for raw in tarfile_samples(iter([{"url": url}]), handler=handler):
            key = raw.get("__key__", "?")
            missing = [k for k in self.keys if k not in raw]
            if missing:
                skipped.append({"key": key, "error": f"missing {missing}"})
                continue
            try:
                yield decode_sample(
                    {k: v for k, v in raw.items() if k in self.keys or k.startswith("__")}, self.manifest.modalities
                )
            except (ValueError, OSError) as e:
                skipped.append({"key": key, "error": str(e)})
        if errors:
            raise OSError(f"{url}: corrupt or unreadable shard ({errors[0]})")

    def _batches(self, url: str, skipped: list) -> Iterator[list[dict[str, Any]]]:
        batch: list[dict[str, Any]] = []
        for sample in self._samples(url, skipped):
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def score(self, url: str, name: str, on_samples: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Score one input shard into ``<out>/<name>``; returns its receipt."""
        skipped: list[dict[str, str]] = []
        with staged_shard(self.out, name) as shard:
            for batch in self._batches(url, skipped):
                got = self.pyfunc.predict(request_from_samples(batch, self.io))
                for i, sample in enumerate(batch):
                    key = sample["__key__"]
                    values = {f"{n}.npy": np.asarray(got[n][i], dtype=d) for n, d, _ in self.io.outputs}
                    shard.add(key, encode_sample(values, self.modalities, f"{url}:{key}"))
                if on_samples is not None:
                    on_samples(len(batch))
        keys, sha, size = shard.keys, shard.sha256, shard.size
        return {
            "name": name,
            "samples": len(keys),
            "sha256": sha if keys else "",
            "size": size if keys else 0,
            "first_key": keys[0] if keys else "",
            "last_key": keys[-1] if keys else "",
            "skipped": skipped,
        }

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, list]:
        receipts = [self.score(str(u), str(n)) for u, n in zip(rows["url"], rows["name"])]
        return {"receipt": [json.dumps(r) for r in receipts]}


# -- a split ------------------------------------------------------------------------------------------------


@dataclass
class PredictResult:
    manifest: Any  # ShardManifest of the predictions
    model: RegisteredModel
    input_manifest_sha256: str
    engine: str


def _run_local(model, manifest, out, batch_size, threads, progress) -> list[dict[str, Any]]:
    scorer = ShardScorer(model, manifest.location, out, batch_size, threads)
    bar = tqdm(
        total=manifest.total_samples,
        unit="sample",
        desc=f"predict {manifest.split}",
        disable=not progress,
        dynamic_ncols=True,
    )
    try:
        return [
            scorer.score(url, s.name, on_samples=bar.update) for url, s in zip(manifest.shard_urls(), manifest.shards)
        ]
    finally:
        bar.close()


def _run_ray(model, manifest, out, batch_size, threads, actors, progress) -> list[dict[str, Any]]:
    import ray  # heavy: optional distributed engine

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    rows = [{"url": u, "name": s.name} for u, s in zip(manifest.shard_urls(), manifest.shards)]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    scored = ds.map_batches(
        ShardScorer,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(actors, len(rows))),
        fn_constructor_kwargs={
            "model": model,
            "input_manifest_url": manifest.location,
            "out": out,
            "batch_size": batch_size,
            "threads": threads,
        },
        num_cpus=max(threads, 1),
    )
    receipts = []
    with tqdm(total=len(rows), unit="shard", desc=f"predict {manifest.split} (ray)", disable=not progress) as bar:
        for row in scored.iter_rows():
            receipts.append(json.loads(row["receipt"]))
            bar.update(1)
    return receipts


def check_output(out: str, split: str, input_location: str, overwrite: bool) -> None:
    if storage.is_s3(out):
        bucket = out[len("s3://") :].split("/", 1)[0]
        if not bucket:
            raise InputError(f"--out {out}: no bucket")
        try:
            ok = storage.exists(f"s3://{bucket}")
        except Exception as e:  # noqa: BLE001
            raise InputError(f"--out {out}: cannot reach the bucket ({e})") from e
        if not ok:
            raise InputError(f"--out {out}: bucket {bucket} does not exist")
    elif os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out}: exists and is not a directory")
    if storage.parent(input_location).rstrip("/") == (out.rstrip("/") if storage.is_s3(out) else os.path.abspath(out)):
        raise InputError(f"--out {out}: is the input shard store; write predictions elsewhere")
    if not overwrite and storage.exists(storage.join(out, manifest_name(split))):
        raise InputError(f"--out {out}: already holds {manifest_name(split)} (pass --overwrite to replace it)")


def predict_split(
    model: RegisteredModel,
    manifest,
    out: str,
    *,
    batch_size: int = 64,
    engine: str = "local",
    actors: int = 2,
    threads: int = 0,
    progress: bool = True,
) -> PredictResult:
    """Score every listed shard of ``manifest`` with ``model`` into ``out``; commit the manifest last."""
    storage.makedirs(out)
    if engine == "ray":
        receipts = _run_ray(model, manifest, out, batch_size, threads, actors, progress)
    else:
        receipts = _run_local(model, manifest, out, batch_size, threads, progress)
    receipts.sort(key=lambda r: r["name"])
    shards = [
        ShardInfo(r["name"], r["samples"], r["sha256"], r["size"], r["first_key"], r["last_key"], len(r["skipped"]))
        for r in receipts
        if r["samples"] > 0
    ]
    skipped = [s for r in receipts for s in r["skipped"]]
    if not shards:
        raise ValueError(f"{manifest.location}: no sample could be scored ({len(skipped)} skipped)")
    input_sha = manifest.manifest_checksum()
    out_modalities = _output_modalities_from_metadata(model, manifest)
    result = ShardManifest(
        dataset=f"{manifest.dataset}-predictions",
        split=manifest.split,
        modalities=out_modalities,
        samples_per_shard=manifest.samples_per_shard,
        shards=shards,
        total_samples=sum(s.samples for s in shards),
        skipped_samples=len(skipped),
        skipped=skipped,
        source_config={
            "model": model.uri,
            "model_name": model.name,
            "model_version": model.version,
            "model_run_id": model.run_id,
            "task": model.task,
            "input_manifest": manifest.location,
            "input_manifest_sha256": input_sha,
            "input_dataset": manifest.dataset,
            "dequantisation": get_task(model.task).prediction_dequantisation,
        },
        args={
            "engine": engine,
            "batch_size": batch_size,
            "actors": actors if engine == "ray" else 1,
            "threads": threads,
        },
        location=storage.join(out, manifest_name(manifest.split)),
    )
    result.validate()
    storage.write_bytes_atomic(result.location, result.to_json().encode())
    return PredictResult(result, model, input_sha, engine)


def _output_modalities_from_metadata(model: RegisteredModel, manifest) -> dict[str, Any]:
    """The prediction members' specs from the MLmodel metadata (what the scorers wrote)."""
    outputs = tuple((n, o["dtype"], tuple(o["shape"][1:])) for n, o in model.metadata["outputs"].items())
    io = ModelIO(
        model.task,
        tuple(
            Field(k, v.get("kind", ""), v["dtype"], tuple(v["shape"][1:])) for k, v in model.metadata["inputs"].items()
        ),
        outputs,
    )
    return output_modalities(io, manifest)
