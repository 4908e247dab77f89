"""What a registered MANGO model takes and returns over HTTP: its signature, an input example, request checks.

Everything here is derived from the consolidated weights alone (their metadata lists the modality specs,
the config sits beside them), so registration, the pyfunc wrapper and :mod:`jobs.predict` agree.

Inputs per task (a free batch dimension ``-1`` first; C, H, W are the trained sizes):

| task | inputs | outputs |
|---|---|---|
| density | every modality, ``float32 (-1, C, H, W)`` already dequantised: ``(v + u) / 2^bits - 1/2`` in [-1/2, 1/2) | ``bits_per_dim float64 (-1,)`` |
| segmentation | each input image, ``uint8`` (8-bit) / ``uint16`` (16-bit depth, mm) ``(-1, C, H, W)`` | ``pred int64 (-1, H, W)`` |
| translation | the same | ``pred float32 (-1, C, H, W)`` in [0, 1] |
| classification | columns: images as nested lists ``(C, H, W)`` of ints, text as a string | ``probs float32 (-1, K)`` |

Tensor inputs make a tensor schema (request ``{"inputs": {"rgb.png": [...], ...}}``); a text input makes a
column schema (MLflow refuses to mix tensor and column specs; request ``{"dataframe_records": [...]}``).
A request that does not fit gets :class:`~mlflow.exceptions.MlflowException` with ``INVALID_PARAMETER_VALUE``
(HTTP 400) naming the field — from MLflow's own schema check, or from :func:`to_batch` for what a schema
cannot say (shapes of column cells, value ranges).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from pipeline.data import load_manifest, manifest_name
from pipeline.data.storage import join, register_webdataset_s3
from pipeline.tasks import get_task
from pipeline.train.consolidate import weights_config

#: params accepted at inference time (MLflow drops params a signature does not declare)
PREDICT_PARAMS = {"mode": "predict", "n": 4, "temperature": 1.0, "seed": 0}
_PARAM_TYPES = {"mode": "string", "n": "long", "temperature": "double", "seed": "long"}


@dataclass(frozen=True)
class Field:
    """One request field: its sample key, kind (``image`` | ``dequantised`` | ``text``), numpy dtype and
    per-sample shape (``()`` for text), and ``bits`` of the stored integer image."""

    key: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    bits: int = 0


@dataclass(frozen=True)
class ModelIO:
    """A task model's request and response layout (see the module table)."""

    task: str
    inputs: tuple[Field, ...]
    outputs: tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, numpy dtype, per-sample shape)

    @property
    def columns(self) -> bool:
        """Column schema (a text input) rather than named tensors."""
        return any(f.kind == "text" for f in self.inputs)

    def describe(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "inputs": {f.key: {"dtype": f.dtype, "shape": [-1, *f.shape], "kind": f.kind} for f in self.inputs},
            "outputs": {n: {"dtype": d, "shape": [-1, *s]} for n, d, s in self.outputs},
        }


def weights_specs(weights: str | Path) -> list[tuple[str, tuple[int, ...], int]]:
    """(sample key, batched shape, bits) per modality, from the consolidated weights' metadata."""
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata() or {}
    if "modalities" not in meta:
        raise ValueError(f"{weights}: no modality specs in the metadata (not written by jobs.consolidate?)")
    return [(n, tuple(s), int(b)) for n, s, b in json.loads(meta["modalities"])]


def model_io(cfg, specs: list[tuple[str, tuple[int, ...], int]]) -> ModelIO:
    """The request / response layout of the model ``cfg`` + ``specs`` build (no model needed)."""
    fields, outputs = get_task(cfg.model.task).io(cfg, specs)  # the task's request fields and outputs
    return ModelIO(cfg.model.task, tuple(Field(*f) for f in fields), tuple(outputs))


def io_for_weights(weights: str | Path) -> ModelIO:
    return model_io(weights_config(weights), weights_specs(weights))


