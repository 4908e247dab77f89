"""The execution plan: *how* the flow runs, decided once at the model's boundary from config + device.

The layers in :mod:`pipeline.flows` define *what* is computed; which implementation runs for them depends on
the precision, the memory policy, the parameters' partitioning and whether the C++ nodes are built. This module
takes those decisions in one place, applies them to a built model (:meth:`ExecutionPlan.apply`) and says in one
line per layer family which implementation runs (:meth:`ExecutionPlan.describe`, logged at start-up by the
trainer), so nobody needs a debugger to know what a config runs.

Decisions:

- **precision** (``deepspeed.precision``): ``fp32``, or ``bf16`` = bf16 autocast over fp32 weights. Under bf16 the
  ICA's q/k projections, scores and ``A·x2`` run in bf16 as one attention pass that also yields the log-det's
  diagonal (:mod:`pipeline.flows.kernels.attention_lse`); the couplings' conditioners run in bf16. fp32 stays
  where exactness needs it: the flow state's own transforms (the residual update ``x2 + α·A x2``, LICA's token
  mixer and the channel mixer and their inverses, ActNorm, the coupling's affine update), every log-det term
  and the reverse-direction solves. No TF32 (its 10-bit mantissa would break exactly these fp32 parts).
- **memory** (``model.memory``, or ``checkpoint`` when the operator's ``deepspeed.activation_checkpointing`` is on
  and ``model.memory`` is left at ``store``): ``store``; ``checkpoint`` = layer-selective recompute where the
  fp32 C++/Python nodes run, else torch's per-block checkpoint (bf16, ZeRO-3, SDPA attention); ``invert``.
- **kernels** (``model.kernels``): ``auto`` = the C++ nodes (fp32, not ZeRO-3, built) else the Python autograd
  nodes; ``python`` = the Python nodes only; ``reference`` = the composed definitions only (slow; for checking a
  suspected kernel bug on a real run). ``MANGO_NATIVE=0`` in the environment also turns the C++ nodes off.
- **compile** (``model.compile``): ``torch.compile`` each MANGO block in place (inductor; the Python nodes, which
  it traces). Compiling costs seconds to minutes per block shape at start-up; ``benchmarks/compile_vs_native.py``
  compares it with the C++ nodes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from .base import KERNELS, InvertibleModule
from .channel_mix import ChannelMixer
from .coupling import AffineCoupling
from .ica import ICA
from .kernels import native
from .mango import MangoBlock, MangoFlow


@dataclass(frozen=True)
class ExecutionPlan:
    """How the flows of one model run. Build with :func:`decide_plan`; ``apply`` it to the model once."""

    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    memory: str = "store"  # store | checkpoint | invert
    zero_stage: int = 0
    native: bool = True  # the C++ nodes are enabled (MANGO_NATIVE) — they run on fp32 paths, not under ZeRO-3
    kernels: str = "auto"  # auto | python | reference (pipeline.flows.base.KERNELS)
    lowp_attention: bool = True  # under bf16: attention in bf16 with the log-det diagonal from the same pass
    compile: bool = False  # torch.compile each MANGO block (the Python kernels: the C++ nodes are opaque to it)

    def apply(self, model: nn.Module) -> nn.Module:
        """Set every flow's memory policy, every layer's kernels and every ICA's attention precision on ``model``."""
        if self.kernels not in KERNELS:
            raise ValueError(f"ExecutionPlan: kernels must be one of {list(KERNELS)}; got '{self.kernels}'")
        kernels = self.effective_kernels
        for m in model.modules():
            if isinstance(m, InvertibleModule):
                m.kernels = kernels
            if isinstance(m, MangoFlow):
                m.memory = self.memory
            elif isinstance(m, ICA):
                m.lowp_attention = self.lowp_attention
        if self.compile:
            for m in model.modules():
                if isinstance(m, MangoBlock):
                    m.compile()  # in place: the module keeps its parameters, names and hooks
        return model

    @property
    def effective_kernels(self) -> str:
        """``kernels``, except that a compiled plan runs the Python nodes (the compiler traces them; it cannot see
        into the C++ nodes)."""
        return "python" if self.compile and self.kernels == "auto" else self.kernels

    def _cpp(self) -> bool:
        return (
            self.effective_kernels == "auto"
            and self.precision == "fp32"
            and self.zero_stage < 3
            and self.native
            and native.load() is not None
        )

    def layer_implementations(self, model: nn.Module) -> dict[str, str]:
        """Layer family → the implementation a training forward runs (with counts where it varies per layer)."""
        cpp = self._cpp()
        icas = [m for m in model.modules() if isinstance(m, ICA)]
        out: dict[str, str] = {}
        if icas:
            kinds: Counter[str] = Counter()
            for m in icas:
                if self.precision != "fp32" and self.lowp_attention:
                    kinds[
                        "bf16 flash attention + lse (kernels.attention_lse)"
                        if self.kernels != "reference"
                        else "bf16 composed attention + logsumexp (reference)"
                    ] += 1
                elif self.effective_kernels == "reference":
                    kinds["composed fp32 reference"] += 1
                elif m.form == "gated" and m.attention == "plain":
                    kinds[
                        "C++ GatedICACore node"
                        if cpp
                        else "Python GatedICACore node"
                        if self.precision == "fp32" and self.zero_stage < 3
                        else "Python GatedUpperAttention node (fp32)"
                    ] += 1
                elif m.attention == "fused":
                    kinds["fp32 SDPA + chunked diagonal log-softmax"] += 1
                else:
                    kinds["composed fp32 reference (paper form)"] += 1
            out["ica"] = ", ".join(f"{n}× {k}" for k, n in kinds.items())
        if any(isinstance(m, ChannelMixer) for m in model.modules()):
            out["channel_mix"] = "C++ node" if cpp else "fp32 matmul (exact state transform)"
        if any(isinstance(m, AffineCoupling) for m in model.modules()):
            out["coupling"] = (
                "C++ node"
                if cpp
                else "module path, conditioner in bf16, fp32 affine update"
                if self.precision != "fp32"
                else "module path (fp32)"
            )
        if any(isinstance(m, ICA) and m.partition == "lica" for m in icas):
            out["lica_mixer"] = "C++ block-mix node" if cpp else "fp32 block matmul (exact state transform)"
        return out

    def memory_detail(self) -> str:
        if self.memory != "checkpoint":
            return self.memory
        if self._cpp():
            return "checkpoint (layer-selective recompute in the nodes)"
        return "checkpoint (torch per-block checkpoint)"

    def describe(self, model: nn.Module) -> str:
        """One line: ``plan: bf16 autocast on cuda, ...; memory ...; ica: ...; coupling: ...``."""
        prec = (
            "fp32"
            if self.precision == "fp32"
            else f"{self.precision} autocast (attention {'bf16' if self.lowp_attention else 'fp32'}, fp32 log-dets and state transforms)"
        )
        parts = [
            f"plan: {prec} on {self.device}",
            f"ZeRO-{self.zero_stage}",
            f"memory {self.memory_detail()}",
            f"kernels {self.effective_kernels}",
            "compiled (torch.compile per MANGO block)" if self.compile else "eager",
        ]
        parts += [f"{k}: {v}" for k, v in self.layer_implementations(model).items()]
        return "; ".join(parts)


def decide_memory(model_memory: str, activation_checkpointing: bool) -> str:
    """The one memory decision: ``model.memory``, or ``checkpoint`` when the operator's DeepSpeed switch
    (``deepspeed.activation_checkpointing``, kept for existing recipes and scripts) is on and the model key is
    left at its default ``store``."""
    return "checkpoint" if activation_checkpointing and model_memory == "store" else model_memory


def decide_plan(cfg, device: torch.device | str) -> ExecutionPlan:
    """The plan for a :class:`~pipeline.config.Config` on ``device``."""
    dev = torch.device(device).type
    return ExecutionPlan(
        device=dev,
        precision=cfg.deepspeed.precision,
        memory=decide_memory(cfg.model.memory, cfg.deepspeed.activation_checkpointing),
        zero_stage=cfg.deepspeed.zero_stage,
        native=native.enabled(),
        kernels=cfg.model.kernels,
        compile=cfg.model.compile,
    )
