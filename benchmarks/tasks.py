"""Does each latent task learn *because of* the fusion? MANGO vs single modality vs concat, same budget.

For every task the demo config (``launch/configs/<task>_demo.yaml``) is trained through the DeepSpeed
``train_loop`` three (or four) times with the SAME config, steps, batch and seed, changing only:

- ``mango``: the config as shipped (each modality → tokens → MangoFlow G → fused head);
- ``<modality> only``: ``data.modalities`` reduced to one input (+ the target): the single-modality model;
- ``concat``: ``model.fusion=concat`` — the same encoders and head on concatenated tokens, no flow.

Data (embedded, held-out split disjoint from training):

- segmentation — pybullet scenes seen from above (``embedded --src scenes --view top``): low and tall boxes
  are the same grey square in RGB, only depth separates them; held-out = other scenes. Metric: mIoU.
- translation — the Middlebury stereo pair at downscale 5 (disparity ~2-12 px in the 16 px patch), left RGB +
  depth → right view; held-out = the right 35% of the image columns, one patch apart from the training region,
  patches every 4 px (132). Metrics: MAE, MSE (target in [0, 1]); the table also prints two references that are
  not models: the left patch copied (0.1286 MAE) and the left patch warped by the true disparity (0.0446).
  The demo config's head is ``model.decoder=warp`` (one regressed horizontal shift per pixel from the fused
  latent, the left RGB warped by it with ``grid_sample``; the same head in all three variants). Measured with
  ``taskset -c 0 env OMP_NUM_THREADS=1 python benchmarks/tasks.py --tasks translation`` (800 steps, one pinned
  core, another job on the other core), held-out MAE / MSE:

                        warp, seed 0     warp, seed 1     select, seed 0   select, seed 1   direct, seed 0
      mango             0.0566 / 0.0110  0.0569 / 0.0106  0.0761 / 0.0157  0.0755 / 0.0168  0.1161 / 0.0239
      rgb only          0.0703 / 0.0148  0.0728 / 0.0152  0.0847 / 0.0181  0.0861 / 0.0189  0.1114 / 0.0234
      concat (no flow)  0.0534 / 0.0095  0.0514 / 0.0086  0.0730 / 0.0152  0.0676 / 0.0130  0.1227 / 0.0263

  (seed 1: ``run.seed=1``; select / direct: ``model.decoder=select`` / ``direct`` appended to the command.)
  With a view-synthesis head both fusion models beat RGB alone (depth tells the disparity): warp, MANGO −19% /
  −22% MAE vs RGB only; with the direct pixel decoder neither does. Concat is better than MANGO here (no flow,
  7× faster on CPU); the best model is still above the true-disparity warp (0.0446).
- classification — the embedded MM-IMDB-format genre set (``jobs.shard make-movies``): 11 genres only the
  poster shows, 12 only the plot tells. Metrics: micro / macro F1 (threshold 0.5, sklearn semantics).
- density — ``benchmarks/stereo_density.py``'s joint flow vs the summed single-view flows (bits/dim).

    python benchmarks/tasks.py                              # every task, the demo configs' steps
    python benchmarks/tasks.py --tasks classification --steps 150
    python benchmarks/tasks.py --tasks segmentation train.max_steps=... (any config override after the flags)
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jobs.demo import STEREO as DEMO_STEREO
from pipeline.config import load_config
from pipeline.data import write_split
from pipeline.data.sources.embedded import BASELINE_MM, DOFFS_PX, FOCAL_PX, EmbeddedSource, stereo_arrays
from pipeline.data.sources.movies import write_movie_folder
from pipeline.tasks import get_task
from pipeline.train.loop import train_loop

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "launch" / "configs"
TASKS = ("segmentation", "translation", "classification", "density")
#: the held-out metrics printed per task (first = the headline), from the tasks' own metric lists
METRICS = {
    name: tuple(f"val_{m}" for m in (t.headline, *(m for m in t.metrics if m != t.headline)))
    for name, t in ((name, get_task(name)) for name in TASKS)
    if t.latent
}
#: translation shards (as translation_demo.yaml): at downscale 5 the disparity is ~2-12 px (median 8) inside the
#: 16 px patch (at 3 it was ~3-20, median 13); stride 2 = 4x the training windows of the default P/2. Held out: the
#: right 35% of the columns, patches every 4 px (the default 1/4 at stride P leaves 6 patches at this downscale)
STEREO = {"downscale": 5, "stride": 2, "holdout": 0.35, "val_stride": 4}


def _write_splits(cfg, out: Path, source: str, src: str, per_shard: int, options) -> None:
    """The config's train and held-out splits of ``source``; ``options(split)`` gives each split's options."""
    for split in (cfg.data.train_split, cfg.data.val_split):
        write_split(source, src, str(out), split, progress=False, samples_per_shard=per_shard, options=options(split))


def _shard_scenes(cfg, out: Path, scenes: int, movies: int) -> None:
    def options(split: str) -> dict:
        count = scenes if split == cfg.data.train_split else max(16, scenes // 3)
        return {"scenes": count, "size": cfg.model.image_size, "view": "top"}

    _write_splits(cfg, out, "embedded", "scenes", 64, options)


def _shard_stereo(cfg, out: Path, scenes: int, movies: int) -> None:
    _write_splits(cfg, out, "embedded", "stereo", 64, lambda split: {"patch": cfg.model.image_size, **STEREO})


def _shard_movies(cfg, out: Path, scenes: int, movies: int) -> None:
    raw = out.parent / "movies-raw"
    write_movie_folder(str(raw), train=movies, dev=max(16, movies // 4), test=max(16, movies // 4), seed=0)
    _write_splits(cfg, out, "mmimdb", str(raw), 128, lambda split: {"image_size": cfg.model.image_size})


@dataclass(frozen=True)
class Embedded:
    """This benchmark's embedded data set for one latent task, and how its table is drawn."""

    shard: Callable[..., None]  # (cfg, out, scenes, movies): write the train / held-out shards
    target: str = ""  # the target modality when the config does not name it
    each_single: bool = False  # a single-modality row per input (else: the first input only)
    references: bool = False  # print the no-model stereo references under the table