def signature(io: ModelIO | None = None):
    """The MLflow signature: ``io``'s inputs and outputs (see the module docstring) and the predict params.
    ``io=None``: params only (no input schema)."""
    from mlflow.models.signature import ModelSignature  # heavy: optional tracking dependency
    from mlflow.types.schema import (  # heavy: optional tracking dependency
        Array,
        ColSpec,
        DataType,
        ParamSchema,
        ParamSpec,
        Schema,
        TensorSpec,
    )

    params = ParamSchema([ParamSpec(k, _PARAM_TYPES[k], v) for k, v in PREDICT_PARAMS.items()])
    if io is None:
        return ModelSignature(inputs=None, outputs=None, params=params)
    outputs = Schema([TensorSpec(np.dtype(d), (-1, *s), n) for n, d, s in io.outputs])
    if io.columns:
        cols = []
        for f in io.inputs:
            if f.kind == "text":
                cols.append(ColSpec(DataType.string, f.key))
            else:
                t: Any = DataType.long
                for _ in f.shape:
                    t = Array(t)
                cols.append(ColSpec(t, f.key))
        inputs = Schema(cols)
    else:
        inputs = Schema([TensorSpec(np.dtype(f.dtype), (-1, *f.shape), f.key) for f in io.inputs])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


# -- requests -----------------------------------------------------------------------------------------------


def invalid(message: str):
    from mlflow.exceptions import MlflowException  # heavy: optional tracking dependency
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE  # heavy: optional tracking dependency

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _column_array(values: Any, f: Field, n: int) -> np.ndarray:
    cells = []
    for i, v in enumerate(values):
        a = np.asarray(v)
        if a.shape != f.shape:
            raise invalid(f"input '{f.key}' row {i}: shape {list(a.shape)}, expected {list(f.shape)}")
        cells.append(a)
    return np.stack(cells) if cells else np.zeros((0, *f.shape), dtype=f.dtype)


def _dequantised_tensor(a: np.ndarray, f: Field) -> torch.Tensor:
    """A density request field: float values already dequantised into [-1/2, 1/2) (``invalid`` otherwise)."""
    if a.dtype.kind != "f":
        raise invalid(
            f"input '{f.key}': expected float32 values already dequantised into [-0.5, 0.5) "
            f"((v + u) / 2^{f.bits} - 0.5), got {a.dtype}"
        )
    a = a.astype(np.float32, copy=False)
    if a.size and not (np.isfinite(a).all() and a.min() >= -0.5 and a.max() < 0.5):
        raise invalid(
            f"input '{f.key}': values must be finite and inside [-0.5, 0.5) (dequantised "
            f"(v + u) / 2^{f.bits} - 0.5); got min {float(np.nanmin(a)):.4g}, max "
            f"{float(np.nanmax(a)):.4g}"
        )
    return torch.from_numpy(np.ascontiguousarray(a))


def _image_tensor(a: np.ndarray, f: Field) -> torch.Tensor:
    """An integer image request field in [0, 2^bits - 1], in the loader's dtype (``invalid`` otherwise)."""
    if a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and a.size and np.all(np.mod(a, 1) == 0):
            a = a.astype(np.int64)
        else:
            raise invalid(f"input '{f.key}': expected integer pixel values ({f.dtype}), got {a.dtype}")
    hi = 2**f.bits - 1
    if a.size and (a.min() < 0 or a.max() > hi):
        raise invalid(
            f"input '{f.key}': pixel values must lie in [0, {hi}] ({f.dtype}); got [{int(a.min())}, {int(a.max())}]"
        )
    # the loader's dtypes: uint8 images; 16-bit depth as int32 (torch has no uint16 arithmetic)
    return torch.from_numpy(np.ascontiguousarray(a.astype(np.uint8 if f.bits == 8 else np.int32, copy=False)))


def to_batch(model_input: Any, io: ModelIO) -> dict[str, Any]:
    """A request (dict of arrays, or a DataFrame for a column schema) → the model's batch of tensors.

    Checks what MLflow's schema check does not (it runs first when the model has a signature): every field
    present, per-sample shapes, integer ranges, dequantised values inside [-1/2, 1/2), equal batch sizes.
    Raises :func:`invalid` naming the field.
    """
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # a pandas DataFrame
        model_input = {c: list(model_input[c]) for c in model_input.columns}
    if not isinstance(model_input, Mapping):
        raise invalid(
            f"mango-{io.task} takes named inputs {[f.key for f in io.inputs]}; got {type(model_input).__name__}"
        )
    missing = [f.key for f in io.inputs if f.key not in model_input]
    if missing:
        raise invalid(f"missing input(s) {missing}; mango-{io.task} takes {[f.key for f in io.inputs]}")
    batch: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    for f in io.inputs:
        value = model_input[f.key]
        if f.kind == "text":
            texts = list(value) if not isinstance(value, str) else [value]
            bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
            if bad:
                raise invalid(f"input '{f.key}' row {bad[0]}: expected a string, got {type(texts[bad[0]]).__name__}")
            batch[f.key], sizes[f.key] = texts, len(texts)
            continue
        if isinstance(value, np.ndarray) and value.dtype != object:
            a = value
        else:
            a = _column_array(list(value), f, 0)
        if a.ndim != len(f.shape) + 1 or tuple(a.shape[1:]) != f.shape:
            raise invalid(f"input '{f.key}': shape {list(a.shape)}, expected {[-1, *f.shape]}")
        t = _dequantised_tensor(a, f) if f.kind == "dequantised" else _image_tensor(a, f)
        batch[f.key], sizes[f.key] = t, a.shape[0]
    if len(set(sizes.values())) > 1:
        raise invalid(f"inputs disagree on the batch size: {sizes}")
    return batch


