"""How much of a bf16-autocast training step is bf16 work: FLOPs of one forward + backward, split by dtype.

Run: ``.venv/bin/python benchmarks/flops_dtype.py [--sizes 64 128] [--dim 128] [--batch 2] [--device cpu]``

The model is :class:`~pipeline.flows.MultiscaleMangoFlow` shaped like ``launch/configs/mango_256.yaml`` but
CPU-sized: 3 channels per modality, patch 4, token width 128, partitions ``all``, LICA groups of 64, 3 levels
× 2 blocks, batch 2. One forward + backward of −log p under CPU bf16 autocast, counted with
:class:`pipeline.flops.DtypeFlopCounter` (torch's FLOP formulas; the CPU attention kernel priced like its CUDA
twin). FLOPs are counted, not timed, so the figures are exact and machine-independent.

Printed per size: total GFLOP, the bf16 share, and the fp32 FLOPs by op. ``--attention`` picks the ICA path
(``auto`` as the recipes, ``plain``, ``fused``). ``--baseline`` also counts the same step with the
plan's ``lowp_attention`` off — the path every bf16 run took before: q/k cast to fp32, the attention in fp32,
and a second pass over the scores for the log-det diagonal — and prints the ratio new / baseline.
"""

from __future__ import annotations

import argparse

import torch

from pipeline.flops import DtypeFlopCounter
from pipeline.flows import MultiscaleMangoFlow, data_init
from pipeline.flows.plan import ExecutionPlan


def count(size: int, dim: int, batch: int, attention: str, device: str, lowp_attention: bool = True) -> dict:
    torch.manual_seed(0)
    flow = MultiscaleMangoFlow(
        3,
        size,
        levels=3,
        blocks_per_level=2,
        dim=dim,
        patch_size=4,
        partitions="all",
        lica_group=64,
        attention=attention,
    ).to(device)
    ExecutionPlan(device=device, precision="bf16", lowp_attention=lowp_attention).apply(flow)
    a = torch.randint(0, 256, (batch, 3, size, size), device=device).float()
    b = torch.randint(0, 256, (batch, 3, size, size), device=device).float()
    with torch.no_grad():
        data_init(flow, a, b)
    with torch.autocast(device, dtype=torch.bfloat16), DtypeFlopCounter() as counter:
        loss = -flow.log_prob(a, b).mean()
        loss.backward()
    fp32 = {op: f / 1e9 for (op, dt), f in sorted(counter.by_op.items(), key=lambda kv: -kv[1]) if dt == torch.float32}
    return {
        "size": size,
        "gflop": counter.total / 1e9,
        "bf16_share": counter.share(torch.bfloat16),
        "fp32_gflop": counter.by_dtype.get(torch.float32, 0) / 1e9,
        "fp32_by_op": fp32,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--attention", default="auto", choices=["auto", "plain", "fused"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--baseline", action="store_true", help="also count the pre-plan path and print ratios")
    args = ap.parse_args()
    rows = [count(s, args.dim, args.batch, args.attention, args.device) for s in args.sizes]
    base = {}
    if args.baseline:
        base = {
            s: count(s, args.dim, args.batch, args.attention, args.device, lowp_attention=False) for s in args.sizes
        }
    for r in rows:
        line = f"{r['size']}²: {r['gflop']:.1f} GFLOP per step, bf16 share {r['bf16_share']:.3f}, fp32 {r['fp32_gflop']:.2f} GFLOP"
        if r["size"] in base:
            b = base[r["size"]]
            line += (
                f" | baseline {b['gflop']:.1f} GFLOP, bf16 share {b['bf16_share']:.3f}"
                f" | FLOPs new/baseline {r['gflop'] / b['gflop']:.3f}"
            )
        print(line)
        top = ", ".join(f"{op} {g:.2f}" for op, g in list(r["fp32_by_op"].items())[:6])
        print(f"   fp32 by op (GFLOP): {top or 'none'}")


if __name__ == "__main__":
    main()