#: per latent task: its embedded set (the density rows come from benchmarks/stereo_density.py)
EMBEDDED = {
    "segmentation": Embedded(_shard_scenes, target="label"),
    "translation": Embedded(_shard_stereo, references=True),
    "classification": Embedded(_shard_movies, target="labels", each_single=True),  # genres need both
}
TARGET_KEYS = {task: e.target for task, e in EMBEDDED.items() if e.target}


def shard_task(task: str, cfg, out: Path, scenes: int, movies: int = 512) -> None:
    """Write the task's embedded train / held-out shards under ``out`` (seconds on CPU)."""
    if task not in EMBEDDED:
        raise ValueError(f"shard_task: no embedded set for task {task!r}")
    EMBEDDED[task].shard(cfg, out, scenes, movies)


def variants(task: str, cfg) -> dict[str, list[str]]:
    """name → overrides: the shipped MANGO model, each single-modality model, concat fusion."""
    mods = list(cfg.data.modalities)
    target = cfg.model.target or TARGET_KEYS[task]
    if target not in mods:
        raise ValueError(f"{task}: target {target!r} is not among data.modalities {mods}")
    inputs = [m for m in mods if m != target]
    if len(inputs) != 2:
        raise ValueError(f"{task}: the fusion comparison needs two input modalities, the config has {inputs}")
    singles = inputs if EMBEDDED[task].each_single else inputs[:1]  # genres need both: show each alone
    out = {"mango": []}
    for m in singles:
        out[f"{m} only"] = [f"data.modalities=[{m},{target}]"]
    out["concat (no flow)"] = ["model.fusion=concat"]
    return out


def run_task(
    task: str,
    tmp: Path,
    steps: int | None,
    overrides: list[str],
    scenes: int,
    movies: int = 512,
    only: list[str] | None = None,
) -> list[tuple[str, dict, float]]:
    config = CONFIGS / f"{task}_demo.yaml"
    if not config.exists():
        raise FileNotFoundError(f"{config}: the {task} demo config is not there yet")
    shards = tmp / task / "shards"
    base = [f"data.shards={shards}", "tracking.enabled=false", "data.num_workers=0"]
    if steps:
        base += [f"train.max_steps={steps}", f"eval.every={steps}", f"checkpoint.every={steps}"]
    cfg = load_config(config, base + overrides)
    shard_task(task, cfg, shards, scenes, movies)
    rows = []
    chosen = variants(task, cfg)
    missing = [v for v in only or [] if v not in chosen]
    if missing:
        raise ValueError(f"{task}: unknown variant(s) {missing}; this task has {list(chosen)}")
    for name, extra in chosen.items():
        if only and name not in only:
            continue
        run_cfg = load_config(config, base + overrides + extra + [f"run.dir={tmp / task / name.replace(' ', '_')}"])
        start = time.monotonic()
        result = train_loop(run_cfg)
        rows.append((name, result, time.monotonic() - start))
    return rows


