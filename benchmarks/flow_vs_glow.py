"""Side-by-side: the multiscale MANGO flow vs normflows' Glow on the real stereo pair (3 + 3 channels).

Run: ``.venv/bin/python benchmarks/flow_vs_glow.py [--sizes 32 64] [--repeats 3] [--budget 30] [--threads 0] [--device cuda]
[--patch 4] [--dim 48] [--compile]`` (``--compile``: both models compiled block by block)
(longer, steadier figures: ``--repeats 5 --budget 300``).

Data. The Middlebury 2014 *Motorcycle* stereo pair embedded in scikit-image, through the project's embedded
source (``pipeline.data.sources.embedded``, ``--src stereo``, full 741×500 resolution): left and right views cut into
S×S patches (S = 32 or 64), train and held-out patches from disjoint image regions. Both models see the
same uniformly dequantised input ``x = (v + u)/256 − 1/2`` (noise seeded), so bits/dim is
``−log p(x) / (D ln 2) + 8`` for both, D = 6·S².

Models (parameter counts equal within ±5 %: Glow's hidden width is searched to match MANGO's count):

- MANGO: :class:`~pipeline.flows.MultiscaleMangoFlow` over (left, right), 3 levels × 2 blocks, conditioner
  width 48, LICA groups of 64, patch 4 at both sizes (the patch of ``launch/configs/mango_256.yaml``; the demo
  configs use 2), default ``attention="auto"`` and ``memory="store"``, and every block's learned channel mixer
  (``--no-channel-mix``: the paper's block without it, for the A/B). Level 0 then has 8×8 = 64 tokens per
  modality at 32² and 16×16 = 256 at 64², token width 48. Why patch 4 at 32² (an earlier version used 2, i.e.
  256 tokens per modality there): the token count is MANGO's choice, and ICA's cost is quadratic in it — at 32²
  patch 2 made level 0's 256-token attention ~80 % of the step (5.4× Glow's step time, 1 pinned core) while
  patch 4 ran the same 3×2 blocks at ~1.5× then (0.97× since the flow's C++ nodes, see the README). Patch 8 (64 tokens at
  64²) is not used: no shipped config uses it, and its token width 192 would inflate MANGO's parameter count
  (2.8M) and with it the matched Glow's width, which is not a fair way to win the time ratio.
- Glow: normflows 1.7.3 ``MultiscaleFlow`` of ``GlowBlock``s, built as in the normflows Glow example: the
  two views stacked as 6 channels, L = 3 levels × K = 2 blocks, a 2×2 ``Squeeze`` per level and ``Merge``
  (split) between levels, affine coupling with sigmoid scale, LU 1×1 convolutions, ActNorm,
  ``DiagGaussian`` bases. Its ActNorm initialises itself on the first batch; MANGO's ``data_init`` runs on
  the same batch.

Timed (wall clock, min over ``--repeats``; every repetition runs MANGO then Glow for each operation, after one
untimed warm-up of each): ``log-prob`` (forward under ``no_grad``, batch 16), ``train step`` (forward,
backward, fused Adam step over one flat parameter buffer per model, batch 16: :class:`FlatAdam`), ``sample`` (16 exact samples). Ratios are MANGO / Glow (< 1: MANGO faster).

Same wall-clock budget: both models train with Adam (lr 1e-3, fused, batch 16, same batches), steps interleaved
one by one, each stopping once its *own* accumulated step time reaches ``--budget`` seconds (so a load spike
on the shared CPU costs both alike); then held-out bits/dim over the val patches (same noise).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
import warnings

import numpy as np
import torch

from pipeline.data.sources.embedded import EmbeddedSource
from pipeline.flows import MultiscaleMangoFlow, data_init
from pipeline.flows.plan import ExecutionPlan

LEVELS, BLOCKS, DIM = 3, 2, 48


def stereo_patches(size: int, split: str) -> torch.Tensor:
    """uint8 (P, 6, S, S): left RGB then right RGB, every patch of ``split``."""
    src = EmbeddedSource("stereo", patch=size, downscale=1)
    imgs = []
    for key in src.keys(split):
        s = src.load(split, key)
        imgs.append(np.concatenate([s["rgb.png"], s["right.png"]], axis=-1).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(imgs))


def dequantise(v: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (v.float() + torch.rand(v.shape, generator=gen)) / 256 - 0.5


PATCH = 4


def mango(size: int, patch: int = PATCH, dim: int = DIM, channel_mix: bool = True) -> MultiscaleMangoFlow:
    torch.manual_seed(0)
    return MultiscaleMangoFlow(3, size, LEVELS, BLOCKS, dim, patch_size=patch, lica_group=64, channel_mix=channel_mix)


def glow(size: int, hidden: int):
    import normflows as nf

    torch.manual_seed(0)
    channels, q0, merges, flows = 6, [], [], []
    for i in range(LEVELS):
        level = [
            nf.flows.GlowBlock(channels * 2 ** (LEVELS + 1 - i), hidden, split_mode="channel", scale=True)
            for _ in range(BLOCKS)
        ]
        flows.append(level + [nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            shape = (channels * 2 ** (LEVELS - i), size // 2 ** (LEVELS - i), size // 2 ** (LEVELS - i))
        else:
            shape = (channels * 2 ** (LEVELS + 1), size // 2**LEVELS, size // 2**LEVELS)
        q0.append(nf.distributions.DiagGaussian(shape))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matched_glow(size: int, target: int):
    lo, hi = 1, 512
    while lo < hi:  # smallest hidden width with at least the target count
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(glow(size, mid)) < target else (lo, mid)
    best = min((lo - 1, lo), key=lambda h: abs(count(glow(size, h)) - target))
    return glow(size, best), best


class Pair:
    """Uniform calls into both models: bits/dim of dequantised (N, 6, S, S) input, and sampling."""

    def __init__(self, size: int, device: str, patch: int = PATCH, dim: int = DIM, channel_mix: bool = True):
        self.size = size
        self.mango = mango(size, patch, dim, channel_mix)
        self.glow, self.hidden = matched_glow(size, count(self.mango))
        self.mango.to(device), self.glow.to(device)
        self.dims = 6 * size * size

    def bpd(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name == "mango":
            return self.mango.bits_per_dim(x[:, :3], x[:, 3:])
        return -self.glow.log_prob(x, None) / (self.dims * math.log(2)) + 8

    def sample(self, name: str, n: int) -> None:
        if name == "mango":
            self.mango.sample(n)
        else:
            self.glow.sample(n)

    def models(self):
        return {"mango": self.mango, "glow": self.glow}


class FlatAdam:
    """Adam (lr 1e-3, torch's fused kernel) over one flat buffer that holds every parameter, with the gradients
    accumulated into a second flat buffer — the layout DeepSpeed's ZeRO-1/2 optimizers keep (the GPU recipes train
    with ZeRO-2), so one fused step per model instead of one per tensor.

    Each parameter becomes a view into the flat buffer (``p.data``) and its ``.grad`` a view into the flat gradient,
    which autograd accumulates into in place; ``zero_grad`` zeroes that buffer. Same arithmetic per element as
    ``torch.optim.Adam(model.parameters(), fused=True)`` (tested), without its per-tensor bookkeeping: on one CPU
    thread that was 5.8 ms of MANGO's 32² training step (~540 parameter tensors) against ~1 ms of Glow's (~70).
    """

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3):
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in params])
        self.grad = torch.zeros_like(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.data = flat[offset : offset + n].view_as(p)
            p.grad = self.grad[offset : offset + n].view_as(p)
            offset += n
        self.flat = torch.nn.Parameter(flat)
        self.flat.grad = self.grad
        self.opt = torch.optim.Adam([self.flat], lr=lr, fused=True)

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 - the views must stay: zeroed in place
        self.grad.zero_()

    def step(self) -> None:
        self.opt.step()


def adam(model: torch.nn.Module, flat: bool = True):
    """The benchmark's optimizer for either model: :class:`FlatAdam` (default), or ``flat=False`` torch's fused Adam
    over the module's parameter list (``--optimizer per-tensor``), whose per-tensor loop costs ~10 µs per parameter
    tensor per step on this CPU — an optimizer cost, not a flow's (MANGO ~540 tensors, Glow ~70)."""
    return FlatAdam(model) if flat else torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)


