"""The invertibility contract every flow layer in this package keeps.

A flow layer is an ``nn.Module`` acting on token tensors ``x`` of shape ``(N, L, D)`` (batch, tokens,
channels)::

    y, logdet = layer(x)                 # logdet: (N,), log|det dy/dx| per sample
    x_rev, logdet_rev = layer(y, reverse=True)

Invariants (checked for every layer by ``tests/flows/checker.py``):

- ``x_rev == x`` up to floating-point error (exact inverse, no iterative approximation);
- ``logdet_rev == -logdet``;
- ``logdet`` equals ``slogdet`` of the autograd Jacobian of ``x -> y`` (flattened per sample);
- ``logdet`` is accumulated in at least fp32 (fp64 for fp64 input), also under bf16 autocast;
- ``y`` keeps ``x``'s dtype and shape; at initialisation every block is the identity.

Subclasses implement ``_forward(x, reverse)``; ``forward`` validates the input first. The finiteness check
forces a device sync, so it runs only at the outermost flow call (nested layers skip it) and never while
``torch.compile`` traces.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator

import torch
from torch import nn

_INSIDE_FLOW: contextvars.ContextVar[bool] = contextvars.ContextVar("inside_flow", default=False)
_BLOCK_CHECKPOINT: contextvars.ContextVar[bool] = contextvars.ContextVar("block_checkpoint", default=False)
_TOKEN_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("token_mask", default=None)


@contextlib.contextmanager
def token_mask(mask: torch.Tensor | None) -> Iterator[None]:
    """A padding mask ``(N, L)`` bool (True = a real token) for the enclosed flow calls (``None``: no mask).

    Under a mask every layer holds padded tokens fixed and is an exact bijection of the real tokens, its
    log-det counting the real tokens only: ActNorm, the channel mixer and the coupling leave padded tokens
    unchanged; ICA neither updates a padded token nor attends to one (a key position is used only when both
    of its halves are real). LICA's token mixer would mix padded tokens into real ones, so it refuses a mask.
    Masked layers run their composed definitions (no C++ or hand-written nodes).
    """
    if mask is not None and (mask.ndim != 2 or mask.dtype != torch.bool):
        raise ValueError(f"token_mask: expected a bool tensor of shape (N, L); got {mask.dtype} {tuple(mask.shape)}")
    token = _TOKEN_MASK.set(mask)
    try:
        yield
    finally:
        _TOKEN_MASK.reset(token)


def current_mask(x: torch.Tensor | None = None) -> torch.Tensor | None:
    """The padding mask the enclosing :func:`token_mask` set (checked against ``x``'s (N, L)), or None."""
    mask = _TOKEN_MASK.get()
    if mask is not None and x is not None and tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"token_mask: the mask has shape {tuple(mask.shape)} but the layer's input is (N, L) = {tuple(x.shape[:2])}"
        )
    return mask


@contextlib.contextmanager
def block_checkpointed() -> Iterator[None]:
    """Mark the enclosed calls as running inside a per-block activation checkpoint (forward and recompute):
    layers then skip their own layer-level recompute, which would only repeat the block's."""
    token = _BLOCK_CHECKPOINT.set(True)
    try:
        yield
    finally:
        _BLOCK_CHECKPOINT.reset(token)


def in_block_checkpoint() -> bool:
    """Whether the caller runs inside :func:`block_checkpointed`."""
    return _BLOCK_CHECKPOINT.get()


