"""jobs.evaluate and jobs.sample end to end on tiny shards: metrics JSON, figures, MLflow logging into the
training run, reproducible sample grids; the latent tasks' figures and pyfunc predictions."""

from __future__ import annotations

import json

import mlflow.pyfunc
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from safetensors.torch import save_file

from jobs.evaluate import main as evaluate_main
from jobs.sample import main as sample_main
from pipeline.config import load_config, save_resolved
from pipeline.data import load_manifest, write_split
from pipeline.data.sources import movies
from pipeline.evaluation import eval_loader
from pipeline.flows import data_init, quantize
from pipeline.models import build_model, modality_specs
from pipeline.tracking.registry import pyfunc_arguments
from pipeline.train.consolidate import config_path, load_model
from tests.tracking.test_registry import trained_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_run(tmp_path_factory)


def test_evaluate_checkpoint_dir_writes_json_figures_and_logs_to_the_training_run(trained, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert (
        evaluate_main(
            [
                "--checkpoint",
                str(trained["run_dir"]),
                "--split",
                "val",
                "--out",
                str(out),
                "--tracking-uri",
                trained["store"],
                "--num-figures",
                "5",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    manifest = load_manifest(f"{trained['shards']}/manifest-val.json")
    assert report["manifest_sha256"] == manifest.manifest_checksum() and report["step"] == 6
    assert report["metrics"]["val_samples"] == manifest.total_samples == report["samples"]
    bpd = report["metrics"]["val_bits_per_dim"]
    assert 0 < bpd < 16 and f"val_bits_per_dim  {bpd:.6g}" in printed
    png = tmp_path / "metrics_figures" / "samples.png"
    w, h = Image.open(png).size
    assert w > h > 0  # 5 joint samples, 3 per row, each rgb | right

    # the training run (its id is in the checkpoint) gets the numbers at the checkpoint's step and the figures
    client = MlflowClient(trained["store"])
    runs = client.search_runs([client.get_experiment_by_name("registry-test").experiment_id])
    run = next(r for r in runs if r.data.tags.get("run.dir") == str(trained["run_dir"].resolve()))
    assert f"logged to MLflow run {run.info.run_id}" in printed
    history = client.get_metric_history(run.info.run_id, "eval/val_bits_per_dim")
    assert [(m.step, m.value) for m in history][-1] == (6, bpd)
    assert run.data.tags["eval.val.manifest_sha256"] == manifest.manifest_checksum()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval/val")}
    assert {"eval/val/metrics.json", "eval/val/samples.png"} <= artifacts

    # a sweep's best.json (consolidated weights + the trial's run): a seeded pass gives the same number again,
    # logged to the run best.json names
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"weights": str(trained["weights"][6]), "step": 6, "mlflow_run_id": run.info.run_id}))
    again = tmp_path / "again.json"
    assert evaluate_main(["--checkpoint", str(best), "--out", str(again), "--tracking-uri", trained["store"]]) == 0
    assert json.loads(again.read_text())["metrics"] == report["metrics"]
    assert f"logged to MLflow run {run.info.run_id}" in capsys.readouterr().out


def test_evaluate_refuses_bad_inputs_with_reasons(trained, tmp_path, capsys):
    assert evaluate_main(["--checkpoint", str(tmp_path / "nothing"), "--no-tracking"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert (
        evaluate_main(
            [
                "--checkpoint",
                str(trained["weights"][6]),
                "--inception-weights",
                "x.pth",
                "--out",
                str(tmp_path / "m.json"),
                "--no-tracking",
            ]
        )
        == 2
    )
    assert "translation" in capsys.readouterr().err
    assert (
        evaluate_main(
            [
                "--checkpoint",
                str(trained["weights"][6]),
                "--split",
                "test",
                "--no-tracking",
                "--out",
                str(tmp_path / "m.json"),
            ]
        )
        == 2
    )
    assert "manifest-test.json" in capsys.readouterr().err
    assert (
        evaluate_main(
            [
                "--checkpoint",
                str(trained["weights"][6]),
                "--shards",
                str(tmp_path / "elsewhere"),
                "--no-tracking",
                "--out",
                str(tmp_path / "m.json"),
            ]
        )
        == 2
    )
    assert str(tmp_path / "elsewhere" / "manifest-val.json") in capsys.readouterr().err


def test_sample_writes_reproducible_exact_grids(trained, tmp_path):
    weights = str(trained["weights"][6])
    args = ["--checkpoint", weights, "--n", "5", "--temperature", "0.7", "--seed", "3"]
    assert sample_main([*args, "--grids", "2", "--out", str(tmp_path / "a.png"), "--npz", str(tmp_path / "a.npz")]) == 0
    assert sample_main([*args, "--grids", "2", "--out", str(tmp_path / "b.png"), "--npz", str(tmp_path / "b.npz")]) == 0
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert set(a.files) == {"rgb.png", "right.png"}
    for k in a.files:
        assert a[k].shape == (10, 3, 8, 8) and a[k].min() >= 0 and a[k].max() <= 255
        np.testing.assert_array_equal(a[k], b[k])
    assert (tmp_path / "a-0.png").read_bytes() == (tmp_path / "b-0.png").read_bytes()
    assert (tmp_path / "a-0.png").read_bytes() != (tmp_path / "a-1.png").read_bytes()
    # the grid holds exactly the model's own joint samples (same seed, same draw)
    model, _ = load_model(weights)
    torch.manual_seed(3)
    with torch.no_grad():
        draw = model(mode="sample", n=5, temperature=0.7)
    for k in a.files:
        np.testing.assert_array_equal(a[k][:5], quantize(draw[k], 8).numpy())


def test_sample_refuses_non_density_models(tmp_path, capsys, latent):
    assert sample_main(["--checkpoint", str(latent("segmentation")[0]), "--out", str(tmp_path / "s.png")]) == 2
    assert "only density models sample" in capsys.readouterr().err


# -- latent tasks (untrained models saved as consolidated weights: the jobs do not care how they were made) --

TASKS = {
    "segmentation": (
        "scenes",
        "val",
        ["data.modalities=[rgb,depth,label]", "model.num_classes=6", "model.image_size=16"],
        "overlays.png",
        {"val_miou", "val_pixacc", "val_macc"},
    ),
    "translation": (
        "stereo",
        "val",
        ["data.modalities=[rgb,depth,right]", "model.target=right", "model.image_size=8"],
        "triptychs.png",
        {"val_mae", "val_mse", "val_fid_proxy", "val_kid_proxy"},
    ),
    "classification": (
        "movies",
        "dev",
        ["data.modalities=[rgb,text,labels]", "model.num_classes=23", "model.image_size=16"],
        "genre_f1.png",
        {"val_micro_f1"},
    ),
}


@pytest.fixture(scope="module")
def latent(tmp_path_factory, trained):
    root = tmp_path_factory.mktemp("latent")
    made = {}

    def make(task: str):
        if task in made:
            return made[task]
        kind, split, extra, _, _ = TASKS[task]
        if kind == "scenes":
            shards = str(root / "scenes")
            write_split(
                "embedded",
                "scenes",
                shards,
                split,
                options={"scenes": 4, "size": 16},
                samples_per_shard=4,
                progress=False,
            )
        elif kind == "movies":
            movies.write_movie_folder(str(root / "movie-folder"), 2, 5, 2, seed=1)
            shards = str(root / "movies")
            write_split(
                "mmimdb",
                str(root / "movie-folder"),
                shards,
                split,
                options={"image_size": 16},
                samples_per_shard=5,
                progress=False,
            )
        else:
            shards = trained["shards"]
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
        weights = root / task / "model.safetensors"
        weights.parent.mkdir()
        state = {
            k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
            for k, v in model.state_dict().items()
        }
        save_file(state, str(weights), metadata={"step": "0", "task": task, "modalities": json.dumps(specs)})
        save_resolved(cfg, config_path(weights))
        made[task] = (weights, shards, split)
        return made[task]

    return make


@pytest.mark.parametrize("task", list(TASKS))
def test_latent_task_evaluation_figures_and_pyfunc(task, latent, trained, tmp_path):
    weights, shards, split = latent(task)
    out = tmp_path / "metrics.json"
    # segmentation: weights without a training run in the store → a new evaluate-<task> run gets everything
    store = trained["store"]
    tracking = ["--tracking-uri", store] if task == "segmentation" else ["--no-tracking"]
    assert evaluate_main(["--checkpoint", str(weights), "--out", str(out), "--num-figures", "3", *tracking]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    want = {k.replace("val_", f"{split}_", 1) for k in TASKS[task][4]}
    assert want <= set(metrics), sorted(metrics)
    assert all(np.isfinite(v) for v in metrics.values())
    figure = tmp_path / "metrics_figures" / TASKS[task][3]
    assert Image.open(figure).size[0] > 100
    if task == "segmentation":
        client = MlflowClient(store)
        (run,) = client.search_runs(
            [client.get_experiment_by_name("mango").experiment_id], "attributes.run_name = 'evaluate-segmentation'"
        )
        assert run.info.run_name == "evaluate-segmentation" and run.info.status == "FINISHED"
        assert run.data.metrics["eval/val_miou"] == metrics["val_miou"]
        assert {a.path for a in client.list_artifacts(run.info.run_id, "eval/val")} == {
            "eval/val/metrics.json",
            "eval/val/overlays.png",
        }

    if task != "segmentation":
        return  # every latent task reaches the pyfunc wrapper through the same forward(batch, mode="predict")
    # the registry's pyfunc wrapper runs the task exactly like the loaded model
    model, cfg = load_model(weights)
    pyfunc_dir = tmp_path / "pyfunc"
    mlflow.pyfunc.save_model(str(pyfunc_dir), **pyfunc_arguments(weights, tmp_path / "staging"))
    served = mlflow.pyfunc.load_model(str(pyfunc_dir))
    loader, _ = eval_loader(cfg, shards, split, batch_size=3)
    batch = next(iter(loader))
    inputs = {m.key: batch[m.key] for m in model.inputs}
    arrays = {k: (v if isinstance(v, list) else v.numpy()) for k, v in inputs.items()}
    got = served.predict(arrays)
    with torch.no_grad():
        want_out = model(inputs, mode="predict")
    assert set(got) == set(want_out)
    for k, v in want_out.items():
        np.testing.assert_allclose(got[k], v.numpy(), rtol=1e-6, atol=1e-6)
