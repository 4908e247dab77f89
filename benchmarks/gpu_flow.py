"""GPU report (never a gate): bf16 exactness, ICA speed, and the 256×256 flow's step time, MFU and batch limit.

Run on a CUDA machine: ``python benchmarks/gpu_flow.py [--batch 8] [--config launch/configs/mango_256.yaml]``.
Uses only ``pipeline.flows`` (torch + PyYAML), so it runs where the rest of the stack is not installed.
What is measured (report only, never a gate):

1. bf16 autocast round trip of one MangoBlock (L = 2·1024 tokens, D = 48): relative error, log-det dtype.
2. ICA forward+backward at n ∈ {1024, 2048, 4096} tokens per group (batch 4, D = 64), plain vs fused
   attention, fp32 and bf16 autocast, and each path's peak memory.
3. The config's flow (``model`` section of ``--config``, default ``mango_256.yaml``) in bf16: training-step
   time and peak CUDA memory for ``memory`` = store / checkpoint / invert at ``--policy-batch``.
4. The same flow with per-block activation checkpointing at ``--batch``: a training step (forward, backward,
   AdamW); model FLOPs of the forward+backward (FlopCounterMode, without the recompute) / step time / peak
   bf16 throughput = MFU.
5. The largest power-of-two batch whose training step fits (checkpointing on).

The CPU benchmarks also run on the GPU with ``--device cuda``: ``benchmarks/memory.py``, ``scaling.py``,
``flow_vs_glow.py``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

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
    print("[ica] forward+backward, batch 4, D 64 (min of 5); plain = materialised A, fused = SDPA + chunked diagonal")
    print(f"{'n':>6}{'attention':>10}{'fp32 ms':>10}{'bf16 ms':>10}{'peak GiB bf16':>15}")
    for n in (1024, 2048, 4096):
        for attention in ("plain", "fused"):
            torch.manual_seed(0)
            layer = ICA(64, 2 * n, "mmca1", attention=attention).cuda()
            with torch.no_grad():
                layer.beta.normal_()
            x = torch.randn(4, 2 * n, 64, device="cuda", requires_grad=True)

            def step(dtype):
                with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                    y, ld = layer(x)
                (y.float().square().mean() - ld.mean()).backward()

            t32 = timed(lambda: step(torch.float32))
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            t16 = timed(lambda: step(torch.bfloat16))
            print(f"{n:>6}{attention:>10}{t32 * 1e3:>10.2f}{t16 * 1e3:>10.2f}"
                  f"{torch.cuda.max_memory_allocated() / 2**30:>15.2f}")
            del layer, x
            torch.cuda.empty_cache()


MODEL: dict = {}  # the ``model`` section of --config, set in main()


def flow_256(memory: str) -> MultiscaleMangoFlow:
    torch.manual_seed(0)
    m = MODEL
    return MultiscaleMangoFlow(m["channels"], m["image_size"], m["levels"], m["blocks_per_level"], m["dim"],
                               patch_size=m["patch_size"], lica_group=m["lica_group"], partitions=m.get("partitions", "all"),
                               memory=memory).cuda()


def images(batch: int):
    s, c = MODEL["image_size"], MODEL["channels"]
    return tuple(torch.randint(0, 256, (batch, c, s, s), dtype=torch.uint8, device="cuda") for _ in range(2))


def policies(batch: int) -> None:
    print(f"[{MODEL['image_size']}²] bf16 training step per memory policy, batch {batch} (min of 3)")
    print(f"{'memory':>12}{'step ms':>10}{'peak GiB':>10}")
    a, b = images(batch)
    for memory in ("store", "checkpoint", "invert"):
        try:
            flow = flow_256(memory)
            data_init(flow, a[:2], b[:2], mode="bits_per_dim")
            opt = torch.optim.AdamW(flow.parameters(), lr=1e-4)
            torch.cuda.reset_peak_memory_stats()
            t = timed(lambda: train_step(flow, opt, a, b), reps=3)
            print(f"{memory:>12}{t * 1e3:>10.0f}{torch.cuda.max_memory_allocated() / 2**30:>10.2f}")
        except torch.OutOfMemoryError:
            print(f"{memory:>12}{'OOM':>10}")
        finally:
            flow = opt = None
            torch.cuda.empty_cache()


def train_step(flow, opt, a, b):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = flow.bits_per_dim(a, b).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def mfu_256(batch: int) -> None:
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    a, b = images(batch)
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
    print(f"[{MODEL['image_size']}²] {name}: {params / 1e6:.2f}M params, batch {batch}: step {t * 1e3:.0f} ms, "
          f"{batch / t:.1f} img-pairs/s, {flops / 1e12:.2f} TFLOP/step (fwd+bwd, no recompute), "
          f"{flops / t / 1e12:.1f} TFLOP/s, MFU {mfu}, peak mem {mem:.1f} GiB (checkpointing on)")


def max_batch(limit: int = 512) -> None:
    flow = flow_256("checkpoint")
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-4)
    fits, batch = 0, 8
    while batch <= limit:
        try:
            a, b = images(batch)
            train_step(flow, opt, a, b)
            torch.cuda.synchronize()
            fits = batch
            batch *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    print(f"[{MODEL['image_size']}²] largest power-of-two batch that fits a bf16 training step with checkpointing: {fits}"
          f"{' (limit reached)' if fits == limit else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--policy-batch", type=int, default=2)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "launch/configs/mango_256.yaml"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_flow.py needs a CUDA device")
    import yaml

    with open(args.config) as fh:
        MODEL.update(yaml.safe_load(fh)["model"])
    torch.backends.cuda.matmul.allow_tf32 = True
    bf16_roundtrip()
    ica_speed()
    policies(args.policy_batch)
    mfu_256(args.batch)
    max_batch()


if __name__ == "__main__":
    main()
