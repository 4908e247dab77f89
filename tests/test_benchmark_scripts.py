"""The report scripts that run where this suite cannot (a GPU) still run: each on a tiny CPU configuration."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_report_runs_every_section_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    r = subprocess.run(
        [sys.executable, "benchmarks/gpu_flow.py", "--device", "cpu", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {}
    assert max(report["kernel"].values()) < 5e-2  # bf16 kernel vs its fp64 reference
    assert report["roundtrip"]["logdet_dtype"] == "torch.float32"
    assert report["plan"].startswith("plan: bf16 autocast")
    assert 0 < report["flops"]["bf16_share"] <= 1
    for section in ("step", "step_store", "step_invert"):
        assert report[section]["step_ms"] > 0 and report[section]["achieved_tflops"] > 0
    assert report["max_batch"]["largest_batch"] >= 1


def test_the_flop_benchmark_counts_a_bf16_step_mostly_in_bf16() -> None:
    r = subprocess.run(
        [sys.executable, "benchmarks/flops_dtype.py", "--sizes", "32", "--dim", "32", "--baseline"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    line = r.stdout.splitlines()[0]
    share = float(line.split("bf16 share ")[1].split(",")[0])
    base = float(line.split("| baseline ")[1].split("bf16 share ")[1].split(" ")[0])
    assert share > base  # the plan's bf16 attention moved work from fp32 to bf16


def test_the_fusion_study_reports_paired_differences_and_logs_a_parent_with_a_child_per_cell(tmp_path: Path) -> None:
    import mlflow

    out, db = tmp_path / "study", tmp_path / "mlflow.db"
    r = subprocess.run(
        [
            sys.executable,
            "benchmarks/fusion.py",
            "--tasks",
            "density",
            "--seeds",
            "2",
            "--steps",
            "2",
            "--out",
            str(out),
            "--tracking-uri",
            f"sqlite:///{db}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "fusion.json").read_text())
    assert {(c["variant"], c["seed"]) for c in report["cells"]} == {
        (v, s) for v in ("mango", "rgb only", "right only") for s in (0, 1)
    }
    summed = next(row for row in report["summary"] if row["variant"] == "summed singles")
    assert summed["diff_low"] <= summed["diff_mean"] <= summed["diff_high"]
    assert "| density | summed singles |" in (out / "fusion.md").read_text()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("mango-fusion-study").experiment_id])
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    assert len(parents) == 1 and len(runs) == 1 + 6
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id)} == {"fusion.md", "fusion.json"}

    # an interrupted study resumes: the 6 journalled cells are kept, only seed 2's three run
    r = subprocess.run(
        [sys.executable, "benchmarks/fusion.py", "--tasks", "density", "--seeds", "3", "--steps", "2"]
        + ["--out", str(out), "--no-tracking", "--resume"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.findall(r"^\[density\] .* seed (\d+):", r.stdout, re.M) == ["2"] * 3
    cells = json.loads((out / "fusion.json").read_text())["cells"]
    assert sorted(c["seed"] for c in cells) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(c in cells for c in report["cells"])  # the journalled cells as they were measured

    # --report trains nothing: the journal's 9 cells summarised and logged as a new parent with 9 children
    r = subprocess.run(
        [sys.executable, "benchmarks/fusion.py", "--tasks", "density", "--out", str(out), "--report"]
        + ["--tracking-uri", f"sqlite:///{db}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert not re.findall(r"seed \d+:", r.stdout) and "| density | summed singles |" in r.stdout
    cell_key = lambda c: (c["variant"], c["seed"])  # noqa: E731
    assert sorted(json.loads((out / "fusion.json").read_text())["cells"], key=cell_key) == sorted(cells, key=cell_key)
    runs = client.search_runs([client.get_experiment_by_name("mango-fusion-study").experiment_id])
    assert len(runs) == 2 + 6 + 9


def test_paired_interval_is_the_student_t_interval_of_the_differences() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from fusion import paired_interval

    mean, low, high = paired_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and abs((high - mean) - 4.303 * 1.0 / 3**0.5) < 1e-9 and low == 2 * mean - high


def test_the_study_levers_are_valid_one_key_variants_and_the_pad_mask_comes_with_text(monkeypatch) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import fusion
    from fusion import LEVERS, PAD_LEVERS, variants

    from pipeline.config import load_config

    # parameter counts need the sharded data: not what is checked here
    monkeypatch.setattr(fusion, "param_count", lambda cfg: 1)
    monkeypatch.setattr(fusion, "matched_xattn_ratio", lambda *a: (2.0, 1))

    config = REPO / "launch" / "configs" / "classification_demo.yaml"
    base = ["tracking.enabled=false"]
    got = variants("classification", load_config(config, base), config, base, levers=True)
    assert set(LEVERS) | set(PAD_LEVERS) <= set(got) and "xattn" in got
    for extra in got.values():  # every variant is a config the pipeline accepts
        load_config(config, [*base, *extra])
    seg = REPO / "launch" / "configs" / "segmentation_demo.yaml"
    assert not set(PAD_LEVERS) & set(variants("segmentation", load_config(seg, base), seg, base, levers=True))


def test_a_variant_the_task_refuses_is_skipped_with_a_line_not_the_whole_study(monkeypatch, tmp_path, capsys) -> None:
    # translation's warp head needs an RGB input to move: "depth only" is refused when its model is built
    sys.path.insert(0, str(REPO / "benchmarks"))
    import fusion

    from pipeline.config_rules import ConfigError

    def params(cfg) -> int:
        if list(cfg.data.modalities) == ["depth", "right"]:
            raise ConfigError("model.decoder=warp moves pixels of an input image like the target right.png")
        return 1

    monkeypatch.setattr(fusion, "shard_task", lambda *a, **k: None)
    monkeypatch.setattr(fusion, "param_count", params)
    monkeypatch.setattr(fusion, "variants", lambda *a: {"mango": [], "depth only": ["data.modalities=[depth,right]"]})
    monkeypatch.setattr(fusion, "train_loop", lambda cfg: {"val_mae": 0.5})
    cells = fusion.run_task("translation", tmp_path, [0, 1], 2, [], False, fusion.Tracker("", False))
    assert [(c["variant"], c["seed"]) for c in cells] == [("mango", 0), ("mango", 1)]
    assert "[translation] depth only: not applicable (model.decoder=warp" in capsys.readouterr().out


def test_the_paired_differences_are_taken_to_the_chosen_reference_variant() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from fusion import markdown, summarise

    maes = {"mango": [0.10, 0.12, 0.11], "mango twoway": [0.09, 0.10, 0.10], "concat": [0.12, 0.13, 0.13]}
    cells = [
        {"task": "nonlocal", "variant": v, "seed": s, "params": 1, "val_mae": m}
        for v, ms in maes.items()
        for s, m in enumerate(ms)
    ]
    by_default = {r["variant"]: r for r in summarise(cells)}
    assert "diff_mean" not in by_default["mango"] and abs(by_default["concat"]["diff_mean"] - 0.05 / 3) < 1e-12
    rows = summarise(cells, "mango twoway")
    by_twoway = {r["variant"]: r for r in rows}
    assert "diff_mean" not in by_twoway["mango twoway"]  # lower MAE is better: positive = the reference better
    assert abs(by_twoway["concat"]["diff_mean"] - 0.09 / 3) < 1e-12 and by_twoway["mango"]["diff_mean"] > 0
    assert "| mango twoway better by" in markdown(rows, "mango twoway")


def test_flat_adam_takes_the_same_steps_as_torch_adam_over_the_parameter_list() -> None:
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from flow_vs_glow import FlatAdam, mango

    models = [mango(32), mango(32)]  # the benchmark's flow at 32², seeded: two identical copies
    x = torch.rand(2, 6, 32, 32) - 0.5
    flat, ref = FlatAdam(models[0]), torch.optim.Adam(models[1].parameters(), lr=1e-3, fused=True)
    for _ in range(3):
        for model, opt in zip(models, (flat, ref)):
            opt.zero_grad(set_to_none=True)
            model.bits_per_dim(x[:, :3], x[:, 3:]).mean().backward()
            opt.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    grad = models[0].flows[0].blocks[0].layers[0].lu.grad  # accumulated in place into the flat gradient buffer
    assert grad.untyped_storage().data_ptr() == flat.grad.untyped_storage().data_ptr()
