"""Does the fusion earn its place? MANGO vs concat vs cross-attention vs each single modality, over paired seeds.

    python benchmarks/fusion.py [--tasks segmentation,translation,classification,density] [--seeds 5] [--steps N]
                                [--quick] [--out DIR] [--tracking-uri URI] [overrides ...]

Every embedded task (its demo config, ``launch/configs/<task>_demo.yaml``, data from ``benchmarks/tasks.py``'s
``shard_task``) × seeds 0..S-1 × variants, equal steps, through the DeepSpeed ``train_loop``:

- ``mango`` — the config as shipped;
- ``concat`` — ``model.fusion=concat`` (same encoders and head, no flow);
- ``xattn`` — ``model.fusion=xattn``: a stack of bidirectional cross-attention blocks (``pipeline.models.xattn``),
  depth ``model.num_blocks``, its MLP width chosen so its parameter count is closest to MANGO's (printed);
- ``<modality> only`` — one input modality;
- density: ``mango`` (joint flow over both views) vs each single view; the paired difference is
  joint − (left + right)/2 in bits/dim;
- ``--levers``: MANGO variants that each change one configuration lever — ``mango nll 0`` (``model.nll_weight=0``),
  ``mango nll→E`` (``model.nll_to_encoders=true``), ``mango no mixer`` (``model.channel_mix=false``), ``mango
  twoway`` (``model.partitions=twoway``), and with a text input ``mango no lica`` (``model.partitions=mmca+imca``)
  and ``mango pad_mask`` (the same partitions + ``model.pad_mask=true``: compare it with ``mango no lica``);
  a negative difference means the lever beats the shipped configuration;
- ``nonlocal`` (``launch/configs/nonlocal_demo.yaml``): the right view from the left one + an unregistered copy of
  it displaced 8–16 px, beyond the encoder's 7 px receptive field — the dependence attention exists for.

Seeds are **paired**: variant v and MANGO share ``run.seed`` (initialisation, data order, noise), so the
per-seed difference ``metric(v) − metric(mango)`` cancels what the seed does to both. Reported per task and
variant: the mean over seeds, and the mean of the per-seed differences to MANGO with its 95 % confidence
interval (Student t, S − 1 degrees of freedom), signed so that **positive = MANGO better**. Concat cannot be
widened to MANGO's parameter count without changing what it is (it has no fusion parameters); its count is
printed beside.

Outputs: a markdown table (stdout and ``<out>/fusion.md``), ``<out>/fusion.json`` (every cell), ``<out>/cells.jsonl``
(each cell as it finishes: ``--resume`` runs only the cells it lacks, so an hours-long study survives a stop; several
runs may share one ``--out``, e.g. one per core, and ``--report`` then summarises them all without training), and an
MLflow parent
run ``fusion-study`` with a child run per (task, variant, seed) (``--tracking-uri``; default: the project's local
store). ``--quick`` = 3 seeds and the demo configs' steps / 4 (development; under an hour on 2 cores);
the full study prints each run's wall time so its cost is known before scaling it up.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from jobs.demo import shard_stereo
from pipeline.config import load_config
from pipeline.config_rules import ConfigError
from pipeline.data import load_manifest, manifest_name, write_split
from pipeline.data.storage import join
from pipeline.models import build_model, modality_specs
from pipeline.tasks import TASKS, get_task
from pipeline.train.loop import train_loop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tasks import CONFIGS, METRICS, TARGET_KEYS, shard_task  # noqa: E402  (the sibling benchmark's data and names)

#: headline metric per study (one per task, from the task; nonlocal is a translation config) and whether larger
#: is better
HEADLINE = {t.name: (f"val_{t.headline}", t.higher_is_better) for t in TASKS}
HEADLINE["nonlocal"] = HEADLINE[get_task("translation").name]
#: the non-local task's shards (launch/configs/nonlocal_demo.yaml): an unregistered right view, 8-16 px away
NONLOCAL = {"patch": 24, "downscale": 3, "stride": 4, "holdout": 0.35, "val_stride": 4, "shift": 16}
#: two-sided 95 % Student t quantiles by degrees of freedom


def _shard_nonlocal(cfg, shards: Path) -> None:
    for split in (cfg.data.train_split, cfg.data.val_split):
        write_split("embedded", "stereo", str(shards), split, options=NONLOCAL, samples_per_shard=256, progress=False)


#: studies whose shards are not benchmarks/tasks.py's embedded sets: the demo's stereo pair, the non-local pair
SHARDS = {"density": lambda cfg, shards: shard_stereo(str(shards)), "nonlocal": _shard_nonlocal}
T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}


def t975(df: int) -> float:
    return T975.get(df) or T975[max(k for k in T975 if k <= df)]


def paired_interval(diffs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of the 95 % t interval of the per-seed differences (nan interval for one seed)."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.nan, math.nan
    half = t975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def param_count(cfg) -> int:
    return sum(p.numel() for p in build_model(cfg, modality_specs(cfg, _manifest(cfg))).parameters())


def _manifest(cfg):
    return load_manifest(join(cfg.data.shards, manifest_name(cfg.data.train_split)))


def matched_xattn_ratio(config: Path, base: list[str], target: int) -> tuple[float, int]:
    """The ``model.xattn_mlp_ratio`` whose parameter count is closest to ``target`` (the count is linear in the
    ratio: measured at 1 and 2, solved, then checked)."""
    n1, n2 = (
        param_count(load_config(config, [*base, "model.fusion=xattn", f"model.xattn_mlp_ratio={r}"]))
        for r in (1.0, 2.0)
    )
    ratio = max(0.125, round(1.0 + (target - n1) / max(1, n2 - n1), 3))
    n = param_count(load_config(config, [*base, "model.fusion=xattn", f"model.xattn_mlp_ratio={ratio}"]))
    return ratio, n


#: one-key MANGO variants (``--levers``), paired with the shipped configuration like every other variant
LEVERS = {
    "mango nll 0": ["model.nll_weight=0"],
    "mango nll→E": ["model.nll_to_encoders=true"],
    "mango no mixer": ["model.channel_mix=false"],
    "mango twoway": ["model.partitions=twoway"],
}
#: for inputs with padding (text): the mask needs partitions without lica, so both sides of its comparison drop it
PAD_LEVERS = {
    "mango no lica": ["model.partitions=mmca+imca"],
    "mango pad_mask": ["model.partitions=mmca+imca", "model.pad_mask=true"],
}


def variants(task: str, cfg, config: Path, base: list[str], levers: bool = False) -> dict[str, list[str]]:
    mods = list(cfg.data.modalities)
    if not get_task(cfg.model.task).latent:  # no target: the joint flow vs a flow per single modality
        return {"mango": [], **{f"{m} only": [f"data.modalities=[{m}]"] for m in mods}}
    target = cfg.model.target or TARGET_KEYS[cfg.model.task]
    inputs = [m for m in mods if m != target]
    mango_params = param_count(cfg)
    ratio, xn = matched_xattn_ratio(config, base, mango_params)
    concat_n = param_count(load_config(config, [*base, "model.fusion=concat"]))
    print(f"[{task}] parameters: mango {mango_params:,}, xattn {xn:,} (mlp ratio {ratio}), concat {concat_n:,}")
    padded = any(m.split(".")[0] == "text" for m in inputs)
    return {
        "mango": [],
        "concat": ["model.fusion=concat"],
        "xattn": ["model.fusion=xattn", f"model.xattn_mlp_ratio={ratio}"],
        **{f"{m} only": [f"data.modalities=[{m},{target}]"] for m in inputs},
        **(LEVERS if levers else {}),
        **(PAD_LEVERS if levers and padded else {}),
    }


def run_task(
    task: str,
    tmp: Path,
    seeds: list[int],
    steps: int | None,
    overrides: list[str],
    quick: bool,
    tracker,
    levers: bool = False,
    only: tuple[str, ...] = (),
    done: dict | None = None,
    journal: Path | None = None,
) -> list[dict]:
    config = CONFIGS / f"{task}_demo.yaml"
    shards = tmp / task / "shards"
    base = [f"data.shards={shards}", "tracking.enabled=false", "data.num_workers=0", *overrides]
    cfg = load_config(config, base)
    steps = steps or (max(20, cfg.train.max_steps // 4) if quick else cfg.train.max_steps)
    base += [
        f"train.max_steps={steps}",
        f"eval.every={steps}",
        f"checkpoint.every={steps}",
        f"optim.warmup_steps={min(cfg.optim.warmup_steps, steps)}",
    ]
    if task in SHARDS:
        SHARDS[task](cfg, shards)
    else:
        shard_task(task, cfg, shards, scenes=64 if quick else 128, movies=256 if quick else 512)
    cells = []
    metric, _ = HEADLINE[task]
    for name, extra in variants(task, load_config(config, base), config, base, levers).items():
        if only and name != "mango" and name not in only:
            continue
        for seed in seeds:
            if (task, name, seed) in (done or {}):  # --resume: measured by an earlier, interrupted run
                cells.append(done[task, name, seed])
                tracker.child(cells[-1])
                continue
            run_cfg = load_config(
                config,
                [*base, *extra, f"run.seed={seed}", f"run.dir={tmp / task / name.replace(' ', '_') / str(seed)}"],
            )
            try:  # built once before training: a variant the task cannot run is skipped, not the whole study
                params = param_count(run_cfg)
            except ConfigError as e:
                print(f"[{task}] {name}: not applicable ({e})", flush=True)
                break
            start = time.monotonic()
            result = train_loop(run_cfg)
            wall = time.monotonic() - start
            cell = {
                "task": task,
                "variant": name,
                "seed": seed,
                "steps": steps,
                "wall_s": wall,
                "params": params,
                "joint": not get_task(cfg.model.task).latent,  # singles are views of one joint flow
                metric: result[metric],
                **{m: result[m] for m in METRICS.get(cfg.model.task, ()) if m in result},
            }
            print(f"[{task}] {name:<16} seed {seed}: {metric} {result[metric]:.4f}  ({wall:.0f} s)", flush=True)
            tracker.child(cell)
            cells.append(cell)
            if journal is not None:
                with journal.open("a") as f:
                    f.write(json.dumps(cell) + "\n")
    return cells


def load_journal(journal: Path, resume: bool) -> dict:
    """The cells an earlier run of the same ``--out`` finished (``--resume``), keyed by (task, variant, seed); without
    ``--resume`` the journal starts empty."""
    if not resume or not journal.exists():
        journal.write_text("")
        return {}
    cells = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
    return {(c["task"], c["variant"], c["seed"]): c for c in cells}


def summarise(cells: list[dict], reference: str = "mango") -> list[dict]:
    """Per (task, variant): mean metric, and the paired differences to ``reference`` (positive = reference better;
    a task without cells of that variant is compared with ``mango``)."""
    rows = []
    for task in dict.fromkeys(c["task"] for c in cells):
        metric, higher = HEADLINE[task]
        joint = any(c.get("joint") for c in cells if c["task"] == task)
        by = {}
        for c in cells:
            if c["task"] == task:
                by.setdefault(c["variant"], {})[c["seed"]] = c[metric]
        ref = reference if reference in by else "mango"
        base = by[ref]
        singles = [v for v in by if v.endswith(" only")]
        for variant, vals in by.items():
            row = {
                "task": task,
                "variant": variant,
                "metric": metric,
                "mean": statistics.fmean(vals.values()),
                "seeds": len(vals),
                "params": next(c["params"] for c in cells if c["task"] == task and c["variant"] == variant),
            }
            if variant != ref:
                if joint:  # joint vs summed singles: one paired difference per seed over both views
                    if variant != singles[0]:
                        continue
                    row["variant"] = "summed singles"
                    vals = {s: statistics.fmean(by[v][s] for v in singles) for s in base}
                    row["mean"] = statistics.fmean(vals.values())
                diffs = [(base[s] - vals[s]) if higher else (vals[s] - base[s]) for s in base if s in vals]
                row["diff_mean"], row["diff_low"], row["diff_high"] = paired_interval(diffs)
                scale = statistics.fmean(abs(v) for v in vals.values()) or 1.0
                row["diff_relative"] = row["diff_mean"] / scale
            rows.append(row)
    return rows


def markdown(rows: list[dict], reference: str = "mango") -> str:
    name = "MANGO" if reference == "mango" else reference
    out = [
        f"| task | variant | metric | mean | params | {name} better by (mean, 95 % CI of paired diffs) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = (
            "—"
            if "diff_mean" not in r
            else f"{r['diff_mean']:+.4f} [{r['diff_low']:+.4f}, {r['diff_high']:+.4f}] ({r['diff_relative']:+.1%})"
        )
        out.append(f"| {r['task']} | {r['variant']} | {r['metric']} | {r['mean']:.4f} | {r['params']:,} | {diff} |")
    return "\n".join(out)


class Tracker:
    """One MLflow parent run for the study, a child run per cell (no-op with ``enabled=False``)."""

    def __init__(self, uri: str, enabled: bool):
        self.client = self.parent = None
        if not enabled:
            return
        from pipeline.tracking.store import client_for, ensure_experiment  # heavy: MLflow's client, only when tracking

        self.client = client_for(uri)
        exp = ensure_experiment(self.client, "mango-fusion-study")
        self.experiment = exp
        self.parent = self.client.create_run(exp, run_name="fusion-study").info.run_id

    def child(self, cell: dict) -> None:
        if self.client is None:
            return
        run = self.client.create_run(
            self.experiment,
            run_name=f"{cell['task']}/{cell['variant']}/seed{cell['seed']}",
            tags={"mlflow.parentRunId": self.parent},
        )
        rid = run.info.run_id
        for k in ("task", "variant", "seed", "steps", "params"):
            self.client.log_param(rid, k, cell[k])
        for k, v in cell.items():
            if k.startswith("val_") or k == "wall_s":
                self.client.log_metric(rid, k, float(v))
        self.client.set_terminated(rid)

    def finish(self, out: Path) -> None:
        if self.client is None:
            return
        for f in ("fusion.md", "fusion.json"):
            self.client.log_artifact(self.parent, str(out / f))
        self.client.set_terminated(self.parent)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="segmentation,translation,classification,density,nonlocal")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=0, help="steps per run (0 = the demo config's, /4 with --quick)")
    ap.add_argument("--quick", action="store_true", help="3 seeds, a quarter of the steps (development)")
    ap.add_argument("--out", default="runs/fusion-study")
    ap.add_argument("--tracking-uri", default="")
    ap.add_argument("--no-tracking", action="store_true")
    ap.add_argument("--levers", action="store_true", help="also the one-key MANGO variants (LEVERS)")
    ap.add_argument(
        "--only", default="", help="comma-separated variant names to run (mango, the reference, always runs)"
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep the cells <out>/cells.jsonl already holds (an interrupted study) and run only the missing ones",
    )
    ap.add_argument(
        "--report",
        action="store_true",
        help="train nothing: summarise the cells <out>/cells.jsonl holds for --tasks (and log them with --tracking-uri)",
    )
    ap.add_argument(
        "--reference",
        default="mango",
        help="the variant the paired differences are taken to (e.g. a lever a config now ships: 'mango twoway')",
    )
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    seeds = list(range(3 if args.quick else args.seeds))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    journal = out / "cells.jsonl"
    tasks = args.tasks.split(",")
    for task in tasks:
        if task not in HEADLINE:
            raise SystemExit(f"fusion.py: unknown task {task!r}; use {list(HEADLINE)}")
    if args.report and not journal.exists():
        raise SystemExit(f"fusion.py: --report summarises {journal}, which does not exist (run the study first)")
    done = load_journal(journal, args.resume or args.report)
    tracker = Tracker(args.tracking_uri, not args.no_tracking)
    cells: list[dict] = []
    if args.report:  # cells from several runs of the study (e.g. one per core), in task order
        cells = [c for task in tasks for c in done.values() if c["task"] == task]
        for c in cells:
            tracker.child(c)
    with tempfile.TemporaryDirectory() as d:
        for task in [] if args.report else tasks:
            cells += run_task(
                task,
                Path(d),
                seeds,
                args.steps or None,
                args.overrides,
                args.quick,
                tracker,
                args.levers,
                tuple(v.strip() for v in args.only.split(",") if v.strip()),
                done,
                journal,
            )
    rows = summarise(cells, args.reference)
    table = markdown(rows, args.reference)
    print("\n" + table)
    (out / "fusion.md").write_text(table + "\n")
    (out / "fusion.json").write_text(json.dumps({"cells": cells, "summary": rows}, indent=2))
    tracker.finish(out)
    print(
        f"\nwrote {out / 'fusion.md'} and {out / 'fusion.json'}; total run time {sum(c['wall_s'] for c in cells):.0f} s"
    )


if __name__ == "__main__":
    main()
