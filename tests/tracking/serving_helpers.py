"""Helpers for the serving tests: a real ``mlflow models serve`` subprocess on loopback, HTTP calls, and untrained
latent-task models saved as consolidated weights (the registry does not care how they were made)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]


@dataclass
class ModelServer:
    url: str
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the CLI, uvicorn and its worker
        self.proc.wait(timeout=30)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def start_model_server(
    model_uri: str,
    tracking_uri: str,
    root: Path,
    *,
    env_manager: str = "local",
    extra_env: dict[str, str] | None = None,
) -> ModelServer:
    """``mlflow models serve -m URI`` on 127.0.0.1 (a free port), run from ``root`` (outside the checkout).
    The scoring server is ``uvicorn`` from PATH: the venv's bin goes first, as an activated venv would."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        env_manager,
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        "1",
    ]
    log = root / f"serve-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return ModelServer(f"http://127.0.0.1:{port}", proc, log)


def wait_ready(server: ModelServer, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"mlflow models serve did not answer within {timeout:.0f} s:\n{server.log_tail()}")


def post(url: str, payload: dict | str) -> tuple[int, dict]:
    """POST JSON to ``url``/invocations → (status, decoded body)."""
    body = payload if isinstance(payload, str) else json.dumps(payload)
    req = urllib.request.Request(
        f"{url}/invocations", data=body.encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


LATENT = {  # task → (source, split, config overrides)
    "segmentation": (
        "scenes",
        "val",
        [
            "data.modalities=[rgb,depth,label]",
            "model.num_classes=6",
            "model.image_size=16",
            "eval.metric=val_miou",
            "eval.mode=max",
        ],
    ),
    "translation": (
        "stereo",
        "val",
        [
            "data.modalities=[rgb,depth,right]",
            "model.target=right",
            "model.image_size=8",
            "eval.metric=val_mae",
            "eval.mode=min",
        ],
    ),
    "classification": (
        "movies",
        "dev",
        [
            "data.modalities=[rgb,text,labels]",
            "model.num_classes=23",
            "model.image_size=16",
            "eval.metric=val_macro_f1",
            "eval.mode=max",
        ],
    ),
}


def latent_root(tmp_path_factory) -> Path:
    """One folder per test session for :func:`task_weights` (each model and shard set is built once)."""
    root = tmp_path_factory.getbasetemp() / "mango-latent"
    root.mkdir(exist_ok=True)
    return root


def task_weights(root: Path, task: str, stereo_shards: str | None = None) -> tuple[Path, str, str]:
    """An untrained ``task`` model (ActNorm initialised on a real batch) on real shards (embedded scenes, the
    stereo pair ``stereo_shards``, embedded MM-IMDB-style movies) → (consolidated weights, shards, split);
    reused when ``root`` already holds it."""
    import json as _json

    from safetensors.torch import save_file

    from pipeline.config import load_config, save_resolved
    from pipeline.data import write_split
    from pipeline.data.sources import movies
    from pipeline.evaluation import eval_loader
    from pipeline.flows import data_init
    from pipeline.models import build_model, modality_specs
    from pipeline.train.consolidate import config_path

    kind, split, extra = LATENT[task]
    weights = root / task / "model.safetensors"
    shards = stereo_shards if kind == "stereo" else str(root / kind)
    if weights.exists():
        return weights, shards, split
    if kind == "scenes":
        for s in ("train", "val"):
            write_split(
                "embedded", "scenes", shards, s, options={"scenes": 4, "size": 16}, samples_per_shard=4, progress=False
            )
    elif kind == "movies":
        movies.write_movie_folder(str(root / "movie-folder"), 2, 5, 2, seed=1)
        for s in ("train", "dev"):
            write_split(
                "mmimdb",
                str(root / "movie-folder"),
                shards,
                s,
                options={"image_size": 16},
                samples_per_shard=5,
                progress=False,
            )
    cfg = load_config(
        None,
        [
            f"model.task={task}",
            f"data.shards={shards}",
            f"data.val_split={split}",
            "model.dim=16",
            "model.patch_size=4",
            "model.num_blocks=1",
            "model.lica_group=0",
            "data.batch_size=4",
            *extra,
        ],
    )
    loader, manifest = eval_loader(cfg, shards, split)
    specs = modality_specs(cfg, manifest)
    torch.manual_seed(0)
    model = build_model(cfg, specs)
    data_init(model, next(iter(loader)), mode="loss")
    weights.parent.mkdir(parents=True)
    state = {
        k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(weights), metadata={"step": "0", "task": task, "modalities": _json.dumps(specs)})
    save_resolved(cfg, config_path(weights))
    return weights, shards, split
