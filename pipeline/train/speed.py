"""Training reports its own speed: step time, time blocked on the loader, achieved TFLOP/s, MFU, peak memory.

The model FLOPs of one forward + backward are counted once at start-up (:func:`count_step_flops`) on copies of
the model outside the DeepSpeed engine, at the configured precision, with activation recompute switched off
(``memory=store`` on the copy: recompute is not model work), at batch 1 and 2 of the first batch: the count is
``fixed + per_sample · batch`` (operators built once per call are the fixed part). Then :class:`SpeedMeter` turns wall-clock windows into
the logged metrics (names are a contract, see the README):

- ``step_time_s``: mean wall time per optimizer step over the window;
- ``data_wait_s``: mean time per step blocked on the data loader;
- ``achieved_tflops``: counted model FLOPs per step on this rank / ``step_time_s`` / 1e12;
- ``mfu``: ``achieved_tflops`` / the device's dense bf16 peak (CUDA devices in :data:`PEAK_BF16_TFLOPS`);
- ``peak_memory_gib``: CUDA max allocated, or this process's peak RSS on CPU.
"""

from __future__ import annotations

import contextlib
import copy
import resource
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.flops import DtypeFlopCounter
from pipeline.flows.mango import MangoFlow

#: dense bf16 tensor-core peak, TFLOP/s, by a substring of ``torch.cuda.get_device_name()`` (SXM parts)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def peak_bf16_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in TFLOP/s, or None (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


@dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of one forward + backward as ``fixed + per_sample · batch`` (the flows build their LICA and
    mixer operators once per call, independent of the batch), and the bf16 share of them."""

    fixed: float
    per_sample: float
    bf16_share: float

    def at(self, batch: int) -> float:
        return self.fixed + self.per_sample * batch


def _first(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    return {k: v[:n] if isinstance(v, (torch.Tensor, list, tuple)) else v for k, v in batch.items()}


def _count(
    model: nn.Module, batch: Mapping[str, Any], precision: Callable[[], Any], device: torch.device
) -> DtypeFlopCounter:
    probe = copy.deepcopy(model)
    for m in probe.modules():
        if isinstance(m, MangoFlow):
            m.memory = "store"
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None  # count eagerly: same ops, and no compile inside the counting mode
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), DtypeFlopCounter() as counter:
        with precision():
            out = probe(batch, mode="loss")
        out["loss"].backward()
    return counter


def count_step_flops(
    model: nn.Module, batch: Mapping[str, Any], precision: Callable[[], Any], device: torch.device
) -> StepFlops:
    """FLOPs of one forward + backward of ``model(batch, mode="loss")`` as a function of the batch size.

    Counted on deep copies at batch 1 and 2 (the first samples of ``batch``; the model's weights, gradients
    and RNG streams are left untouched), under the ``precision()`` context, with every flow's memory policy
    set to ``store``.
    """
    one = _count(model, _first(batch, 1), precision, device)
    if len(batch["__key__"]) < 2:
        return StepFlops(0.0, float(one.total), one.share(torch.bfloat16))
    two = _count(model, _first(batch, 2), precision, device)
    per_sample = float(two.total - one.total)
    return StepFlops(float(one.total) - per_sample, per_sample, two.share(torch.bfloat16))


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class SpeedMeter:
    """Accumulates step and loader-wait times between log lines; ``window()`` returns the metrics and resets."""

    def __init__(self, flops: StepFlops, device: torch.device):
        self.flops, self.device = flops, device
        self.peak = peak_bf16_tflops(device)
        self._start = time.perf_counter()
        self._wait = self._excluded = self._flops = 0.0
        self._steps = 0
        self.total_steps, self.total_time, self.total_wait, self.total_flops = 0, 0.0, 0.0, 0.0

    def timed_next(self, batches):
        """``next(batches)``, its blocking time booked as data wait."""
        t = time.perf_counter()
        batch = next(batches)
        self._wait += time.perf_counter() - t
        return batch

    def micro_batch(self, samples: int) -> None:
        """One forward + backward over ``samples`` local samples done."""
        self._flops += self.flops.at(samples)

    def step(self) -> None:
        """One optimizer step done on this rank."""
        self._steps += 1

    def window(self) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed, steps = now - self._start - self._excluded, max(self._steps, 1)
        flops = self._flops
        values = {
            "step_time_s": elapsed / steps,
            "data_wait_s": self._wait / steps,
            "achieved_tflops": flops / max(elapsed, 1e-9) / 1e12,
            "peak_memory_gib": peak_memory_gib(self.device),
        }
        if self.peak is not None:
            values["mfu"] = values["achieved_tflops"] / self.peak
        self.total_steps += self._steps
        self.total_time += elapsed
        self.total_wait += self._wait
        self.total_flops += flops
        self._start, self._wait, self._excluded, self._flops, self._steps = now, 0.0, 0.0, 0.0, 0
        return values

    @contextlib.contextmanager
    def excluded(self):
        """Time spent inside (validation, checkpoints) is not step time."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self._excluded += time.perf_counter() - t

    def summary(self) -> str:
        """One line over the whole run's logged windows."""
        if not self.total_steps:
            return "speed: no steps timed"
        step = self.total_time / self.total_steps
        tflops = self.total_flops / max(self.total_time, 1e-9) / 1e12
        mfu = f"{tflops / self.peak:.1%}" if self.peak is not None else f"n/a ({self.device.type})"
        return (
            f"speed: {self.total_steps} steps, {step:.3f} s/step, data wait {self.total_wait / self.total_steps:.3f} "
            f"s/step ({self.total_wait / max(self.total_time, 1e-9):.0%}), {tflops:.3g} TFLOP/s per rank, "
            f"MFU {mfu}, peak memory {peak_memory_gib(self.device):.2f} GiB"
        )
