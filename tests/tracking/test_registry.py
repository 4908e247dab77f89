"""The model registry: register → aliases → load by ``models:/mango-density@champion`` in a fresh process;
the promotion gate; and the same flow against a real ``mlflow server``.

One short density training run (tracked in a local sqlite store, two checkpoints) feeds every test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from jobs.evaluate import main as evaluate_main
from jobs.register import main as register_main
from jobs.sample import main as sample_main
from pipeline.data import write_split
from pipeline.evaluation import evaluate_model, load_source, resolve_checkpoint, resolve_source
from pipeline.tracking import registry
from pipeline.tracking.pyfunc_model import load_for_serving, run_task
from pipeline.train.checkpoint import read_state
from pipeline.train.consolidate import consolidate
from tests.train.conftest import TINY_TRAIN, run


def trained_run(tmp_path_factory) -> dict:
    """Tiny stereo shards and a 6-step density run (checkpoints at steps 3 and 6, both consolidated), tracked
    in a local sqlite store. Built once per session and shared with tests/test_evaluate_sample.py."""
    root = tmp_path_factory.getbasetemp() / "mango-registry-run"
    info = {
        "root": root,
        "store": f"sqlite:///{root / 'mlflow.db'}",
        "run_dir": root / "run",
        "shards": str(root / "shards"),
        "weights": {s: root / f"step{s}" / "model.safetensors" for s in (3, 6)},
    }
    if (root / "DONE").exists():
        return info
    root.mkdir(exist_ok=True)
    for split, per_shard in (("train", 24), ("val", 3)):
        write_split(
            "embedded",
            "stereo",
            info["shards"],
            split,
            options={"patch": 8, "downscale": 8},
            samples_per_shard=per_shard,
            progress=False,
        )
    r = run(
        [
            sys.executable,
            "-m",
            "jobs.train",
            *TINY_TRAIN,
            f"data.shards={info['shards']}",
            f"run.dir={info['run_dir']}",
            "train.max_steps=6",
            "checkpoint.every=3",
            "checkpoint.keep=2",
            "eval.every=3",
            "tracking.enabled=true",
            f"tracking.uri={info['store']}",
            "tracking.experiment=registry-test",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for s, out in info["weights"].items():
        consolidate(info["run_dir"] / "checkpoints" / f"step{s:08d}", out)
    (root / "DONE").touch()
    return info


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_run(tmp_path_factory)


def _register(trained, step: int, *, promote: bool, shards: str | None = None, uri: str | None = None, scratch: Path):
    source = resolve_checkpoint(trained["weights"][step], scratch)
    result = evaluate_model(load_source(source), source.cfg, shards or trained["shards"], "val")
    return registry.register(source, result, tracking_uri=uri or trained["store"], promote=promote), result


def _dequantised_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: (torch.randint(0, 256, (5, 3, 8, 8), generator=g).double() + torch.rand(5, 3, 8, 8, generator=g))
        .div(256)
        .sub(0.5)
        .float()
        .numpy()
        for k in ("rgb.png", "right.png")
    }


def test_register_tags_aliases_and_fresh_process_load(trained, tmp_path, capsys):
    # by training run id: its run.dir tag leads to the newest complete checkpoint (step 6)
    run_id = read_state(trained["run_dir"] / "checkpoints" / "step00000006")["mlflow_run_id"]
    assert register_main(["--run-id", run_id, "--promote", "--tracking-uri", trained["store"]]) == 0
    assert "promoted: no champion yet" in capsys.readouterr().out
    client = MlflowClient(trained["store"])
    version = str(client.get_registered_model("mango-density").aliases["champion"])
    mv = client.get_model_version("mango-density", version)
    source = resolve_checkpoint(trained["weights"][6], tmp_path)
    result = evaluate_model(load_source(source), source.cfg, trained["shards"], "val")
    train_run = client.get_run(run_id)
    # logged in the training run, tagged with what makes it comparable and reproducible
    assert mv.run_id == run_id
    assert mv.tags["eval.manifest_sha256"] == result.manifest_sha256
    assert mv.tags["data.train_manifest_sha256"] == train_run.data.tags["data.train_manifest_sha256"]
    assert float(mv.tags["metric.val_bits_per_dim"]) == result.metrics["val_bits_per_dim"]
    assert len(mv.tags["git.commit"]) == 40 and mv.tags["step"] == "6"
    aliases = client.get_registered_model("mango-density").aliases
    assert str(aliases["candidate"]) == str(aliases["champion"]) == version

    inputs = _dequantised_inputs()
    np.savez(tmp_path / "inputs.npz", **inputs)
    script = textwrap.dedent(f"""
        import mlflow, numpy as np
        mlflow.set_tracking_uri({trained["store"]!r})
        model = mlflow.pyfunc.load_model("models:/mango-density@champion")
        x = dict(np.load({str(tmp_path / "inputs.npz")!r}))
        bpd = model.predict(x)["bits_per_dim"]
        none = {{k: v[:0] for k, v in x.items()}}  # sampling reads no input; the schema still wants one
        s = model.predict(none, params={{"mode": "sample", "n": 3, "seed": 7, "temperature": 0.8}})
        np.savez({str(tmp_path / "out.npz")!r}, bpd=bpd, **{{"s_" + k: v for k, v in s.items()}})
    """)
    # a fresh process, started outside the repository: only the installed project and MLflow
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")

    model, _ = load_for_serving(trained["weights"][6])  # the served model's plan: same kernels, same bits
    want = run_task(model, "density", {k: torch.from_numpy(v) for k, v in inputs.items()}, {})
    np.testing.assert_array_equal(out["bpd"], want["bits_per_dim"])
    with torch.no_grad():
        direct = model.flow(*(torch.from_numpy(inputs[k]) for k in ("rgb.png", "right.png")), mode="bits_per_dim")
    np.testing.assert_allclose(out["bpd"], direct.double().numpy(), rtol=0, atol=0)
    samples = run_task(model, "density", {}, {"mode": "sample", "n": 3, "seed": 7, "temperature": 0.8})
    for k, v in samples.items():
        assert v.shape == (3, 3, 8, 8) and v.dtype == np.int64
        np.testing.assert_array_equal(out["s_" + k], v)


def test_gate_worse_stays_candidate_and_other_manifest_is_refused(trained, tmp_path, capsys):
    client = MlflowClient(trained["store"])
    champion = client.get_registered_model("mango-density").aliases.get("champion")
    champion = None if champion is None else str(champion)
    if champion is None:  # run alone: make the step-6 model champion first
        champion = _register(trained, 6, promote=True, scratch=tmp_path / "c")[0].version
    champ_bpd = float(client.get_model_version("mango-density", champion).tags["metric.val_bits_per_dim"])

    worse, result = _register(trained, 3, promote=True, scratch=tmp_path / "w")
    assert result.metrics["val_bits_per_dim"] > champ_bpd  # 3 steps fewer: a worse model on this data
    assert worse.gate is not None and not worse.gate.promote
    assert "worse" in worse.gate.reason and f"champion stays at version {champion}" in worse.gate.reason
    aliases = client.get_registered_model("mango-density").aliases
    assert str(aliases["champion"]) == champion and str(aliases["candidate"]) == worse.version

    # the better model, but evaluated on other data (patches of the pair at another scale): not comparable
    other_shards = str(tmp_path / "other")
    write_split(
        "embedded",
        "stereo",
        other_shards,
        "val",
        options={"patch": 8, "downscale": 9},
        samples_per_shard=4,
        progress=False,
    )
    other, _ = _register(trained, 6, promote=True, shards=other_shards, scratch=tmp_path / "o")
    assert not other.gate.promote and other.gate.reason.startswith("refused")
    assert "manifest" in other.gate.reason and other_shards in other.gate.reason
    assert client.get_registered_model("mango-density").aliases["champion"] == int(champion)

    # the CLI on a checkpoint directory: registered as candidate, not promoted (exit 3), and it says why
    code = register_main(
        [
            "--checkpoint",
            str(trained["run_dir"] / "checkpoints" / "step00000003"),
            "--promote",
            "--tracking-uri",
            trained["store"],
        ]
    )
    printed = capsys.readouterr().out
    assert code == 3, printed
    assert "not promoted: val_bits_per_dim (min)" in printed and "worse" in printed
    assert "alias candidate" in printed
    assert client.get_registered_model("mango-density").aliases["champion"] == int(champion)


def test_registry_and_lookups_against_mlflow_server(trained, mlflow_server, tmp_path):
    # the server is shared by the session: look the new version up as candidate (champion may be anyone's)
    reg, result = _register(trained, 6, promote=False, uri=mlflow_server, scratch=tmp_path)
    assert reg.gate is None
    client = MlflowClient(mlflow_server)
    run_info = client.get_run(reg.run_id)  # the training run lives in the local store: a register run here
    assert run_info.data.tags["mango.trained_in_run"] and run_info.data.tags["mango.job"] == "register"

    source = resolve_source(None, "models:/mango-density@candidate", tmp_path / "dl", tracking_uri=mlflow_server)
    assert source.version == reg.version and source.run_id == reg.run_id and source.step == 6
    assert registry.file_sha256(source.weights) == registry.file_sha256(trained["weights"][6])
    out = tmp_path / "metrics.json"
    assert (
        evaluate_main(
            [
                "--model-uri",
                f"models:/mango-density/{reg.version}",
                "--out",
                str(out),
                "--tracking-uri",
                mlflow_server,
                "--num-figures",
                "4",
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["metrics"] == result.metrics  # same weights, same manifest, same number
    logged = client.get_run(reg.run_id)
    assert logged.data.metrics["eval/val_bits_per_dim"] == result.metrics["val_bits_per_dim"]
    assert logged.data.tags["eval.val.manifest_sha256"] == result.manifest_sha256
    assert {a.path for a in client.list_artifacts(reg.run_id, "eval/val")} == {
        "eval/val/metrics.json",
        "eval/val/samples.png",
    }
    # sampling by registry URI draws what the weights draw locally
    assert (
        sample_main(
            [
                "--model-uri",
                "models:/mango-density@candidate",
                "--tracking-uri",
                mlflow_server,
                "--n",
                "3",
                "--seed",
                "5",
                "--out",
                str(tmp_path / "s.png"),
                "--npz",
                str(tmp_path / "s.npz"),
            ]
        )
        == 0
    )
    assert (
        sample_main(
            [
                "--checkpoint",
                str(trained["weights"][6]),
                "--n",
                "3",
                "--seed",
                "5",
                "--out",
                str(tmp_path / "t.png"),
                "--npz",
                str(tmp_path / "t.npz"),
            ]
        )
        == 0
    )
    remote, local = np.load(tmp_path / "s.npz"), np.load(tmp_path / "t.npz")
    for k in ("rgb.png", "right.png"):
        np.testing.assert_array_equal(remote[k], local[k])


def test_bad_model_uris_and_run_ids_are_clear_errors(trained, tmp_path, capsys):
    with pytest.raises(ValueError, match="expected models:/mango-<task>@<alias>"):
        registry.parse_model_uri("models:/mango@champion")
    with pytest.raises(LookupError, match="not found in the registry"):
        resolve_source(None, "models:/mango-density@nobody", tmp_path, tracking_uri=trained["store"])
    assert register_main(["--run-id", "0" * 32, "--tracking-uri", trained["store"]]) == 2
    assert "no such run" in capsys.readouterr().err


def test_gate_follows_the_metric_direction_and_needs_the_metric(trained, tmp_path):
    # versions carrying only the gate's tags (what register writes): mIoU is gated with mode max
    client = MlflowClient(trained["store"])
    client.create_registered_model("mango-segmentation")

    def version(miou: float | None, manifest: str = "m1") -> str:
        tags = {"eval.metric": "val_miou", "eval.mode": "max", "eval.manifest_sha256": manifest}
        if miou is not None:
            tags["metric.val_miou"] = repr(miou)
        return client.create_model_version("mango-segmentation", str(tmp_path), tags=tags).version

    first = version(0.40)
    assert registry.gate(client, "mango-segmentation", first).promote  # no champion yet
    client.set_registered_model_alias("mango-segmentation", "champion", first)
    higher, lower, untagged = version(0.45), version(0.35), version(None)
    decision = registry.gate(client, "mango-segmentation", higher)
    assert decision.promote and "better" in decision.reason
    assert not registry.gate(client, "mango-segmentation", lower).promote
    decision = registry.gate(client, "mango-segmentation", untagged)
    assert not decision.promote and "no metric.val_miou tag" in decision.reason