def bench(size: int, args) -> list[str]:
    dev = args.device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    train, val = stereo_patches(size, "train"), stereo_patches(size, "val")
    pair = Pair(size, dev, args.patch, args.dim, args.channel_mix)
    if args.compile:  # both models compiled block by block, the same way
        ExecutionPlan(device=dev, compile=True).apply(pair.mango)
        for m in pair.glow.modules():
            if type(m).__name__ == "GlowBlock":
                m.compile()
    gen = torch.Generator().manual_seed(0)
    first = dequantise(train[torch.randperm(len(train), generator=gen)[:64]], 0).to(dev)
    data_init(pair.mango, first[:, :3], first[:, 3:], mode="bits_per_dim")
    with torch.no_grad():
        pair.bpd("glow", first)  # normflows ActNorm: data-dependent init on its first batch
    start_state = {k: copy.deepcopy(m.state_dict()) for k, m in pair.models().items()}
    opts = {k: adam(m, args.optimizer == "flat") for k, m in pair.models().items()}
    batch = dequantise(train[:16], 1).to(dev)

    def op(what: str, name: str) -> None:
        if what == "log-prob":
            with torch.no_grad():
                pair.bpd(name, batch)
        elif what == "train step":
            opts[name].zero_grad(set_to_none=True)
            pair.bpd(name, batch).mean().backward()
            opts[name].step()
        else:
            with torch.no_grad():
                pair.sample(name, 16)

    whats = ("log-prob", "train step", "sample")
    best = {(w, k): float("inf") for w in whats for k in ("mango", "glow")}
    for w in whats:
        for k in ("mango", "glow"):
            op(w, k)
    for _ in range(args.repeats):
        for w in whats:
            for k in ("mango", "glow"):
                sync()
                start = time.perf_counter()
                op(w, k)
                sync()
                best[w, k] = min(best[w, k], time.perf_counter() - start)

    # same wall-clock budget from the data-initialised start (the timing steps above trained both a little)
    for k, m in pair.models().items():
        m.load_state_dict(start_state[k])
    opts = {k: adam(m, args.optimizer == "flat") for k, m in pair.models().items()}
    spent, steps = {"mango": 0.0, "glow": 0.0}, {"mango": 0, "glow": 0}
    i = 0
    while min(spent.values()) < args.budget:
        idx = torch.randint(0, len(train), (16,), generator=gen)
        x = dequantise(train[idx], 100 + i).to(dev)
        i += 1
        for k in ("mango", "glow"):
            if spent[k] >= args.budget:
                continue
            start = time.perf_counter()
            opts[k].zero_grad(set_to_none=True)
            pair.bpd(k, x).mean().backward()
            opts[k].step()
            sync()
            spent[k] += time.perf_counter() - start
            steps[k] += 1
    held = {}
    xv = dequantise(val, 7).to(dev)
    with torch.no_grad():
        for k in ("mango", "glow"):
            held[k] = torch.cat([pair.bpd(k, xv[j : j + 64]) for j in range(0, len(xv), 64)]).mean().item()

    pm, pg = count(pair.mango), count(pair.glow)
    mix = "" if args.channel_mix else ", no channel mixer"
    rows = [
        f"{size}×{size}: MANGO {pm:,} params (patch {pair.mango.patch_size}{mix}), Glow {pg:,} params (hidden "
        f"{pair.hidden}), ratio {pm / pg:.3f}; {len(train)} train / {len(val)} held-out patches"
    ]
    rows.append(f"  {'operation':<14}{'MANGO ms':>10}{'Glow ms':>10}{'MANGO/Glow':>12}")
    for w in whats:
        m, g = best[w, "mango"], best[w, "glow"]
        rows.append(f"  {w:<14}{m * 1e3:>10.1f}{g * 1e3:>10.1f}{m / g:>12.2f}")
    rows.append(
        f"  held-out bits/dim after {args.budget:.0f} s of training each: MANGO {held['mango']:.4f} "
        f"({steps['mango']} steps) vs Glow {held['glow']:.4f} ({steps['glow']} steps); "
        f"ratio {held['mango'] / held['glow']:.4f} (< 1: MANGO better)"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=30.0, help="training seconds per model and size")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--patch", type=int, default=PATCH, help="MANGO patch size (2 or 4: the shipped configs' settings)"
    )
    parser.add_argument("--dim", type=int, default=DIM, help="MANGO conditioner width (q/k and coupling hidden)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every MANGO block (the plan's compiled path) and every Glow block",
    )
    parser.add_argument(
        "--optimizer",
        choices=["flat", "per-tensor"],
        default="flat",
        help="Adam over one flat parameter buffer per model, as DeepSpeed ZeRO-1/2 holds them (default), or over "
        "the module's parameter list",
    )
    parser.add_argument(
        "--no-channel-mix",
        dest="channel_mix",
        action="store_false",
        help="MANGO blocks without the learned channel mixer (the paper's block)",
    )
    args = parser.parse_args()
    if args.patch not in (2, 4):
        parser.error(f"--patch must be 2 or 4 (the patch sizes of the shipped MANGO configs); got {args.patch}")
    # normflows' LU 1×1 convolution calls the deprecated torch.lu (a warning per build, not an error)
    warnings.filterwarnings("ignore", message=r"torch\.lu is deprecated")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"MANGO vs normflows Glow, stereo pair, batch 16, fp32, {args.device} ({torch.get_num_threads()} CPU threads, "
        f"load avg {os.getloadavg()[0]:.1f}); times = min of {args.repeats}, interleaved; {args.optimizer} fused Adam"
    )
    for size in args.sizes:
        for row in bench(size, args):
            print(row, flush=True)


if __name__ == "__main__":
    main()
