"""GPU report (never a gate): the recipe's flow in bf16 — MFU, step time by phase, largest batch, exactness.

Run on a CUDA machine (about 3 minutes on one H100/H200)::

    python benchmarks/gpu_flow.py [--batch 8] [--config launch/configs/mango_256.yaml] [--out gpu_report.json]

Uses only ``pipeline.flows`` / ``pipeline.flops`` (torch + PyYAML), so it runs where the rest of the stack is not
installed. Each section is independent (a failure is recorded in the JSON under ``errors`` and the next section
runs). What is measured:

1. ``kernel``: the bf16 attention + log-sum-exp kernel on this device against its fp64 reference (values, lse,
   gradients; relative errors) — the CUDA flash path of ``pipeline.flows.kernels.attention_lse``.
2. ``roundtrip``: one MangoBlock (L = 2·1024 tokens, D = 48) forward under bf16 autocast, reverse in fp32:
   relative reconstruction error, log-det dtype, |logdet_fwd + logdet_rev| against the fp32 forward's log-det.
3. ``plan``: the execution plan's line for the config's flow in bf16 (which implementation runs per layer).
4. ``flops``: model FLOPs of one forward + backward per batch (no recompute) and the bf16 share.
5. ``step``: a bf16 training step (AdamW) with the config's memory policy (checkpoint by default) at ``--batch``:
   forward / backward / optimizer times (CUDA events, min of 3), achieved TFLOP/s, MFU against the dense bf16
   peak, peak memory; the same for ``store`` and ``invert`` at ``--policy-batch``.
6. ``max_batch``: the largest power-of-two batch whose training step fits (checkpointing on).

No TF32 anywhere (the plan keeps the flow's fp32 parts exact). ``--device cpu --smoke`` runs every section on a
tiny model on the CPU (a test keeps the script from rotting where no GPU is at hand).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from pipeline.flops import DtypeFlopCounter
from pipeline.flows import MangoBlock, MultiscaleMangoFlow, data_init
from pipeline.flows.kernels import upper_attention_lse, upper_attention_lse_reference
from pipeline.flows.plan import ExecutionPlan

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16 tensor-core peak (SXM)
SMOKE_MODEL = {
    "channels": 3,
    "image_size": 16,
    "levels": 2,
    "blocks_per_level": 1,
    "dim": 16,
    "patch_size": 2,
    "lica_group": 0,
    "partitions": "all",
}


class Report:
    def __init__(self, device: str):
        self.device = torch.device(device)
        self.data: dict = {
            "device": torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "errors": {},
        }

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def section(self, name: str, fn) -> None:
        start = time.perf_counter()
        try:
            self.data[name] = fn()
        except Exception as exc:  # noqa: BLE001 - one failed section must not lose the others
            self.data["errors"][name] = f"{type(exc).__name__}: {exc}".strip()[:500]
            traceback.print_exc()
        print(
            f"[{name}] {json.dumps(self.data.get(name, self.data['errors'].get(name)))} "
            f"({time.perf_counter() - start:.1f} s)",
            flush=True,
        )

    def timed(self, fn, reps: int = 3) -> float:
        fn()
        self.sync()
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            self.sync()
            best = min(best, time.perf_counter() - start)
        return best

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else float("nan")

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def kernel_check(r: Report) -> dict:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 1024, 64, generator=gen, dtype=torch.float64) for _ in range(3))
    g_out, g_lse = (
        torch.randn(4, 1024, 64, generator=gen, dtype=torch.float64),
        torch.randn(4, 1024, generator=gen, dtype=torch.float64),
    )

    def run(fn, dtype, device):
        xs = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*xs)
        loss = (out.double() * g_out.to(device)).sum() + (lse.double() * g_lse.to(device)).sum()
        return [t.detach().double().cpu() for t in (out, lse, *torch.autograd.grad(loss, xs))]

    got, want = (
        run(upper_attention_lse, torch.bfloat16, r.device),
        run(upper_attention_lse_reference, torch.float64, "cpu"),
    )
    return {
        name: ((a - b).abs().max() / b.abs().max()).item()
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want)
    }


def roundtrip(r: Report, tokens: int) -> dict:
    torch.manual_seed(0)
    block = MangoBlock(48, tokens, lica_group=min(256, tokens // 2)).to(r.device)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.05 * torch.randn_like(p))
        x = torch.randn(4, tokens, 48, device=r.device)
        _, ld32 = block(x)
        with torch.autocast(r.device.type, dtype=torch.bfloat16):
            y, ld = block(x)
        xr, ldr = block(y, reverse=True)
    return {
        "relative_reconstruction_error": ((xr - x).norm() / x.norm()).item(),
        "logdet_dtype": str(ld.dtype),
        "logdet_fwd_plus_rev_max": (ld + ldr).abs().max().item(),
        "logdet_bf16_vs_fp32_relative": ((ld - ld32).abs().max() / ld32.abs().max().clamp_min(1)).item(),
    }


def build(model: dict, memory: str, device: torch.device) -> MultiscaleMangoFlow:
    torch.manual_seed(0)
    m = model
    return MultiscaleMangoFlow(
        m["channels"],
        m["image_size"],
        m["levels"],
        m["blocks_per_level"],
        m["dim"],
        patch_size=m["patch_size"],
        lica_group=m["lica_group"],
        partitions=m.get("partitions", "all"),
        memory=memory,
    ).to(device)


def images(model: dict, batch: int, device: torch.device):
    s, c = model["image_size"], model["channels"]
    return tuple(torch.randint(0, 256, (batch, c, s, s), dtype=torch.uint8, device=device) for _ in range(2))


def phases(r: Report, flow, opt, a, b) -> dict:
    """min-of-3 forward / backward / optimizer times of one bf16 training step, in ms."""
    best = {"forward_ms": float("inf"), "backward_ms": float("inf"), "optimizer_ms": float("inf")}
    for i in range(4):
        r.sync()
        t0 = time.perf_counter()
        with torch.autocast(r.device.type, dtype=torch.bfloat16):
            loss = flow.bits_per_dim(a, b).mean()
        r.sync()
        t1 = time.perf_counter()
        loss.backward()
        r.sync()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        r.sync()
        t3 = time.perf_counter()
        if i:  # the first step warms up
            for key, t in zip(best, (t1 - t0, t2 - t1, t3 - t2)):
                best[key] = min(best[key], t * 1e3)
    best["step_ms"] = sum(best.values())
    return best


def step_report(r: Report, model: dict, batch: int, memory: str, flops_per_sample: float | None) -> dict:
    r.reset_peak()
    a, b = images(model, batch, r.device)
    flow = build(model, memory, r.device)
    data_init(flow, a[:2], b[:2], mode="bits_per_dim")
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-4)
    out = {"memory": memory, "batch": batch, **phases(r, flow, opt, a, b), "peak_memory_gib": r.peak_gib()}
    if flops_per_sample:
        out["achieved_tflops"] = flops_per_sample * batch / (out["step_ms"] / 1e3) / 1e12
        peak = next((v for k, v in PEAK_BF16.items() if k in r.data["device"]), None)
        out["mfu"] = out["achieved_tflops"] * 1e12 / peak if peak else None
    return out


def count_flops(r: Report, model: dict, batch: int) -> dict:
    a, b = images(model, batch, r.device)
    flow = build(model, "store", r.device)
    data_init(flow, a[:2], b[:2], mode="bits_per_dim")
    with DtypeFlopCounter() as counter:
        with torch.autocast(r.device.type, dtype=torch.bfloat16):
            loss = flow.bits_per_dim(a, b).mean()
        loss.backward()
    return {
        "batch": batch,
        "tflop_per_step": counter.total / 1e12,
        "per_sample": counter.total / batch,
        "bf16_share": counter.share(torch.bfloat16),
        "params_m": sum(p.numel() for p in flow.parameters()) / 1e6,
    }


def max_batch(r: Report, model: dict, memory: str, start: int, limit: int) -> dict:
    flow = build(model, memory, r.device)
    opt = torch.optim.AdamW(flow.parameters(), lr=1e-4)
    fits, batch = 0, start
    while batch <= limit:
        try:
            a, b = images(model, batch, r.device)
            with torch.autocast(r.device.type, dtype=torch.bfloat16):
                loss = flow.bits_per_dim(a, b).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            r.sync()
            fits, batch = batch, batch * 2
        except torch.OutOfMemoryError:
            break
        finally:
            loss = None
            r.reset_peak()
    return {"memory": memory, "largest_batch": fits, "limit_reached": fits == limit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--policy-batch", type=int, default=2)
    parser.add_argument(
        "--config", default=str(Path(__file__).resolve().parent.parent / "launch/configs/mango_256.yaml")
    )
    parser.add_argument("--out", default="gpu_report.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes (a CPU check of the script)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_flow.py: no CUDA device (use --device cpu --smoke to check the script on a CPU)")
    import yaml

    with open(args.config) as fh:
        cfg = yaml.safe_load(fh)
    model = SMOKE_MODEL if args.smoke else cfg["model"]
    memory = "checkpoint" if cfg.get("deepspeed", {}).get("activation_checkpointing") else model.get("memory", "store")
    batch, limit = (2, 4) if args.smoke else (args.batch, 512)
    r = Report(args.device)
    r.data["config"] = args.config
    r.section("kernel", lambda: kernel_check(r))
    r.section("roundtrip", lambda: roundtrip(r, 64 if args.smoke else 2048))
    r.section(
        "plan",
        lambda: ExecutionPlan(device=r.device.type, precision="bf16", memory=memory, zero_stage=2).describe(
            build(model, memory, r.device)
        ),
    )
    r.section("flops", lambda: count_flops(r, model, 2 if args.smoke else 2))
    per_sample = r.data.get("flops", {}).get("per_sample")
    r.section("step", lambda: step_report(r, model, batch, memory, per_sample))
    for policy in ("store", "invert"):
        r.section(
            f"step_{policy}",
            lambda p=policy: step_report(r, model, 1 if args.smoke else args.policy_batch, p, per_sample),
        )
    r.section("max_batch", lambda: max_batch(r, model, memory, 1 if args.smoke else 8, limit))
    Path(args.out).write_text(json.dumps(r.data, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
