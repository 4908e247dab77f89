"""The MLflow pyfunc wrapper of a MANGO task model: ``mlflow.pyfunc.load_model(uri).predict(...)``.

The logged model holds one artifact directory ``model/`` with ``model.safetensors`` (fp32 weights and
buffers; modality specs in its metadata) and ``model.config.yaml`` (the resolved config).
:meth:`MangoPyfuncModel.load_context` rebuilds the model with :func:`pipeline.train.consolidate.load_model`,
so loading needs only this project installed (the class is pickled by reference to this module).

``predict(model_input, params=None)``:

- ``model_input``: ``{sample key: array}`` in the loader's batch layout — images (N, C, H, W) integer
  (``uint8``; depth ``uint16``/``int32`` in mm) or, for density, floats already dequantised into the flow's
  space ``(v + u)/2^bits − 1/2`` (then no noise is drawn and the result is deterministic); text as a
  list of str. Arrays become tensors unchanged (no rescaling).
- ``params["mode"]``: ``"predict"`` (default) runs the task — density → ``{"bits_per_dim": (N,)}``;
  segmentation → ``{"pred": (N, H, W) int64}``; translation → ``{"pred": (N, C, H, W)}`` in [0, 1];
  classification → ``{"probs": (N, K)}``. ``"sample"`` (density only) → ``{modality: (N, C, H, W)}``
  integer images of ``params["n"]`` joint samples at ``params["temperature"]``, drawn after
  ``torch.manual_seed(params["seed"])``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

ARTIFACT = "model"  # the artifact directory's name inside the logged model
WEIGHTS_FILE = "model.safetensors"

PREDICT_PARAMS = {"mode": "predict", "n": 4, "temperature": 1.0, "seed": 0}


def signature():
    """No input schema (inputs are dicts of arrays of task-dependent shapes); the params above, which MLflow
    otherwise drops at inference time."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    types = {"mode": "string", "n": "long", "temperature": "double", "seed": "long"}
    return ModelSignature(inputs=None, outputs=None,
                          params=ParamSchema([ParamSpec(k, types[k], v) for k, v in PREDICT_PARAMS.items()]))


def _tensor(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype == np.uint16:  # torch has no arithmetic on uint16: depth in mm fits int32 exactly
            value = value.astype(np.int32)
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"pyfunc input values must be numpy arrays or lists of str; got {type(value).__name__}")


def run_task(model: torch.nn.Module, task: str, batch: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """Run ``model`` (a loaded task model, eval mode) the way :meth:`MangoPyfuncModel.predict` does;
    returns numpy arrays. Shared with the in-process checks so both paths are the same code."""
    p = {**PREDICT_PARAMS, **dict(params or {})}
    with torch.no_grad():
        if p["mode"] == "sample":
            if task != "density":
                raise ValueError(f"mode 'sample' is only defined for the density task; this model is {task!r}")
            from pipeline.flows import quantize

            torch.manual_seed(int(p["seed"]))
            out = model(mode="sample", n=int(p["n"]), temperature=float(p["temperature"]))
            bits = dict(zip(model.modalities, model.flow.bits))
            return {k: quantize(v.float(), bits[k]).numpy() for k, v in out.items()}
        if p["mode"] != "predict":
            raise ValueError(f"unknown mode {p['mode']!r}; use 'predict' or 'sample'")
        if task == "density":
            # per-sample bits/dim through the flow's own entry point (the DensityModel's forward reduces
            # to batch means/sums; a plain module here, so nothing needs ZeRO-3's gathering)
            images = [batch[m] for m in model.modalities]
            return {"bits_per_dim": model.flow(*images, mode="bits_per_dim").double().numpy()}
        out = model(dict(batch), mode="predict")
        return {k: v.detach().cpu().numpy() for k, v in out.items()}


with warnings.catch_warnings():
    # MLflow asks for type hints when the class is created; the inputs are task-shaped dicts of arrays that
    # its type-hint schemas cannot express, and predict validates them itself
    warnings.filterwarnings("ignore", message=".*type hints.*", category=UserWarning)

    class MangoPyfuncModel(mlflow.pyfunc.PythonModel):
        """pyfunc wrapper; see the module docstring for the input / output contract."""

        def load_context(self, context) -> None:
            from pathlib import Path

            from pipeline.train.consolidate import load_model

            weights = Path(context.artifacts[ARTIFACT]) / WEIGHTS_FILE
            self.model, self.cfg = load_model(weights, device="cpu")
            self.task = self.cfg.model.task

        def predict(self, context, model_input, params=None):
            if not isinstance(model_input, Mapping):
                raise TypeError(f"mango-{self.task}.predict takes a dict of arrays keyed by sample key; got "
                                f"{type(model_input).__name__}")
            batch = {k: _tensor(v) for k, v in model_input.items()}
            return run_task(self.model, self.task, batch, params or {})


def pip_requirements() -> list[str]:
    """Exact pins of what loading needs (from the installed distributions; no inference subprocess)."""
    from importlib.metadata import version

    pins = [f"mango-pipeline=={version('mango-pipeline')}"]
    for dist in ("torch", "safetensors", "numpy", "omegaconf", "PyYAML", "mlflow"):
        pins.append(f"{dist}=={version(dist).split('+')[0]}")  # torch's +cpu local label is not on PyPI
    return pins