@contextlib.contextmanager
def inside_flow() -> Iterator[None]:
    """Mark the enclosed layer calls as nested: they skip the (syncing) finiteness check of their input.

    For callers that validated the input at their own boundary (the multiscale flow, activation-checkpoint
    recomputes). Inside a model, a NaN activation must surface as a non-finite *loss* (which the train loop
    skips and counts), not as an input error.
    """
    token = _INSIDE_FLOW.set(True)
    try:
        yield
    finally:
        _INSIDE_FLOW.reset(token)


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, enabled=False)`` when autocast is on, else a no-op context.

    Entering an autocast context costs about as much as a small tensor op; the flow enters one per layer
    for its fp32 arithmetic, so it is skipped where there is nothing to switch off.
    """
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


#: which implementations a layer may run, set on every layer by the execution plan (:mod:`pipeline.flows.plan`):
#: ``auto`` = the C++ nodes where they apply (fp32, parameters not ZeRO-3-partitioned, built), else the Python
#: autograd nodes; ``python`` = the Python nodes only; ``reference`` = the composed definitions only (autograd
#: differentiates them, no hand-written backward anywhere: the semantics every kernel is held to).
KERNELS = ("auto", "python", "reference")


def native_ok(layer: nn.Module, x: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether ``layer`` may run its C++ node for ``x``: the plan allows it and :func:`fused_path_ok`."""
    return layer.kernels == "auto" and fused_path_ok(x, param) and _TOKEN_MASK.get() is None


def fused_path_ok(x: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether a layer may run its fused node (a hand-written backward) for input ``x``: autocast off on x's
    device (under autocast the composed path keeps its bf16/fp32 split), and ``param`` not partitioned by
    DeepSpeed ZeRO-3 (flagged ``ds_id``; such weights are gathered only inside each submodule's forward), and
    no padding mask (:func:`token_mask`: masked layers run their composed definitions)."""
    return not torch.is_autocast_enabled(x.device.type) and not hasattr(param, "ds_id") and _TOKEN_MASK.get() is None


def logdet_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 for fp64 input, fp32 otherwise (bf16/fp16 log-dets lose whole nats at L*D ~ 1e5)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the flow's sensitive arithmetic (updates, solves, log-dets) runs in."""
    return logdet_dtype(x)


def validate_tokens(x: torch.Tensor, tokens: int | None, dim: int | None, where: str) -> None:
    """Raise ``ValueError`` naming the expected and actual shape when ``x`` is not ``(N, tokens, dim)``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{where}: expected a torch.Tensor of shape (N, {tokens}, {dim}); got {type(x).__name__}")
    want = f"(N, {tokens if tokens is not None else 'L'}, {dim if dim is not None else 'D'})"
    if x.ndim != 3:
        raise ValueError(f"{where}: expected a 3-D tensor of shape {want}; got shape {tuple(x.shape)}")
    if (tokens is not None and x.shape[1] != tokens) or (dim is not None and x.shape[2] != dim):
        raise ValueError(f"{where}: expected shape {want}; got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{where}: expected a floating-point tensor; got dtype {x.dtype}")


class InvertibleModule(nn.Module):
    """Base class of every flow layer; see the module docstring for the contract."""

    #: token count and width this layer was built for (``None`` = any)
    tokens: int | None = None
    dim: int | None = None
    #: implementations this layer may run (one of :data:`KERNELS`; set by the plan)
    kernels: str = "auto"

    def forward(self, x: torch.Tensor, reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        validate_tokens(x, self.tokens, self.dim, type(self).__name__)
        if _INSIDE_FLOW.get():
            return self._forward(x, reverse)
        # detach: isfinite runs abs() internally, which autograd would record (and activation checkpointing
        # would then see a different set of saved tensors in its recompute).
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(x.detach()).all()):
            bad = (~torch.isfinite(x.detach())).sum().item()
            raise ValueError(f"{type(self).__name__}: input has {bad} non-finite value(s) (NaN or inf)")
        with inside_flow():
            return self._forward(x, reverse)

    # Subclasses define ``_forward(self, x, reverse) -> (y, logdet)``; it sees validated input only.


class FlowSequence(InvertibleModule):
    """Composition of flow layers; ``reverse=True`` runs them backwards. Log-dets add up."""

    def __init__(self, layers: Iterable[nn.Module], tokens: int | None = None, dim: int | None = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.tokens, self.dim = tokens, dim

    def _forward(self, x: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        total = x.new_zeros(x.shape[0], dtype=logdet_dtype(x))
        layers = reversed(self.layers) if reverse else self.layers
        for layer in layers:
            x, logdet = layer(x, reverse=reverse)
            total = total + logdet
        return x, total