# -- dequantisation seeded by sample key, input examples ---------------------------------------------------


def key_seed(key: str) -> int:
    """A 63-bit seed from a sample key (stable across processes and machines, unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little") >> 1


def dequantise(images: np.ndarray | Any, bits: int, keys: list[str], modality: str) -> np.ndarray:
    """Integer images (N, C, H, W) → ``(v + u) / 2^bits - 1/2`` float32, the uniform noise ``u`` of sample
    ``keys[i]`` drawn from a generator seeded by (key, modality): the same key gets the same input on every
    machine, process, batch composition and engine (local or Ray)."""
    v = torch.as_tensor(np.asarray(images)).to(torch.float64)
    out = torch.empty(v.shape, dtype=torch.float64)
    for i, key in enumerate(keys):
        g = torch.Generator().manual_seed(key_seed(f"{key}/{modality}"))
        out[i] = (v[i] + torch.rand(v.shape[1:], generator=g, dtype=torch.float64)) / 2**bits - 0.5
    # (v + u)/2^bits - 1/2 < 1/2 in float64; the float32 rounding of values next to 1/2 is clamped below it
    return out.float().clamp_(max=float(np.nextafter(np.float32(0.5), np.float32(0)))).numpy()


def request_from_samples(samples: list[dict[str, Any]], io: ModelIO) -> Any:
    """Decoded samples (the loader's layout: images (C, H, W) tensors, text str, ``__key__``) → the model
    input: a dict of arrays (tensor schema; density dequantised by key) or a DataFrame (column schema)."""
    keys = [s["__key__"] for s in samples]
    out: dict[str, Any] = {}
    for f in io.inputs:
        if f.kind == "text":
            out[f.key] = [s[f.key] for s in samples]
            continue
        a = np.stack([np.asarray(s[f.key]) for s in samples])
        if f.kind == "dequantised":
            out[f.key] = dequantise(a, f.bits, keys, f.key)
        else:
            out[f.key] = a.astype(f.dtype)
    if io.columns:
        import pandas as pd  # heavy: only for column (text) requests

        return pd.DataFrame({k: (v if isinstance(v, list) else [x.tolist() for x in v]) for k, v in out.items()})
    return out


def read_samples(shards: str, split: str, keys: list[str], n: int) -> list[dict[str, Any]]:
    """The first ``n`` samples of ``split`` (in shard and key order), decoded, with only ``keys``."""
    from webdataset.tariterators import tarfile_samples  # heavy: the shard reader, never on a serving host

    from pipeline.data.stream import decode_sample  # heavy: imports webdataset, never on a serving host

    manifest = load_manifest(join(shards, manifest_name(split)))
    register_webdataset_s3()
    got: list[dict[str, Any]] = []
    for url in manifest.shard_urls():
        for raw in tarfile_samples(iter([{"url": url}])):
            sample = decode_sample(
                {k: v for k, v in raw.items() if k in keys or k.startswith("__")}, manifest.modalities
            )
            got.append(sample)
            if len(got) == n:
                return got
    return got


def input_example(io: ModelIO, shards: str, split: str, n: int = 2) -> Any:
    """A request built from the first ``n`` held-out samples of ``split`` (density: dequantised by key)."""
    samples = read_samples(shards, split, [f.key for f in io.inputs], n)
    if not samples:
        raise ValueError(f"{shards} split {split!r}: no samples to build an input example from")
    return request_from_samples(samples, io)
