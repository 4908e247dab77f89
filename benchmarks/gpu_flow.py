"""GPU report (never a gate): bf16 exactness, ICA speed, and the 256×256 flow's step time, MFU and batch limit.

Run on a CUDA machine: ``python benchmarks/gpu_flow.py``. Uses only ``pipeline.flows`` (torch alone), so it
runs where the rest of the stack is not installed. What is measured:

1. bf16 autocast round trip of one MangoBlock (L = 2·1024 tokens, D = 48): relative error, log-det dtype.
2. ICA forward+backward at n ∈ {1024, 2048, 4096} tokens per group (batch 4, D = 64), fp32 vs bf16.
3. ``mango_256.yaml``'s flow (3 ch, 256², patch 4, 4 levels × 4 blocks, dim 256, LICA groups of 256) in bf16:
   a training step (forward, backward, AdamW) with per-block activation checkpointing; model FLOPs of the
   forward+backward (FlopCounterMode, without the recompute) / step time / peak bf16 throughput = MFU.
4. The largest power-of-two batch whose training step fits (checkpointing on).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.flows import ICA, MangoBlock, MultiscaleMangoFlow, data_init

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak (SXM)


def timed(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def bf16_roundtrip() -> None:
    torch.manual_seed(0)
    block = MangoBlock(48, 2048, lica_group=256).cuda()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.05 * torch.randn_like(p))
        x = torch.randn(4, 2048, 48, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, ld = block(x)
            xr, ldr = block(y, reverse=True)
    rel = ((xr - x).norm() / x.norm()).item()
    print(f"[bf16] MangoBlock round trip rel. error {rel:.2e}; logdet dtype {ld.dtype}; "
          f"|logdet_fwd + logdet_rev| max {(ld + ldr).abs().max().item():.2e}")


def ica_speed() -> None:
    print(f"[ica] forward+backward, batch 4, D 64 (min of 5)\n{'n':>6}{'fp32 ms':>10}{'bf16 ms':>10}{'peak GiB bf16':>15}")
    for n in (1024, 2048, 4096):
        layer = ICA(64, 2 * n, "mmca1").cuda()
        with torch.no_grad():
            layer.beta.normal_()
        x = torch.randn(4, 2 * n, 64, device="cuda", requires_grad=True)

        def step(dtype):
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                y, ld = layer(x)
            (y.float().square().mean() - ld.mean()).backward()

        t32 = timed(lambda: step(torch.float32))
        torch.cuda.reset_peak_memory_stats()
        t16 = timed(lambda: step(torch.bfloat16))
        print(f"{n:>6}{t32 * 1e3:>10.2f}{t16 * 1e3:>10.2f}{torch.cuda.max_memory_allocated() / 2**30:>15.2f}")


def flow_256(memory: str) -> MultiscaleMangoFlow:
    torch.manual_seed(0)
    return MultiscaleMangoFlow(3, 256, 4, 4, 256, patch_size=4, lica_group=256, memory=memory).cuda()


def train_step(flow, opt, a, b):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = flow.bits_per_dim(a, b).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def mfu_256(batch: int) -> None:
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    a, b = (torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, device="cuda") for _ in range(2))
    store = flow_256("store")
    data_init(store, a[:4], b[:4], mode="bits_per_dim")
    params = sum(p.numel() for p in store.parameters())
    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = store.bits_per_dim(a, b).mean()
        loss.backward()
    flops = counter.get_total_flops()
    del store
    torch.cuda.empty_cache()
    flow = flow_256("checkpoint")
    data_init(flow, a[:4], b[:4], mode="bits_per_dim")
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-4)
    torch.cuda.reset_peak_memory_stats()
    t = timed(lambda: train_step(flow, opt, a, b), reps=3)
    mem = torch.cuda.max_memory_allocated() / 2**30
    mfu = f"{flops / t / peak:.1%}" if peak else "n/a (unknown peak)"
    print(f"[256²] {name}: {params / 1e6:.2f}M params, batch {batch}: step {t * 1e3:.0f} ms, "
          f"{batch / t:.1f} img-pairs/s, {flops / 1e12:.2f} TFLOP/step (fwd+bwd, no recompute), "
          f"{flops / t / 1e12:.1f} TFLOP/s, MFU {mfu}, peak mem {mem:.1f} GiB (checkpointing on)")


def max_batch(limit: int = 512) -> None:
    flow = flow_256("checkpoint")
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-4)
    fits, batch = 0, 8
    while batch <= limit:
        try:
            a, b = (torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, device="cuda") for _ in range(2))
            train_step(flow, opt, a, b)
            torch.cuda.synchronize()
            fits = batch
            batch *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    print(f"[256²] largest power-of-two batch that fits a bf16 training step with checkpointing: {fits}"
          f"{' (limit reached)' if fits == limit else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_flow.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True
    bf16_roundtrip()
    ica_speed()
    mfu_256(args.batch)
    max_batch()


if __name__ == "__main__":
    main()
