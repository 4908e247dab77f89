"""ICA forward time and activation memory vs tokens n: fused (SDPA + chunked diagonal) vs plain (materialised A).

Run: ``.venv/bin/python benchmarks/scaling.py [--sizes 256 1024 4096] [--repeats 3] [--batch 4] [--dim 64] [--device cuda] [--threads 1]``

Setting. One ``pipeline.flows.ICA`` (partition ``mmca1``, gated form) per n tokens per half (the layer sees
L = 2n tokens), width D = 64, batch 4, fp32, CPU, torch's default thread count, seeded; ``beta ~ N(0, 1)``
so every gate is non-zero. The fused and the plain layer share one state dict (same transform; their
outputs are checked equal to 1e-4 relative in the run).

Timed (wall clock, min over ``--repeats``, interleaved plain/fused within each repetition, one untimed
warm-up each): ``fwd`` = ``layer(x)`` under ``no_grad`` (sampling / evaluation direction), ``fwd+bwd`` =
``layer(x)`` then backward of ``mean(y²) − mean(logdet)`` (a training step of this layer).

Memory: ``saved MiB`` = bytes autograd keeps for backward after the forward (``saved_tensors_hooks``, unique
storages, parameters excluded); ``n×n MiB`` = one (N, n, n) fp32 matrix for scale. The fused path's
transient forward memory is one (N, chunk, n) score block (chunk = 256 rows), the plain path's is several
(N, n, n) matrices.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from pipeline.flows import ICA


def saved_bytes(layer: ICA, x: torch.Tensor) -> int:
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, logdet = layer(x)
    del y, logdet
    return sum(seen.values())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    where = torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({torch.get_num_threads()} threads"
    print(
        f"ICA (mmca1, gated) fused vs plain forward; batch {args.batch}, D {args.dim}, fp32, {where}, "
        f"load avg {os.getloadavg()[0]:.1f}); min of {args.repeats}, interleaved"
    )
    print(
        f"{'n':>6}{'plain fwd ms':>14}{'fused fwd ms':>14}{'fwd p/f':>9}{'plain f+b ms':>14}{'fused f+b ms':>14}"
        f"{'f+b p/f':>9}{'plain saved MiB':>17}{'fused saved MiB':>17}{'mem p/f':>9}{'n×n MiB':>9}"
    )
    for n in args.sizes:
        torch.manual_seed(0)
        plain = ICA(args.dim, 2 * n, "mmca1", attention="plain").to(dev)
        with torch.no_grad():
            plain.beta.normal_()
        fused = ICA(args.dim, 2 * n, "mmca1", attention="fused").to(dev)
        fused.load_state_dict(plain.state_dict())
        x = (
            torch.randn(args.batch, 2 * n, args.dim, generator=torch.Generator().manual_seed(1))
            .to(dev)
            .requires_grad_()
        )
        with torch.no_grad():
            (yp, lp), (yf, lf) = plain(x), fused(x)
        assert ((yp - yf).norm() / yp.norm()) < 1e-4 and ((lp - lf).abs() / lp.abs().clamp_min(1)).max() < 1e-4
        layers = {"plain": plain, "fused": fused}

        def fwd(layer):
            with torch.no_grad():
                layer(x)

        def step(layer):
            y, logdet = layer(x)
            (y.square().mean() - logdet.mean()).backward()
            x.grad = None

        best = {(k, w): float("inf") for k in layers for w in ("fwd", "step")}
        for layer in layers.values():
            fwd(layer), step(layer)
        for _ in range(args.repeats):
            for what, fn in (("fwd", fwd), ("step", step)):
                for k, layer in layers.items():
                    sync(dev)
                    start = time.perf_counter()
                    fn(layer)
                    sync(dev)
                    best[k, what] = min(best[k, what], time.perf_counter() - start)
        mem = {k: saved_bytes(layer, x) / 2**20 for k, layer in layers.items()}
        nn_mib = args.batch * n * n * 4 / 2**20
        print(
            f"{n:>6}{best['plain', 'fwd'] * 1e3:>14.1f}{best['fused', 'fwd'] * 1e3:>14.1f}"
            f"{best['plain', 'fwd'] / best['fused', 'fwd']:>9.2f}{best['plain', 'step'] * 1e3:>14.1f}"
            f"{best['fused', 'step'] * 1e3:>14.1f}{best['plain', 'step'] / best['fused', 'step']:>9.2f}"
            f"{mem['plain']:>17.1f}{mem['fused']:>17.2f}{mem['plain'] / mem['fused']:>9.1f}{nn_mib:>9.1f}"
        )
    print("p/f > 1: the fused path is faster / smaller. ICA(attention='auto') uses fused from n = 512 tokens per half.")


if __name__ == "__main__":
    main()
