"""The MANGO block and G, the stack of blocks (the paper's flow over fused tokens).

A block runs one invertible channel mixer (:class:`~pipeline.flows.channel_mix.ChannelMixer`, ours: the paper's
block has none; ``channel_mix=False`` drops it), then, for each partition of its layout (default: mmca1, mmca2,
imca1…imca4, lica, lica), ``ActNorm → partition → ICA → merge``, then one channel affine coupling. Every block is
the exact identity at initialisation (W = I in the mixer, α = 0 in every ICA, zero-initialised last conditioner
layer, ActNorm before its data init).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.checkpoint import checkpoint

from .actnorm import ActNorm
from .base import (
    FlowSequence,
    InvertibleModule,
    block_checkpointed,
    current_mask,
    fused_path_ok,
    inside_flow,
    logdet_dtype,
    token_mask,
)
from .channel_mix import ChannelMixer
from .coupling import AffineCoupling
from .ica import ICA
from .partitions import resolve_partitions
from .reconstruct import reconstruct_blocks

#: how the backward pass gets each block's activations: stored by the forward, recomputed from the block's
#: stored input (activation checkpointing), or recomputed from the block's *output* through the exact inverse
MEMORY_POLICIES = ("store", "checkpoint", "invert")


class MangoBlock(FlowSequence):
    """One MANGO block on (N, tokens, dim).

    Args:
        partitions: a preset (``"all"``, ``"mmca"``, ``"imca"``, ``"mmca+imca"``, ``"lica"``) or a sequence of
            partition names; one ``ActNorm → ICA`` pair per entry.
        hidden: coupling conditioner width (default ``max(dim, 16)``).
        swap: which channel half the coupling updates (alternated across blocks).
        channel_mix: start the block with a learned invertible D×D channel mixer (default; False = the paper's block).
        form, qk_dim, learn_temperature, lica_group, solve_block, attention: passed to every :class:`ICA`.
    """

    def __init__(
        self,
        dim: int,
        tokens: int,
        partitions: str | Sequence[str] = "all",
        *,
        hidden: int | None = None,
        swap: bool = False,
        form: str = "gated",
        qk_dim: int | None = None,
        learn_temperature: bool = False,
        lica_group: int = 0,
        solve_block: int = 64,
        attention: str = "auto",
        channel_mix: bool = True,
    ):
        layers: list[torch.nn.Module] = [ChannelMixer(dim)] if channel_mix else []
        for name in resolve_partitions(partitions):
            layers.append(ActNorm(dim))
            layers.append(
                ICA(
                    dim,
                    tokens,
                    name,
                    form=form,
                    qk_dim=qk_dim,
                    learn_temperature=learn_temperature,
                    lica_group=lica_group,
                    solve_block=solve_block,
                    attention=attention,
                )
            )
        layers.append(AffineCoupling(dim, hidden or max(dim, 16), swap=swap))
        super().__init__(layers, tokens=tokens, dim=dim)

    def _forward(self, x: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The layers in order; in the forward, each ``ActNorm → ICA`` pair whose ICA takes the fused node runs as
        one node (:meth:`ICA.forward_normed`): a MANGO block is dozens of small layers, and each node costs its own
        dispatch and bookkeeping (measured: ~1–2 % of a 32² training step). Same arithmetic either way.
        Not while ActNorm's data init collects statistics (it must see its own input)."""
        if reverse:
            return super()._forward(x, reverse)
        total = x.new_zeros(x.shape[0], dtype=logdet_dtype(x))
        layers, i = list(self.layers), 0  # a list: ModuleList indexing costs microseconds per access
        # autocast, the padding mask and ZeRO-3's partitioning hold for every layer of the block alike: once per call
        path_ok: bool | None = None
        while i < len(layers):
            layer, nxt = layers[i], layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(layer, ActNorm) and path_ok is None:
                path_ok = fused_path_ok(x, layer.loc)
            if (
                isinstance(layer, ActNorm)
                and isinstance(nxt, ICA)
                and not layer._collect_init
                and layer.kernels != "reference"
                and path_ok
                and nxt.takes_norm(x, path_ok)
            ):
                x, logdet = nxt.forward_normed(x, layer)
                i += 2
            else:
                x, logdet = layer(x)
                i += 1
            total = total + logdet
        return x, total


class MangoFlow(InvertibleModule):
    """G: ``num_blocks`` MANGO blocks on (N, tokens, dim); coupling halves alternate between blocks.

    ``memory="checkpoint"`` is selective activation checkpointing at layer granularity: every ICA keeps
    only its inputs and rebuilds q, k and the n×n attention inside its own backward
    (:class:`~pipeline.flows.ica.GatedICACore`), every coupling keeps only its input and recomputes its
    conditioner; the small per-channel and permutation activations are stored. No block runs twice, and the
    recompute runs without autograd's graph, so it costs a fraction of a forward (``benchmarks/memory.py``).
    Under DeepSpeed ZeRO-3 (parameters flagged ``ds_id``, which the fused layer paths do not take), under
    autocast, and with ICA paths other than the plain gated one it is torch's non-reentrant checkpoint per
    block instead. ``memory="invert"`` keeps no per-block activations at all: the backward
    rebuilds each block's input from its output by the exact inverse (:mod:`pipeline.flows.reconstruct`),
    so activation memory stays flat in ``num_blocks``. Extra keyword arguments go to every :class:`MangoBlock`.
    """

    def __init__(self, dim: int, tokens: int, num_blocks: int = 12, *, memory: str = "store", **block_kwargs):
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"MangoFlow: num_blocks must be ≥ 1; got {num_blocks}")
        if memory not in MEMORY_POLICIES:
            raise ValueError(f"MangoFlow: memory must be one of {list(MEMORY_POLICIES)}; got '{memory}'")
        self.dim, self.tokens = dim, tokens
        self.blocks = torch.nn.ModuleList(
            MangoBlock(dim, tokens, swap=bool(i % 2), **block_kwargs) for i in range(num_blocks)
        )
        self.memory = memory

    @property
    def memory(self) -> str:
        return self._memory

    @memory.setter
    def memory(self, value: str) -> None:
        """Set the policy and tell the layers (checkpoint: each ICA rebuilds its attention in backward,
        each coupling recomputes its conditioner)."""
        if value not in MEMORY_POLICIES:
            raise ValueError(f"MangoFlow: memory must be one of {list(MEMORY_POLICIES)}; got '{value}'")
        self._memory = value
        for m in self.blocks.modules():
            if isinstance(m, ICA):
                m.recompute_attention = value == "checkpoint"
            elif isinstance(m, AffineCoupling):
                m.recompute_conditioner = value == "checkpoint"

    def _forward(self, x: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.memory != "store" and not reverse and torch.is_grad_enabled():
            params = list(self.parameters())
            if x.requires_grad or any(p.requires_grad for p in params):
                mask = current_mask(x)  # a padding mask: the per-block checkpoint carries it into the recompute
                if self.memory == "invert" and mask is None:
                    return reconstruct_blocks(list(self.blocks), x)
                if mask is not None or any(hasattr(p, "ds_id") for p in params) or not self._layers_recompute(x):
                    return self._forward_torch_checkpoint(x, mask)
        # store, and layer-selective checkpoint: the layers themselves rebuild their large activations
        total = x.new_zeros(x.shape[0], dtype=logdet_dtype(x))
        for block in reversed(self.blocks) if reverse else self.blocks:
            x, logdet = block(x, reverse=reverse)
            total = total + logdet
        return x, total

    def _layers_recompute(self, x: torch.Tensor) -> bool:
        """Whether every ICA takes the fused node that rebuilds its attention in backward: gated form, plain
        attention, autocast off. Otherwise (bf16 autocast, the SDPA ``fused`` path, the paper form) the ICA
        stores its activations, so ``checkpoint`` falls back to the per-block checkpoint."""
        if torch.is_autocast_enabled(x.device.type):
            return False
        return all(m.form == "gated" and m.attention == "plain" for m in self.blocks.modules() if isinstance(m, ICA))

    def _forward_torch_checkpoint(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-block non-reentrant ``torch.utils.checkpoint``: under DeepSpeed ZeRO-3, and wherever the ICA
        layers cannot rebuild their own attention (see :meth:`_layers_recompute`).

        ZeRO-3 partitions the parameters (they carry ``ds_id``) and gathers them only inside module forward
        hooks, so their gradients must come from autograd's own accumulation. Inside the block the layers'
        own recompute is switched off (:func:`~pipeline.flows.base.block_checkpointed`), in the forward and in
        the recompute alike. A padding mask is passed along, since the recompute runs outside its context (also
        for ``memory="invert"``, whose reconstruction does not take a mask).
        """
        total = x.new_zeros(x.shape[0], dtype=logdet_dtype(x))
        for block in self.blocks:
            x, logdet = checkpoint(_nested_call, block, x, mask, use_reentrant=False)
            total = total + logdet
        return x, total


def _nested_call(block: MangoBlock, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    # the recompute in backward runs outside the flow's context; keep it a nested call (no input re-check)
    with inside_flow(), block_checkpointed(), token_mask(mask):
        return block(x)
