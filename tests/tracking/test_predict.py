"""``python -m jobs.predict``: a registered density model (in a real ``mlflow server``) scores the held-out shards
locally and on a local Ray cluster (Ray Data actor pool); both write shards keyed like the input, byte-equal,
with a manifest naming the model version and the input manifest; the bits/dim are the flow's own on inputs
dequantised with noise seeded by each sample's key. Bad inputs exit 2 with one line, before any model loads.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.predict import main as predict_main
from pipeline.data import load_manifest, manifest_name, write_split
from pipeline.data.storage import join
from pipeline.evaluation import evaluate_model, load_source, resolve_checkpoint
from pipeline.tracking import registry
from pipeline.tracking.serving import dequantise
from pipeline.train.consolidate import load_model
from tests.tracking.test_registry import trained_run


@pytest.fixture(scope="module")
def density(tmp_path_factory, mlflow_server):
    trained = trained_run(tmp_path_factory)
    source = resolve_checkpoint(trained["weights"][6], tmp_path_factory.mktemp("predict-reg"))
    result = evaluate_model(load_source(source), source.cfg, trained["shards"], "val")
    reg = registry.register(source, result, tracking_uri=mlflow_server)
    return {
        "server": mlflow_server,
        "shards": trained["shards"],
        "weights": trained["weights"][6],
        "uri": f"models:/mango-density/{reg.version}",
        "version": reg.version,
    }


def _read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, _, member = m.name.partition(".")
            out.setdefault(key, {})[member] = tar.extractfile(m).read()
    return out


def _input_keys(path: str) -> list[str]:
    with tarfile.open(path) as tar:
        return sorted({m.name.partition(".")[0] for m in tar.getmembers()})


def _run(density, out: Path, *extra: str) -> int:
    return predict_main(
        [
            "--model",
            density["uri"],
            "--shards",
            density["shards"],
            "--split",
            "val",
            "--out",
            str(out),
            "--tracking-uri",
            density["server"],
            "--threads",
            "1",
            "--batch-size",
            "2",
            "--no-progress",
            *extra,
        ]
    )


def test_local_and_ray_score_equal_key_by_key_with_a_manifest(density, tmp_path, capsys):
    import ray

    local, remote = tmp_path / "local", tmp_path / "ray"
    assert _run(density, local) == 0
    printed = capsys.readouterr().out
    assert f"version {density['version']}" in printed and "(local)" in printed

    inp = load_manifest(join(density["shards"], manifest_name("val")))
    out = load_manifest(str(local / "manifest-val.json"))
    assert out.source_config["model_version"] == density["version"]
    assert out.source_config["model"] == density["uri"] and out.source_config["task"] == "density"
    assert out.source_config["input_manifest_sha256"] == inp.manifest_checksum()
    assert out.total_samples == inp.total_samples and out.skipped_samples == 0
    assert [s.name for s in out.shards] == [s.name for s in inp.shards]
    assert out.modalities["bits_per_dim.npy"].dtype == "float64"

    # keyed like the input; bits/dim = the flow's on inputs dequantised with per-key noise
    model, _ = load_model(density["weights"])
    for url, shard in zip(inp.shard_urls(), out.shards):
        got = _read_tar(local / shard.name)
        keys = _input_keys(url)
        assert sorted(got) == keys and shard.first_key == keys[0] and shard.last_key == keys[-1]
        bpd = np.array([np.load(io.BytesIO(got[k]["bits_per_dim.npy"])) for k in keys])
        assert bpd.shape == (len(keys),) and np.isfinite(bpd).all()
        with tarfile.open(url) as tar:
            imgs = {}
            for m in ("rgb.png", "right.png"):
                from pipeline.data.codecs import decode_image_bytes

                arr = np.stack([decode_image_bytes(tar.extractfile(f"{k}.{m}").read(), m) for k in keys])
                imgs[m] = dequantise(arr.transpose(0, 3, 1, 2), 8, keys, m)
        with torch.no_grad():
            want = model.flow(*(torch.from_numpy(imgs[m]) for m in ("rgb.png", "right.png")), mode="bits_per_dim")
        np.testing.assert_allclose(bpd, want.double().numpy(), rtol=1e-5)

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert _run(density, remote, "--ray", "--actors", "2") == 0
    finally:
        if started:
            ray.shutdown()
    assert "(ray)" in capsys.readouterr().out
    ray_manifest = load_manifest(str(remote / "manifest-val.json"))
    assert ray_manifest.args["engine"] == "ray" and out.args["engine"] == "local"
    assert ray_manifest.manifest_checksum() == out.manifest_checksum()  # same shards, byte for byte
    for shard in out.shards:
        assert _read_tar(remote / shard.name) == _read_tar(local / shard.name)

    # the committed output is not overwritten by accident
    assert _run(density, local) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_bad_inputs_exit_2_with_one_line(density, tmp_path, capsys):
    scenes = str(tmp_path / "scenes")
    write_split(
        "embedded", "scenes", scenes, "val", options={"scenes": 2, "size": 8}, samples_per_shard=4, progress=False
    )
    base = ["--tracking-uri", density["server"], "--no-progress"]
    cases = [
        (
            ["--model", "models:/mango@champion", "--shards", density["shards"], "--out", str(tmp_path / "a")],
            "expected models:/mango-<task>@<alias>",
        ),
        (
            ["--model", "models:/mango-density@nobody", "--shards", density["shards"], "--out", str(tmp_path / "b")],
            "not found in the registry",
        ),
        (
            ["--model", density["uri"], "--shards", str(tmp_path / "nothing"), "--out", str(tmp_path / "c")],
            "no committed manifest",
        ),
        (["--model", density["uri"], "--shards", scenes, "--out", str(tmp_path / "d")], "missing ['right.png']"),
        (
            ["--model", density["uri"], "--shards", density["shards"], "--out", density["shards"]],
            "is the input shard store",
        ),
        (
            [
                "--model",
                density["uri"],
                "--shards",
                density["shards"],
                "--out",
                str(tmp_path / "e"),
                "--batch-size",
                "0",
            ],
            "--batch-size",
        ),
    ]
    for args, words in cases:
        assert predict_main(args + base) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and words in err, err
    assert not any((tmp_path / d).exists() for d in "abcde")  # nothing written


def test_s3_in_and_out(density, s3_env, tmp_path, capsys):
    bucket = s3_env.make_bucket()
    shards = f"{bucket}/stereo"
    write_split(
        "embedded", "stereo", shards, "val", options={"patch": 8, "downscale": 8}, samples_per_shard=3, progress=False
    )
    out = f"{bucket}/preds"
    assert (
        predict_main(
            [
                "--model",
                density["uri"],
                "--shards",
                shards,
                "--out",
                out,
                "--tracking-uri",
                density["server"],
                "--threads",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    m = load_manifest(f"{out}/manifest-val.json")
    keys = s3_env.keys(out)
    assert all(f"preds/{s.name}" in keys for s in m.shards) and m.source_config["model_version"] == density["version"]
    # the same data read from S3 scores like the local copy (the same keys, so the same noise)
    local = tmp_path / "local"
    assert _run(density, local) == 0
    local_m = load_manifest(str(local / "manifest-val.json"))
    assert [(s.name, s.sha256) for s in m.shards] == [(s.name, s.sha256) for s in local_m.shards]
    assert (
        predict_main(
            [
                "--model",
                density["uri"],
                "--shards",
                shards,
                "--out",
                "s3://no-such-bucket-x/p",
                "--tracking-uri",
                density["server"],
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_segmentation_predictions_are_label_shards(mlflow_server, tmp_path_factory, tmp_path):
    from pipeline.tracking.serving import io_for_weights, read_samples, request_from_samples
    from tests.tracking.serving_helpers import latent_root, task_weights

    root = tmp_path_factory.mktemp("predict-seg")
    weights, shards, split = task_weights(latent_root(tmp_path_factory), "segmentation")
    source = resolve_checkpoint(weights, root / "scratch")
    reg = registry.register(
        source, evaluate_model(load_source(source), source.cfg, shards, split), tracking_uri=mlflow_server
    )
    out = tmp_path / "preds"
    assert (
        predict_main(
            [
                "--model",
                f"models:/mango-segmentation/{reg.version}",
                "--shards",
                shards,
                "--out",
                str(out),
                "--tracking-uri",
                mlflow_server,
                "--batch-size",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    m = load_manifest(str(out / "manifest-val.json"))
    inp = load_manifest(join(shards, manifest_name("val")))
    spec = m.modalities["pred.npy"]
    assert spec.kind == "label" and spec.dtype == "int64" and spec.shape == (16, 16)
    assert spec.classes == next(s.classes for s in inp.modalities.values() if s.kind == "label")
    got = {k: np.load(io.BytesIO(v["pred.npy"])) for s in m.shards for k, v in _read_tar(out / s.name).items()}
    assert m.total_samples == inp.total_samples == len(got)
    # what the registered model predicts for the same samples in one batch
    io_ = io_for_weights(weights)
    samples = read_samples(shards, "val", [f.key for f in io_.inputs], inp.total_samples)
    net, _ = load_model(weights)
    batch = request_from_samples(samples, io_)
    with torch.no_grad():
        want = net(
            {
                "rgb.png": torch.from_numpy(batch["rgb.png"]),
                "depth.png": torch.from_numpy(batch["depth.png"].astype(np.int32)),
            },
            mode="predict",
        )["pred"]
    for i, s in enumerate(samples):
        assert (got[s["__key__"]] == want[i].numpy()).mean() > 0.99  # argmax ties aside