def stereo_references(patch: int, split: str = "val") -> dict[str, dict[str, float]]:
    """Reference rows for translation (no model): the held-out patches' MAE/MSE of

    - ``copy left patch``: the left view as the prediction of the right one;
    - ``oracle depth warp``: the left patch warped by the *true* disparity of its depth map
      (``d = (f·B/Z − doffs)/s``, right[x] ≈ left[x + d(x)], bilinear, clamped at the patch edge; pixels without
      depth take the patch's median disparity) — an upper reference for what depth can tell, not a model.
    """
    src = EmbeddedSource("stereo", patch=patch, **STEREO)
    left, right, depth = stereo_arrays(STEREO["downscale"])
    err = {"copy left patch": [], "oracle depth warp": []}
    cols = np.arange(patch, dtype=np.float64)
    for key in src.keys(split):
        y, x = (int(part[1:]) for part in key.split("-")[-2:])
        win = (slice(y, y + patch), slice(x, x + patch))
        lp, rp, z = left[win] / 255.0, right[win] / 255.0, depth[win].astype(np.float64)
        valid = z > 0
        disp = np.where(valid, (FOCAL_PX * BASELINE_MM / np.where(valid, z, 1.0) - DOFFS_PX) / STEREO["downscale"], 0.0)
        disp[~valid] = np.median(disp[valid]) if valid.any() else 0.0
        src_x = np.clip(cols[None, :] + disp, 0, patch - 1)  # (P, P) source column per output pixel
        x0 = np.floor(src_x).astype(int)
        x1, t = np.minimum(x0 + 1, patch - 1), (src_x - x0)[..., None]
        rows = np.arange(patch)[:, None]
        warped = (1 - t) * lp[rows, x0] + t * lp[rows, x1]
        err["copy left patch"].append(lp - rp)
        err["oracle depth warp"].append(warped - rp)
    return {k: {"val_mae": float(np.mean(np.abs(v))), "val_mse": float(np.mean(np.square(v)))} for k, v in err.items()}


def print_table(task: str, rows: list[tuple[str, dict, float]], steps: int, patch: int = 0) -> None:
    names = METRICS[task]
    print(f"\n{task}: held-out split, {steps} steps each (same config, batch, seed)")
    print(f"{'model':<20}" + "".join(f"{n.removeprefix('val_'):>12}" for n in names) + f"{'wall s':>9}")
    for name, result, wall in rows:
        print(f"{name:<20}" + "".join(f"{result[n]:>12.4f}" for n in names) + f"{wall:>9.0f}")
    if EMBEDDED[task].references:
        print("references (no model, same held-out patches):")
        for name, result in stereo_references(patch).items():
            print(f"  {name:<18}" + "".join(f"{result[n]:>12.4f}" for n in names))
    sys.stdout.flush()


def density_table(tmp: Path, steps: int, overrides: list[str]) -> None:
    """Joint vs single-view flows on the stereo pair: ``benchmarks/stereo_density.py``'s runs and numbers."""
    spec = importlib.util.spec_from_file_location("stereo_density", REPO / "benchmarks" / "stereo_density.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for split in ("train", "val"):
        write_split(
            "embedded", "stereo", str(tmp / "shards"), split, options=DEMO_STEREO, samples_per_shard=64, progress=False
        )
    rows = {
        name: bench.run(tmp, name, mods, steps, overrides)
        for name, mods in (("joint", "[rgb,right]"), ("left only", "[rgb]"), ("right only", "[right]"))
    }
    joint, left, right = (rows[k][0] for k in ("joint", "left only", "right only"))
    print(f"\ndensity: held-out bits/dim, {steps} steps each (same config, batch, seed)")
    print(f"{'model':<20}{'bits/dim':>12}{'wall s':>9}")
    for name, (bpd, wall) in rows.items():
        print(f"{name:<20}{bpd:>12.4f}{wall:>9.0f}")
    print(
        f"{'(left + right) / 2':<20}{(left + right) / 2:>12.4f}   joint / summed singles = {joint / ((left + right) / 2):.4f}"
    )
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {TASKS}")
    parser.add_argument("--steps", type=int, default=0, help="training steps per model (0 = the demo config's)")
    parser.add_argument("--scenes", type=int, default=192, help="segmentation: training scenes (held-out: a third)")
    parser.add_argument("--movies", type=int, default=512, help="classification: training movies (dev/test: a quarter)")
    parser.add_argument("--variants", default="", help="comma-separated subset of the variants, e.g. 'mango,rgb only'")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every model (section.key=value)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = set(tasks) - set(TASKS)
    if unknown:
        parser.error(f"unknown task(s) {sorted(unknown)}; choose from {TASKS}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for task in tasks:
            if not get_task(task).latent:  # the joint pixel-level flow vs single views
                density_table(tmp / "density", args.steps or 300, args.overrides)
                continue
            only = [v.strip() for v in args.variants.split(",") if v.strip()] or None
            rows = run_task(task, tmp, args.steps or None, args.overrides, args.scenes, args.movies, only)
            cfg = load_config(CONFIGS / f"{task}_demo.yaml", args.overrides)
            print_table(task, rows, args.steps or cfg.train.max_steps, cfg.model.image_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
