"""Shard a dataset into WebDataset tars plus a manifest per split (local directory or ``s3://``).

    python -m jobs.shard embedded --src stereo --out shards/stereo --patch 32
    python -m jobs.shard embedded --src scenes --out shards/scenes --scenes 64 --size 64
    python -m jobs.shard embedded --src scenes --view top --out shards/scenes-top   # segmentation: only depth separates low/tall boxes
    python -m jobs.shard nyudv2 --src /data/nyudv2 --out s3://bucket/mango/nyudv2 --workers 8
    python -m jobs.shard make-movies --out raw/movies     # embedded image+text genres in the MM-IMDB layout
    python -m jobs.shard mmimdb --src raw/movies --out shards/movies --image-size 32
    python -m jobs.shard taskonomy --src /data/taskonomy --out shards/taskonomy --domains reshading,edge_texture,rgb
    # SLURM array (task index/count from SLURM_ARRAY_TASK_ID/COUNT), then one merge:
    sbatch --array=0-15 --wrap "python -m jobs.shard sunrgbd --src /data/SUNRGBD --out shards/sun --split train"
    python -m jobs.shard merge shards/sun --split train
    # Kubernetes indexed Job (JOB_COMPLETION_INDEX): add --num-tasks <completions>

Options: ``--split S`` (default: every split of the source), ``--samples-per-shard K``, ``--workers W``
(processes on this machine), ``--task-index I --num-tasks T`` (array form), ``--skip-bad`` (skip and count
bad samples in the manifest instead of failing). Each source adds its own flags (``--help`` after the
source name lists them). S3 credentials and endpoint come from botocore's chain (``AWS_*`` variables,
profile, instance role). Re-running skips shards whose checksum already matches. Exit status 0 on success;
errors name the offending file.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.data.sources import SOURCES, source_class
from pipeline.data.sources.movies import main as make_movies
from pipeline.data.writer import DEFAULT_SAMPLES_PER_SHARD, merge_split, resolve_task, write_split


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _source_parser(source: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m jobs.shard {source}", description=f"Shard the {source} dataset.")
    p.add_argument("--src", default=None, help="raw dataset folder (embedded: 'stereo' or 'scenes')")
    p.add_argument("--out", default=None, help="output folder or s3://bucket/prefix (default shards/<name>)")
    p.add_argument("--split", default=None, help="split to write (default: all splits of the source)")
    p.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD)
    p.add_argument("--workers", type=int, default=1, help="writer processes on this machine")
    p.add_argument("--task-index", type=int, default=None, help="array task index (default: SLURM / K8s env)")
    p.add_argument("--num-tasks", type=int, default=None, help="array task count (default: SLURM env, else 1)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad samples instead of failing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    for name, (typ, default, help_) in source_class(source).OPTIONS.items():
        p.add_argument(_flag(name), dest=name, type=typ, default=default, help=f"{help_} (default {default})")
    return p


def _merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.shard merge", description="Verify an array job's partial manifests and commit the split."
    )
    p.add_argument("out", help="the shard folder or s3:// prefix the array tasks wrote to")
    p.add_argument("--split", required=True)
    p.add_argument("--no-verify", action="store_true", help="trust the parts' sha256 instead of re-reading shards")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(sys.argv[1:] if argv is None else argv)
    except (ValueError, OSError) as exc:  # bad input: one line naming the file, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    choices = sorted(SOURCES) + ["merge", "make-movies"]
    if not argv or argv[0] not in choices:
        print(__doc__, file=sys.stderr)
        print(f"first argument must be one of {choices}", file=sys.stderr)
        return 2
    if argv[0] == "make-movies":  # the embedded image+text set, written in the MM-IMDB layout
        return make_movies(argv[1:])
    if argv[0] == "merge":
        a = _merge_parser().parse_args(argv[1:])
        m = merge_split(a.out, a.split, verify=not a.no_verify)
        print(
            f"committed {m.location}: {m.total_samples} samples in {len(m.shards)} shards "
            f"({m.skipped_samples} skipped), checksum {m.manifest_checksum()}"
        )
        return 0
    source = argv[0]
    a = _source_parser(source).parse_args(argv[1:])
    options = {k: getattr(a, k) for k in source_class(source).OPTIONS}
    out = a.out or (f"shards/{source}-{a.src or 'stereo'}" if source == "embedded" else f"shards/{source}")
    task_index, num_tasks = resolve_task(a.task_index, a.num_tasks)
    splits = [a.split] if a.split else list(source_class(source)(a.src, **options).splits)
    job_args = {
        "source": source,
        "src": a.src,
        "out": out,
        "samples_per_shard": a.samples_per_shard,
        "workers": a.workers,
        "skip_bad": a.skip_bad,
        **options,
    }
    for split in splits:
        m = write_split(
            source,
            a.src,
            out,
            split,
            options=options,
            samples_per_shard=a.samples_per_shard,
            workers=a.workers,
            task_index=task_index,
            num_tasks=num_tasks,
            skip_bad=a.skip_bad,
            args={**job_args, "split": split},
            progress=not a.quiet,
        )
        print(
            f"{'committed' if num_tasks == 1 else 'wrote part'} {m.location}: {m.total_samples} samples in "
            f"{len(m.shards)} shards ({m.skipped_samples} skipped), checksum {m.manifest_checksum()}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
