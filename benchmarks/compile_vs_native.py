"""Does ``torch.compile`` of a MANGO block beat the hand-written C++ nodes? One block's training step, A/B.

``python benchmarks/compile_vs_native.py [--tokens 128] [--dim 48] [--batch 16] [--repeats 10] [--threads 1]``

Three ways to run the same block (forward + backward of a scalar loss, same weights and input):

- ``native``: eager, the C++ autograd nodes (``pipeline/flows/kernels/csrc``) — what fp32 CPU training runs;
- ``python``: eager, the Python nodes (``MANGO_NATIVE=0`` semantics, the kernels' reference path);
- ``compiled``: ``torch.compile`` (inductor) of the Python path — the alternative to keeping hand-written kernels.

Printed: the compile time, and min-of-``--repeats`` step times measured interleaved (each repetition runs all
three), with ratios to ``native``. Defaults are the 32² benchmark's level 0 (64 tokens per modality, width 48).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from pipeline.flows import MangoBlock, native


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--dim", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    block = MangoBlock(args.dim, args.tokens, lica_group=min(64, args.tokens))
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(args.batch, args.tokens, args.dim)

    def step(fn) -> None:
        xx = x.clone().requires_grad_()
        y, logdet = fn(xx)
        (y.square().mean() - logdet.mean()).backward()

    if native.load() is None:
        raise SystemExit("the C++ nodes are not built; run `make venv` first")
    compiled = torch.compile(block)
    start = time.perf_counter()
    with native_off():
        step(compiled)
    compile_s = time.perf_counter() - start
    runs = {
        "native": (block, contextlib.nullcontext),
        "python": (block, native_off),
        "compiled": (compiled, native_off),
    }
    best = {k: float("inf") for k in runs}
    for fn, ctx in runs.values():
        with ctx():
            step(fn)
    for _ in range(args.repeats):
        for name, (fn, ctx) in runs.items():
            with ctx():
                t = time.perf_counter()
                step(fn)
                best[name] = min(best[name], time.perf_counter() - t)
    print(
        f"block: {args.tokens} tokens × {args.dim}, batch {args.batch}, {args.threads} thread(s); "
        f"compile time {compile_s:.1f} s"
    )
    for name, t in best.items():
        print(f"  {name:>9}: {t * 1e3:7.1f} ms   ({t / best['native']:.2f}× native)")


@contextlib.contextmanager
def native_off():
    """Run the Python nodes (the path torch.compile traces) while inside."""
    saved = native._STATE.copy()
    native._STATE.clear()
    native._STATE["error"] = RuntimeError("benchmark: Python path")
    try:
        yield
    finally:
        native._STATE.clear()
        native._STATE.update(saved)


if __name__ == "__main__":
    main()
