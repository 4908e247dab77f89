"""The flow's C++ autograd nodes, built on first use with torch's extension builder (ninja + the C++ compiler).

:func:`gated_ica_core` is :class:`~pipeline.flows.kernels.ica_nodes.GatedICACore` (same arguments, same arithmetic, same
hand-written backward) as one C++ ``torch::autograd::Function`` (``csrc/gated_ica_core.cpp``), and
:func:`block_mix` LICA's block-diagonal token mixer with its gathers (and a fused ActNorm), :func:`channel_mix`
the :class:`~pipeline.flows.ChannelMixer`, and
:func:`affine_coupling` the :class:`~pipeline.flows.AffineCoupling` forward (conditioner convolutions as matmuls
over shifted tokens, GroupNorms, GELUs, the bounded affine update) with a hand-written backward: on small token grids
a MANGO layer is ~70 tiny ATen ops, and calling them from Python (plus autograd's per-op graph) cost more than
the ops. The build runs once per machine and torch version into torch's extension cache
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``; ranks of one job wait on its lock) and takes
about a minute; later imports load the cached library.

On x86 CPUs where ATen itself runs its AVX2 (or AVX-512) kernels, the node is built with ``-mavx2 -mfma`` under its
own name (``mango_gated_ica_core_avx2``): the row kernels' loops then vectorise 8 wide with FMA instead of SSE2's 4
(2–3 % of a 32² / 64² training step and log-prob, ``benchmarks/flow_vs_glow.py``'s shapes). The name carries the
instruction set, so a cache shared by nodes of different CPU generations never hands one the other's build.

When the build is impossible (no compiler, a read-only cache) the Python node is used and one warning says why;
``MANGO_NATIVE=0`` selects the Python node outright (the tests run both and hold them equal).
"""

from __future__ import annotations

import os
import platform
import threading
import warnings
from pathlib import Path

import torch

from .ica_nodes import GatedICACore

_SOURCE = Path(__file__).parent / "csrc" / "gated_ica_core.cpp"
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}  # "module" once built or loaded, "error" once a build failed


def enabled() -> bool:
    """Whether the C++ node may be used (``MANGO_NATIVE=0`` turns it off)."""
    return os.environ.get("MANGO_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def build_target() -> tuple[str, list[str]]:
    """The extension's name and compiler flags for this CPU: AVX2 + FMA code where ATen dispatches its own kernels at
    AVX2 or above on x86-64 (its capability check is the one that matters: ATen runs those instructions here already),
    the baseline instruction set elsewhere (other architectures, older x86, ``ATEN_CPU_CAPABILITY=default``)."""
    flags = ["-O3", "-fopenmp-simd"]
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() in ("x86_64", "amd64") and capability in ("AVX2", "AVX512"):
        return "mango_gated_ica_core_avx2", [*flags, "-mavx2", "-mfma"]
    return "mango_gated_ica_core", flags


def load():
    """The built extension module, or None (disabled, or the build failed: warned once)."""
    if not enabled():
        return None
    if "module" in _STATE or "error" in _STATE:
        return _STATE.get("module")
    with _LOCK:
        if "module" not in _STATE and "error" not in _STATE:
            try:
                from torch.utils.cpp_extension import load as build  # heavy: pulls in setuptools; only when building

                name, flags = build_target()
                _STATE["module"] = build(name=name, sources=[str(_SOURCE)], extra_cflags=flags, verbose=False)
            except Exception as exc:  # noqa: BLE001 - any build failure falls back to the Python node
                _STATE["error"] = exc
                warnings.warn(
                    f"pipeline.flows: the C++ ICA node could not be built ({type(exc).__name__}: "
                    f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}); using the Python "
                    "node (same results, slower on small token grids). Set MANGO_NATIVE=0 to skip the build.",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _STATE.get("module")


def gated_ica_core(
    x,
    gather,
    scatter,
    swap,
    wq,
    wk,
    lnq_w,
    lnq_b,
    lnk_w,
    lnk_b,
    log_tau,
    beta,
    bias,
    eps_q,
    eps_k,
    recompute,
    block,
    loc=None,
    log_scale=None,
    allow_native: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``GatedICACore.apply(...)`` through the C++ node when it is available and allowed (see the module docstring)."""
    mod = load() if allow_native else None
    if mod is None:
        return GatedICACore.apply(
            x,
            gather,
            scatter,
            swap,
            wq,
            wk,
            lnq_w,
            lnq_b,
            lnk_w,
            lnk_b,
            log_tau,
            beta,
            bias,
            eps_q,
            eps_k,
            recompute,
            block,
            loc,
            log_scale,
        )
    out, logdet = mod.gated_ica_core(
        x,
        gather,
        scatter,
        bool(swap),
        wq,
        wk,
        lnq_w,
        lnq_b,
        lnk_w,
        lnk_b,
        log_tau,
        beta,
        bias,
        float(eps_q),
        float(eps_k),
        bool(recompute),
        int(block),
        loc,
        log_scale,
    )
    return out, logdet


def block_mix(x, w, gather=None, gather_inv=None, scatter=None, scatter_inv=None, loc=None, log_scale=None):
    """LICA's ``y = (blockdiag(w) · norm(x)[:, gather])[:, scatter]`` as the C++ node (``gather_inv`` / ``scatter_inv``:
    the inverse permutations, for the backward; ``loc, log_scale``: a fused preceding ActNorm), or None when the
    node is not available (the caller then runs :meth:`~pipeline.flows.LUTokenMixer.apply_blocks`)."""
    mod = load()
    if mod is None:
        return None
    return mod.block_mix(x, w, gather, gather_inv, scatter, scatter_inv, loc, log_scale)


def channel_mix(layer, x: torch.Tensor):
    """``layer``'s forward ``(y, logdet)`` (a :class:`~pipeline.flows.ChannelMixer`) as the C++ node, or None."""
    mod = load()
    if mod is None:
        return None
    y, logdet = mod.channel_mix(x, layer.lu, layer.log_s, layer.sign)
    return y, logdet


def affine_coupling(layer, x: torch.Tensor, recompute: bool):
    """``layer``'s forward ``(y, logdet)`` (an :class:`~pipeline.flows.AffineCoupling`) as the C++ node, or None when
    the node is not available (the caller then runs the module path)."""
    mod = load()
    if mod is None:
        return None
    conv0, norm0, act0, conv1, norm1, _, conv2 = layer.net
    y, logdet = mod.affine_coupling(
        x,
        conv0.weight,
        conv0.bias,
        norm0.weight,
        norm0.bias,
        conv1.weight,
        conv1.bias,
        norm1.weight,
        norm1.bias,
        conv2.weight,
        conv2.bias,
        bool(layer.swap),
        int(layer.cond_dim),
        float(layer.scale_bound),
        float(norm0.eps),
        float(norm1.eps),
        act0.approximate,
        bool(recompute),
    )
    return y, logdet


def gated_solve(a: torch.Tensor, alpha: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """The gated inverse ``(I + α_c A) x = y`` per channel by the C++ back-substitution (no autograd), or None when
    the node is not available or the tensors are not on the CPU (the caller then runs the blocked solve)."""
    mod = load()
    if mod is None or a.device.type != "cpu":
        return None
    return mod.gated_solve(a, alpha.to(a.dtype), y.to(a.dtype))
