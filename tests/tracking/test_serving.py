"""Serving: models registered in a real ``mlflow server`` carry a signature, an input example from held-out data,
their code and their requirements; ``mlflow models serve`` (a real subprocess on loopback) answers with the
in-process prediction; malformed requests get HTTP 400 naming the field. The slow test builds the serving
environment from the model's own requirements (``--env-manager virtualenv``; cached between runs).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
import torch
from mlflow.artifacts import download_artifacts
from mlflow.models import Model

from pipeline.evaluation import evaluate_model, load_source, resolve_checkpoint
from pipeline.tracking import registry
from pipeline.tracking.pyfunc_model import run_task
from pipeline.train.consolidate import load_model
from tests.tracking.serving_helpers import latent_root, post, start_model_server, task_weights, wait_ready
from tests.tracking.test_registry import _dequantised_inputs, trained_run


def _register(weights: Path, shards: str, uri: str, scratch: Path) -> registry.Registration:
    source = resolve_checkpoint(weights, scratch)
    result = evaluate_model(load_source(source), source.cfg, shards, "val")
    return registry.register(source, result, tracking_uri=uri)


def _download(uri: str, version: str, name: str, dst: Path) -> Path:
    client = registry.client_for(uri)
    where = client.get_model_version_download_uri(name, version)
    return Path(download_artifacts(artifact_uri=where, dst_path=str(dst), tracking_uri=uri))


@pytest.fixture(scope="module")
def registered(tmp_path_factory, mlflow_server):
    """A density model (the 6-step run) and an untrained segmentation model, registered in the server."""
    trained = trained_run(tmp_path_factory)
    root = tmp_path_factory.mktemp("serving")
    seg_weights, seg_shards, _ = task_weights(latent_root(tmp_path_factory), "segmentation")
    out = {"server": mlflow_server, "root": root}
    for task, weights, shards in (
        ("density", trained["weights"][6], trained["shards"]),
        ("segmentation", seg_weights, seg_shards),
    ):
        reg = _register(weights, shards, mlflow_server, root / f"scratch-{task}")
        out[task] = {
            "weights": weights,
            "shards": shards,
            "version": reg.version,
            "uri": f"models:/mango-{task}/{reg.version}",
            "local": _download(mlflow_server, reg.version, f"mango-{task}", root / f"dl-{task}"),
        }
    return out


@pytest.fixture(scope="module")
def servers(registered):
    """Both models served at once with ``--env-manager local`` (started together: each takes ~15 s)."""
    started = {
        task: start_model_server(registered[task]["uri"], registered["server"], registered["root"] / task)
        for task in ("density", "segmentation")
    }
    try:
        for s in started.values():
            wait_ready(s)
        yield {task: s.url for task, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


def test_logged_model_is_self_contained_with_signature_and_example(registered):
    for task in ("density", "segmentation"):
        local = registered[task]["local"]
        model = Model.load(str(local))
        inputs = model.signature.inputs
        assert inputs is not None and inputs.is_tensor_spec()  # named tensors
        specs = {s.name: s for s in inputs.inputs}
        if task == "density":
            assert set(specs) == {"rgb.png", "right.png"}
            assert all(s.type == np.dtype("float32") and s.shape == (-1, 3, 8, 8) for s in specs.values())
        else:
            assert specs["rgb.png"].type == np.dtype("uint8") and specs["rgb.png"].shape == (-1, 3, 16, 16)
            assert specs["depth.png"].type == np.dtype("uint16") and specs["depth.png"].shape == (-1, 1, 16, 16)
        assert {p.name for p in model.signature.params.params} == {"mode", "n", "temperature", "seed"}
        assert model.saved_input_example_info is not None
        # the code travels with the model, and the requirements resolve from the package index alone
        assert (local / "code" / "pipeline" / "flows" / "ica.py").is_file()
        assert not list((local / "code").rglob("__pycache__"))
        reqs = (local / "requirements.txt").read_text().split()
        assert "torch==2.13.0" in reqs and not any(r.startswith("mango-pipeline") or "+" in r for r in reqs)
        assert {r.split("==")[0] for r in reqs} >= {
            "torch",
            "numpy",
            "safetensors",
            "omegaconf",
            "PyYAML",
            "mlflow-skinny",
            "pandas",
        }
    # the density example is a real held-out sample, dequantised with noise seeded by its key
    example = json.loads((registered["density"]["local"] / "serving_input_example.json").read_text())["inputs"]
    x = np.asarray(example["rgb.png"], dtype=np.float32)
    assert x.shape == (2, 3, 8, 8) and -0.5 <= x.min() and x.max() < 0.5


def test_served_density_equals_in_process(registered, servers):
    d = registered["density"]
    inputs = _dequantised_inputs(seed=3)
    status, body = post(servers["density"], {"inputs": {k: v.tolist() for k, v in inputs.items()}})
    assert status == 200, body
    served = np.asarray(body["predictions"]["bits_per_dim"])
    assert served.shape == (5,)
    in_process = mlflow.pyfunc.load_model(str(d["local"])).predict(inputs)["bits_per_dim"]
    np.testing.assert_array_equal(served, in_process)  # same code path, same floats, through JSON exactly
    model, _ = load_model(d["weights"])
    direct = run_task(model, "density", {k: torch.from_numpy(v) for k, v in inputs.items()}, {})["bits_per_dim"]
    np.testing.assert_allclose(served, direct, rtol=1e-5)  # the weights file, whichever flow nodes ran here

    # the logged example is a request a caller can copy
    example = (d["local"] / "serving_input_example.json").read_text()
    status, body = post(servers["density"], example)
    assert status == 200 and len(body["predictions"]["bits_per_dim"]) == 2

    # sampling through HTTP: params travel; the input is not read (JSON cannot carry zero rows: send one)
    status, body = post(
        servers["density"],
        {
            "inputs": {k: np.zeros((1, 3, 8, 8)).tolist() for k in inputs},
            "params": {"mode": "sample", "n": 2, "seed": 4},
        },
    )
    assert status == 200, body
    samples = run_task(model, "density", {}, {"mode": "sample", "n": 2, "seed": 4})
    for k, v in samples.items():
        np.testing.assert_array_equal(np.asarray(body["predictions"][k]), v)


def test_served_segmentation_equals_in_process(registered, servers):
    s = registered["segmentation"]
    g = torch.Generator().manual_seed(1)
    inputs = {
        "rgb.png": torch.randint(0, 256, (3, 3, 16, 16), generator=g).numpy().astype(np.uint8),
        "depth.png": torch.randint(0, 10000, (3, 1, 16, 16), generator=g).numpy().astype(np.uint16),
    }
    status, body = post(servers["segmentation"], {"inputs": {k: v.tolist() for k, v in inputs.items()}})
    assert status == 200, body
    served = np.asarray(body["predictions"]["pred"])
    assert served.shape == (3, 16, 16)
    in_process = mlflow.pyfunc.load_model(str(s["local"])).predict(inputs)["pred"]
    np.testing.assert_array_equal(served, in_process)
    model, _ = load_model(s["weights"])
    with torch.no_grad():
        direct = model(
            {
                "rgb.png": torch.from_numpy(inputs["rgb.png"]),
                "depth.png": torch.from_numpy(inputs["depth.png"].astype(np.int32)),
            },
            mode="predict",
        )["pred"]
    assert (served == direct.numpy()).mean() > 0.99  # argmax ties aside, the weights' own prediction


@pytest.mark.parametrize(
    "task, payload, field, words",
    [
        ("density", {"inputs": {"rgb.png": np.zeros((1, 3, 8, 8)).tolist()}}, "right.png", "missing"),
        (
            "density",
            {"inputs": {"rgb.png": np.zeros((1, 3, 8, 4)).tolist(), "right.png": np.zeros((1, 3, 8, 8)).tolist()}},
            "rgb.png",
            "shape",
        ),
        (
            "density",
            {"inputs": {"rgb.png": np.full((1, 3, 8, 8), 200).tolist(), "right.png": np.zeros((1, 3, 8, 8)).tolist()}},
            "rgb.png",
            "[-0.5, 0.5)",
        ),
        # MLflow parses JSON into the schema's dtype before the model sees it: its own message, still a 400
        (
            "segmentation",
            {
                "inputs": {
                    "rgb.png": np.full((1, 3, 16, 16), 300).tolist(),
                    "depth.png": np.zeros((1, 1, 16, 16)).tolist(),
                }
            },
            "uint8",
            "out of bounds",
        ),
        (
            "segmentation",
            {"inputs": {"rgb.png": np.zeros((2, 3, 16, 16)).tolist(), "depth.png": np.zeros((2, 3, 16, 16)).tolist()}},
            "depth.png",
            "shape",
        ),
        (
            "segmentation",
            {
                "inputs": {
                    "rgb.png": np.zeros((1, 3, 16, 16)).tolist(),
                    "depth.png": np.zeros((1, 1, 16, 16)).tolist(),
                },
                "params": {"mode": "sample"},
            },
            "mode",
            "density",
        ),
    ],
)
def test_malformed_requests_are_400_naming_the_field(servers, task, payload, field, words):
    status, body = post(servers[task], payload)
    assert status == 400, body
    message = body.get("message", "")
    assert field in message and words in message, message
    assert body.get("error_code") in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST"), body
    assert "Traceback" not in message


# -- the serving environment built from the model's own requirements ----------------------------------------

ENV_CACHE = Path(os.environ.get("MANGO_SERVING_ENV_CACHE", Path.home() / ".cache" / "mango" / "serving-envs"))


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_virtualenv_built_from_model_requirements_serves_the_same(registered, tmp_path):
    """``mlflow models prepare-env`` + ``serve --env-manager virtualenv``: a fresh venv (pyenv's Python, pip,
    the model's requirements.txt; no checkout, no mango-pipeline) serves what this process predicts. The
    venv is cached in ``MANGO_SERVING_ENV_CACHE`` (MLflow names it by a hash of python_env + requirements):
    the first build takes minutes, later runs seconds."""
    if shutil.which("pyenv") is None:
        pytest.skip("--env-manager virtualenv needs pyenv on PATH (MLflow installs the model's Python with it)")
    import subprocess
    import sys

    env = {**os.environ, "MLFLOW_ENV_ROOT": str(ENV_CACHE), "MLFLOW_TRACKING_URI": registered["server"]}
    for task in ("density", "segmentation"):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "mlflow",
                "models",
                "prepare-env",
                "-m",
                registered[task]["uri"],
                "--env-manager",
                "virtualenv",
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    venvs = [p for p in (ENV_CACHE).iterdir() if (p / "bin" / "python").exists()]
    assert venvs
    for v in venvs:  # built from the model's requirements: nothing of this checkout inside
        r = subprocess.run(
            [
                str(v / "bin" / "python"),
                "-c",
                "import importlib.util as u; print(u.find_spec('pipeline'), u.find_spec('deepspeed'))",
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={"PATH": os.environ["PATH"]},
        )
        assert r.stdout.strip() == "None None", r.stdout + r.stderr

    inputs = _dequantised_inputs(seed=5)
    seg = {
        "rgb.png": np.arange(3 * 16 * 16).reshape(1, 3, 16, 16) % 251,
        "depth.png": (np.arange(16 * 16).reshape(1, 1, 16, 16) * 37) % 9000,
    }
    started = {
        task: start_model_server(
            registered[task]["uri"],
            registered["server"],
            tmp_path / task,
            env_manager="virtualenv",
            extra_env={"MLFLOW_ENV_ROOT": str(ENV_CACHE)},
        )
        for task in ("density", "segmentation")
    }
    try:
        for s in started.values():
            wait_ready(s, timeout=300)
        status, body = post(started["density"].url, {"inputs": {k: v.tolist() for k, v in inputs.items()}})
        assert status == 200, body
        want = mlflow.pyfunc.load_model(str(registered["density"]["local"])).predict(inputs)["bits_per_dim"]
        np.testing.assert_allclose(np.asarray(body["predictions"]["bits_per_dim"]), want, rtol=1e-6)
        status, body = post(started["segmentation"].url, {"inputs": {k: v.tolist() for k, v in seg.items()}})
        assert status == 200, body
        want = mlflow.pyfunc.load_model(str(registered["segmentation"]["local"])).predict(
            {"rgb.png": seg["rgb.png"].astype(np.uint8), "depth.png": seg["depth.png"].astype(np.uint16)}
        )["pred"]
        np.testing.assert_array_equal(np.asarray(body["predictions"]["pred"]), want)
        status, body = post(started["density"].url, {"inputs": {"rgb.png": inputs["rgb.png"].tolist()}})
        assert status == 400 and "right.png" in body["message"]
    finally:
        for s in started.values():
            s.stop()


def test_loading_never_builds_the_cpp_extension(registered, tmp_path):
    """A fresh process with an empty torch extension cache loads and runs the model on the flow's Python nodes:
    nothing is built (a build would take a minute and leave its directory in the cache)."""
    import subprocess
    import sys

    cache = tmp_path / "torch_extensions"
    script = (
        f"import mlflow.pyfunc, json, numpy as np; m = mlflow.pyfunc.load_model({str(registered['density']['local'])!r});"
        f"x = json.load(open({str(registered['density']['local'] / 'serving_input_example.json')!r}))['inputs'];"
        "print(m.predict({k: np.asarray(v, dtype=np.float32) for k, v in x.items()})['bits_per_dim'].shape)"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    env.pop("MANGO_NATIVE", None)
    r = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().endswith("(2,)")
    assert not cache.exists() or not any(cache.iterdir()), list(cache.rglob("*"))[:5]
