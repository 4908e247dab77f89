"""Preemption signals → finish the step, save, exit with the code the cluster expects.

- ``SIGUSR2`` (SLURM's ``--signal=B:USR2@120`` warning, forwarded by the batch script's trap): save and
  exit 0, so the batch script's ``scontrol requeue`` brings the job back.
- ``SIGTERM`` (Kubernetes pod eviction / preemption, or torchrun's shutdown): save and exit 143
  (128 + 15), so the job controller restarts the pod instead of marking it succeeded.

The handler only records the signal; the train loop polls :meth:`PreemptionWatch.exit_code` once per
step, which all-reduces the flag so every rank stops after the *same* step and joins the collective save.
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as tdist

from pipeline import dist

EXIT_CODES = {signal.SIGUSR2: 0, signal.SIGTERM: 143}


class PreemptionWatch:
    """Installs handlers for SIGUSR2 and SIGTERM (main thread only) and reports a collective decision."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.received_at: float | None = None
        self._previous = {}
        for sig in EXIT_CODES:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some Ray actors): signals cannot be caught here
                pass

    def _handle(self, signum: int, frame) -> None:
        # SIGTERM outranks SIGUSR2: a pod being killed must not be reported as a clean exit.
        if self.received is None or signum == signal.SIGTERM:
            self.received, self.received_at = signal.Signals(signum), time.monotonic()

    def exit_code(self) -> int | None:
        """Collective: None to keep training, else the exit code every rank should stop with."""
        local = 0 if self.received is None else (2 if self.received == signal.SIGTERM else 1)
        flag = torch.tensor([local], dtype=torch.int64)
        if dist.is_initialized():
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        code = int(flag.item())
        return None if code == 0 else (143 if code == 2 else 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
