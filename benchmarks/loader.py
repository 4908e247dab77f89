"""Shards vs a plain folder of PNGs: writing, and reading + decoding to tensors with 0 and 2 workers.

    .venv/bin/python benchmarks/loader.py [--patch 64] [--stride 8] [--repeats 3] [--batch-size 32]

Both sides hold the same samples (embedded Middlebury stereo patches: left RGB, right RGB, uint16 depth,
JSON metadata), encoded by the same PNG codec and decoded by the same ``decode_sample`` into the same
tensors, so the difference is the container: one sequential tar stream per shard vs four small files per
sample. Each figure is the best (min time) of ``--repeats`` runs in this one process, reported as samples/s;
the ratio column is shards / folder (> 1: shards are faster). Worker start-up is inside every read timing.
Writes go to a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.data import build_eval_loader, collate, decode_sample, write_split
from pipeline.data.codecs import encode_png
from pipeline.data.sources import open_source


def best_rate(samples: int, run: Callable[[], int], repeats: int) -> float:
    """Samples/s of the fastest of ``repeats`` runs; ``run`` returns how many samples it processed."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        done = run()
        best = min(best, time.perf_counter() - start)
        if done != samples:
            raise RuntimeError(f"benchmark run processed {done} samples, expected {samples}")
    return samples / best


def write_folder(source, keys: list[str], folder: str) -> int:
    os.makedirs(folder, exist_ok=True)
    for key in keys:
        for name, value in source.load("train", key).items():
            data = json.dumps(value, sort_keys=True).encode() if name == "json" else encode_png(value)
            with open(os.path.join(folder, f"{key}.{name}"), "wb") as f:
                f.write(data)
    return len(keys)


class FolderDataset(Dataset):
    """Map-style dataset over ``<key>.<modality>`` files, decoded exactly like shard samples."""

    def __init__(self, folder: str, keys: list[str], modalities: list[str]) -> None:
        self.folder, self.keys, self.modalities = folder, keys, modalities

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        raw = {"__key__": self.keys[i]}
        for name in self.modalities:
            with open(os.path.join(self.folder, f"{self.keys[i]}.{name}"), "rb") as f:
                raw[name] = f.read()
        return decode_sample(raw)


def count(loader) -> int:
    return sum(len(b["__key__"]) for b in loader)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--stride", type=int, default=8)  # 3410 samples: enough that worker start-up is not the story
    ap.add_argument("--samples-per-shard", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)  # decoding is per-sample Python/Pillow work; keep both sides single-threaded
    options = {"patch": args.patch, "stride": args.stride}
    source = open_source("embedded", "stereo", **options)
    keys = source.keys("train")
    modalities = sorted(source.modalities("train"))
    n = len(keys)
    root = tempfile.mkdtemp(prefix="mango-bench-")
    try:
        shards, folder = os.path.join(root, "shards"), os.path.join(root, "folder")

        def write_shards() -> int:
            shutil.rmtree(shards, ignore_errors=True)  # no receipts to reuse: every run writes everything
            return write_split(
                "embedded",
                "stereo",
                shards,
                "train",
                options=options,
                progress=False,
                samples_per_shard=args.samples_per_shard,
            ).total_samples

        def write_files() -> int:
            shutil.rmtree(folder, ignore_errors=True)
            return write_folder(source, keys, folder)

        rows = [("write", best_rate(n, write_shards, args.repeats), best_rate(n, write_files, args.repeats))]
        manifest = os.path.join(shards, "manifest-train.json")
        for workers in (0, 2):

            def read_shards(workers: int = workers) -> int:
                return count(build_eval_loader(manifest, args.batch_size, rank=0, world_size=1, num_workers=workers))

            def read_folder(workers: int = workers) -> int:
                return count(
                    DataLoader(
                        FolderDataset(folder, keys, modalities),
                        batch_size=args.batch_size,
                        num_workers=workers,
                        collate_fn=collate,
                    )
                )

            rows.append(
                (
                    f"read+decode, {workers} workers",
                    best_rate(n, read_shards, args.repeats),
                    best_rate(n, read_folder, args.repeats),
                )
            )
        size = sum(os.path.getsize(os.path.join(shards, f)) for f in os.listdir(shards) if f.endswith(".tar"))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"{n} samples ({', '.join(modalities)}; {args.patch}x{args.patch} px), "
        f"{args.samples_per_shard} per shard ({size / 2**20:.1f} MiB of tars), batch {args.batch_size}, "
        f"best of {args.repeats}, {os.cpu_count()} CPUs"
    )
    print(f"{'':28s} {'shards [samples/s]':>19s} {'PNG folder [samples/s]':>23s} {'shards / folder':>16s}")
    for name, shard_rate, folder_rate in rows:
        print(f"{name:28s} {shard_rate:19.0f} {folder_rate:23.0f} {shard_rate / folder_rate:16.2f}")


if __name__ == "__main__":
    main()
