"""Activation memory of a training step vs depth for model.memory = store | checkpoint | invert.

Run: ``.venv/bin/python benchmarks/memory.py [--blocks 4 12 24 48] [--repeats 3] [--batch 8] [--image 16] [--device cuda] [--threads 1]``

Setting. The density model's flow (:class:`~pipeline.flows.MultiscaleMangoFlow`) on a stereo pair
(3 + 3 channels, ``--image``² pixels, patch 2, one level, so every block sees L = 2·(image/2)² tokens of
width 12), conditioner width 32, batch ``--batch``, fp32, CPU. Loss = mean bits/dim of uniform-random uint8
images; parameters randomised (N(0, 0.05²) added) so nothing is the identity. Same seed for every policy.

What is counted: **activation bytes**, i.e. the tensors autograd keeps for backward, counted with
``torch.autograd.graph.saved_tensors_hooks`` (unique storages; parameters excluded, so weights and
optimizer state do not blur it). The hooks stay active through the backward pass, and each packed tensor
is released when autograd frees its graph node, so the figure is the *peak* of live saved bytes over the
whole step (for ``invert`` that includes the one-block graph rebuilt in backward).

``checkpoint`` is selective, at layer granularity (:class:`~pipeline.flows.MangoFlow`): each ICA saves only its
inputs and rebuilds q, k and the n×n attention inside its own backward, each coupling saves its input and
recomputes its conditioner (torch's non-reentrant checkpoint), ActNorm saves its output (shared with the
next layer). What the ICA and ActNorm nodes keep goes through ``ctx.save_for_backward``, so our hooks count it
directly; the one-layer q/k/A rebuilt inside an ICA's backward are transient (like any backward buffer of
``store``), not saved tensors. torch's checkpoint installs its own saved-tensor hooks around each conditioner
and keeps the conditioner's input by reference, so its part is added as a composed term: (every conditioner's
input, recorded by a forward pre-hook) + (the largest single conditioner's saved bytes, counted with our hooks
on that conditioner run alone), which is what one conditioner's recompute holds during backward.

Step time: forward + backward (no optimizer), min over ``--repeats`` repetitions, policies interleaved
within each repetition (store, checkpoint, invert, store, …) after one untimed warm-up each.

Goals (issue #11): ``invert`` grows ≤ 1.3× from 12 to 48 blocks; ``checkpoint`` saves ≥ 3× vs ``store``
at ≤ 1.4× the step time.

``--estimate launch/configs/mango_256.yaml`` instead sizes a config without running it: one MANGO block per
level is traced under ``FakeTensorMode`` (shapes only, no memory, no FLOPs) with the same hooks, summing the
bytes of every saved tensor (no deduplication: an upper bound), for the plain and the default (``auto``:
fused where the level has ≥ 512 tokens per half) attention; it prints per-sample activation bytes per level
for ``store`` and ``checkpoint``, and the parameter count. fp32 arithmetic is assumed (under bf16 autocast only
the q/k projections and the conditioner convolutions drop to bf16, so this stays an upper bound).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from pipeline.flows import AffineCoupling, MangoBlock, MultiscaleMangoFlow

POLICIES = ("store", "checkpoint", "invert")


class SavedBytes:
    """Live/peak bytes of the tensors autograd saves, deduplicated by storage; parameters excluded."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.live, self.current, self.peak = exclude, {}, 0, 0

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def pack(self, t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key in self.exclude or key == 0:
            return t
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [t.untyped_storage().nbytes(), 1]
            self.current += self.live[key][0]
            self.peak = max(self.peak, self.current)
        return _Handle(t, key, self)

    @staticmethod
    def unpack(h):
        return h.t if isinstance(h, _Handle) else h

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Handle:
    __slots__ = ("t", "key", "owner")

    def __init__(self, t, key, owner):
        self.t, self.key, self.owner = t, key, owner

    def __del__(self):
        self.owner._release(self.key)


def build(memory: str, blocks: int, image: int, device: str = "cpu") -> MultiscaleMangoFlow:
    torch.manual_seed(0)
    flow = MultiscaleMangoFlow(3, image, 1, blocks, 32, patch_size=2, lica_group=16, memory=memory).to(device)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return flow


def loss_fn(flow, a, b):
    torch.manual_seed(1)  # same dequantisation noise for every policy
    return flow.bits_per_dim(a, b).mean()


def activation_bytes(flow: MultiscaleMangoFlow, a, b) -> int:
    params = {p.untyped_storage().data_ptr() for p in flow.parameters()}
    params |= {t.untyped_storage().data_ptr() for t in flow.buffers()}  # model state, not activations
    counter = SavedBytes(params)
    nets = [m.net for m in flow.modules() if isinstance(m, AffineCoupling)]
    held: list[int] = []
    phase = {"forward": True}
    handles = []
    if flow.flows[0].memory == "checkpoint":

        def pre(module, args):  # the inputs the checkpoint frames keep (not the recompute calls in backward)
            if phase["forward"]:
                held.append(args[0].numel() * args[0].element_size())

        handles = [n.register_forward_pre_hook(pre) for n in nets]
    with counter.hooks():
        loss = loss_fn(flow, a, b)
        phase["forward"] = False
        loss.backward()
    for h in handles:
        h.remove()
    if flow.flows[0].memory != "checkpoint":
        return counter.peak
    biggest = 0
    for net, inp in zip(nets, held):
        one = SavedBytes(params)
        x = torch.randn(
            inp // 4 // (net[0].in_channels * flow.flows[0].tokens),
            net[0].in_channels,
            flow.flows[0].tokens,
            requires_grad=True,
        )
        with one.hooks():
            net(x).sum().backward()
        biggest = max(biggest, one.peak)
    return counter.peak + sum(held) + biggest


def estimate(path: str) -> None:
    import yaml
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pipeline.flows.base import inside_flow

    with open(path) as fh:
        m = yaml.safe_load(fh)["model"]
    ch, img, patch, levels, bpl, dim, group = (
        m["channels"],
        m["image_size"],
        m["patch_size"],
        m["levels"],
        m["blocks_per_level"],
        m["dim"],
        m["lica_group"],
    )
    flow = MultiscaleMangoFlow(ch, img, levels, bpl, dim, patch_size=patch, lica_group=group)
    params = sum(p.numel() for p in flow.parameters())
    print(
        f"{path}: {ch}+{ch} ch, {img}², patch {patch}, {levels} levels × {bpl} blocks, dim {dim}, LICA groups "
        f"{group}: {params / 1e6:.1f}M parameters ({params * 16 / 2**30:.2f} GiB fp32 weights + grads + AdamW)"
    )
    print(
        f"{'level':>5}{'tokens L':>10}{'width D':>9}{'plain MiB/block':>17}{'auto MiB/block':>16}{'input MiB':>11}"
        "   (per sample, saved-for-backward bytes, upper bound)"
    )
    tot = {"plain": 0.0, "auto": 0.0}
    held, biggest = 0.0, 0.0
    for k, level in enumerate(flow.flows):
        row = {}
        for att in ("plain", "auto"):
            block = MangoBlock(
                level.dim,
                level.tokens,
                hidden=dim,
                qk_dim=min(dim, level.dim),
                lica_group=min(group, level.tokens),
                attention=att,
            )
            sizes: list[int] = []
            with FakeTensorMode(allow_non_fake_inputs=True):
                x = torch.empty(1, level.tokens, level.dim, requires_grad=True)
                with (
                    torch.autograd.graph.saved_tensors_hooks(
                        lambda t: sizes.append(t.numel() * t.element_size()) or t, lambda t: t
                    ),
                    inside_flow(),
                ):
                    block(x)
            row[att] = sum(sizes) / 2**20
            tot[att] += row[att] * len(level.blocks)
        inp = level.tokens * level.dim * 4 / 2**20
        held += inp * len(level.blocks)
        biggest = max(biggest, row["auto"])
        print(f"{k:>5}{level.tokens:>10}{level.dim:>9}{row['plain']:>17.1f}{row['auto']:>16.1f}{inp:>11.2f}")
    print(
        f"per sample: store {tot['plain'] / 1024:.2f} GiB (plain attention), {tot['auto'] / 1024:.2f} GiB (auto); "
        f"checkpoint (auto) ≈ block inputs {held:.0f} MiB + one block's recompute {biggest:.0f} MiB = "
        f"{(held + biggest) / 1024:.2f} GiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 12, 24, 48])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image", type=int, default=16)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--estimate", metavar="CONFIG", help="size a config's activations instead (FakeTensorMode)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.estimate:
        return estimate(args.estimate)
    gen = torch.Generator().manual_seed(0)
    a, b = (
        torch.randint(0, 256, (args.batch, 3, args.image, args.image), dtype=torch.uint8, generator=gen)
        for _ in range(2)
    )
    a, b = a.to(args.device), b.to(args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    tokens = 2 * (args.image // 2) ** 2
    print(
        f"activation bytes of one training step (saved_tensors_hooks, peak over fwd+bwd, params excluded)\n"
        f"stereo {args.image}×{args.image}, 1 level, L={tokens} tokens × D=12, batch {args.batch}, fp32, {args.device} "
        f"({torch.get_num_threads()} CPU threads, load avg {os.getloadavg()[0]:.1f}); time = min of {args.repeats}, interleaved"
    )
    mem, times = {}, {}
    for nb in args.blocks:
        flows = {p: build(p, nb, args.image, args.device) for p in POLICIES}
        for p, f in flows.items():
            mem[p, nb] = activation_bytes(f, a, b)
            f.zero_grad(set_to_none=True)
        best = {p: float("inf") for p in POLICIES}
        for _ in range(args.repeats):
            for p, f in flows.items():
                sync()
                start = time.perf_counter()
                loss_fn(f, a, b).backward()
                sync()
                best[p] = min(best[p], time.perf_counter() - start)
                f.zero_grad(set_to_none=True)
        times.update({(p, nb): best[p] for p in POLICIES})
    head = (
        f"{'blocks':>6}"
        + "".join(f"{p + ' MiB':>16}" for p in POLICIES)
        + "".join(f"{p + ' ms':>14}" for p in POLICIES)
        + f"{'store/ckpt mem':>16}{'ckpt/store time':>17}{'store/inv mem':>15}{'inv/store time':>16}"
    )
    print(head)
    for nb in args.blocks:
        m = {p: mem[p, nb] for p in POLICIES}
        t = {p: times[p, nb] for p in POLICIES}
        print(
            f"{nb:>6}"
            + "".join(f"{m[p] / 2**20:>16.2f}" for p in POLICIES)
            + "".join(f"{t[p] * 1e3:>14.0f}" for p in POLICIES)
            + f"{m['store'] / m['checkpoint']:>16.2f}{t['checkpoint'] / t['store']:>17.2f}"
            + f"{m['store'] / m['invert']:>15.2f}{t['invert'] / t['store']:>16.2f}"
        )
    if 12 in args.blocks and 48 in args.blocks:
        growth = mem["invert", 48] / mem["invert", 12]
        print(f"goal invert growth 12→48 blocks ≤ 1.3×: {growth:.3f}× ({'met' if growth <= 1.3 else 'NOT met'})")
    for nb in args.blocks:
        save, slow = mem["store", nb] / mem["checkpoint", nb], times["checkpoint", nb] / times["store", nb]
        ok = save >= 3 and slow <= 1.4
        print(
            f"goal checkpoint at {nb} blocks: saves {save:.2f}× (≥ 3) at {slow:.2f}× step time (≤ 1.4): "
            f"{'met' if ok else 'NOT met'}"
        )


if __name__ == "__main__":
    main()
