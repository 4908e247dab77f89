"""Two real ranks (gloo on 127.0.0.1) × two DataLoader workers, in one launch.

Exact pass: the ranks read disjoint samples whose union is the whole split, run the same number of steps
(a collective every step would hang otherwise) and padding batches add nothing. Training pass: both ranks
deliver the same number of batches, drawn from different streams.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.data import build_eval_loader, build_train_loader, load_manifest
from tests.conftest import free_port

WORLD = 2


def _rank_main(rank: int, port: int, eval_url: str, train_url: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        loader = build_eval_loader(eval_url, 5, rank=rank, world_size=WORLD, num_workers=2)
        keys, steps, padding, counted = [], 0, 0, 0.0
        for batch in loader:
            steps += 1
            valid = batch["__valid__"]
            keys += [k for k, ok in zip(batch["__key__"], valid.tolist()) if ok]
            padding += int(not valid.any())
            n = torch.tensor([float(valid.sum())])
            dist.all_reduce(n)  # every rank must join every step, as a ZeRO-3 forward would
            counted += n.item()
        train = build_train_loader(train_url, 4, rank=rank, world_size=WORLD, num_workers=2, seed=3)
        first, batches = None, 0
        for batch in train:
            first = first or batch["__key__"]
            batches += 1
            dist.barrier()
        result = {
            "keys": keys,
            "steps": steps,
            "padding": padding,
            "counted": counted,
            "expected_steps": len(loader),
            "train_batches": batches,
            "train_len": len(train),
            "train_first": first,
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_ranks_two_workers_exact_and_training_passes(stereo_shards, tmp_path):
    full = load_manifest(str(stereo_shards / "manifest-train.json"))
    # Five shards: rank 0 gets shards 0, 2, 4 (48 samples), rank 1 gets 1, 3 (32) — uneven on purpose.
    uneven = dataclasses.replace(full, shards=full.shards[:5], total_samples=80)
    uneven_url = stereo_shards / "manifest-uneven.json"  # beside the shards its names resolve against
    uneven_url.write_text(uneven.to_json())
    mp.spawn(_rank_main, args=(free_port(), str(uneven_url), full.location, str(tmp_path)), nprocs=WORLD, join=True)
    r = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(WORLD)]

    everything = {
        k
        for b in build_eval_loader(str(uneven_url), 16, rank=0, world_size=1, num_workers=0, decode=None)
        for k in b["__key__"]
    }
    assert len(everything) == 80
    assert not set(r[0]["keys"]) & set(r[1]["keys"]), "ranks read disjoint samples"
    assert set(r[0]["keys"]) | set(r[1]["keys"]) == everything, "their union is the split"
    assert len(r[0]["keys"]) + len(r[1]["keys"]) == 80, "nothing read twice"
    assert r[0]["steps"] == r[1]["steps"] == r[0]["expected_steps"] == r[1]["expected_steps"] == 11
    assert (r[0]["padding"], r[1]["padding"]) == (0, 3), "the shorter rank kept stepping on padding"
    assert r[0]["counted"] == r[1]["counted"] == 80

    assert r[0]["train_batches"] == r[1]["train_batches"] == r[0]["train_len"] == 224 // (4 * WORLD)
    assert r[0]["train_first"] != r[1]["train_first"], "ranks draw different streams"
