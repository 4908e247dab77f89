"""Preemption signals → finish the step, save, exit with the code the cluster expects.

- ``SIGUSR2`` (SLURM's ``--signal=B:USR2@120`` warning, forwarded by the batch script's trap): save and
  exit 0, so the batch script's ``scontrol requeue`` brings the job back.
- ``SIGTERM`` (Kubernetes pod eviction / preemption, or torchrun's shutdown): save and exit 143
  (128 + 15), so the job controller restarts the pod instead of marking it succeeded.

The handler only records the signal; the train loop polls :meth:`PreemptionWatch.exit_code` once per
step, which all-reduces the flag so every rank stops after the *same* step and joins the collective save.
The cluster's patience is finite (SLURM's warning lead time, the pod's termination grace period), so the
signal also starts a ``grace_s`` timer: if the step and the save have not finished by then, the process
exits with the same code anyway — an unfinished save never moves ``latest``, so the previous checkpoint
stays in charge — rather than being SIGKILLed mid-write with no word in the log.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import torch

from pipeline import dist

EXIT_CODES = {signal.SIGUSR2: 0, signal.SIGTERM: 143}
log = logging.getLogger(__name__)


class PreemptionWatch:
    """Installs handlers for SIGUSR2 and SIGTERM (main thread only) and reports a collective decision."""

    def __init__(self, grace_s: float = 0.0) -> None:
        self.grace_s = grace_s
        self._timer: threading.Timer | None = None
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
        if self.grace_s > 0 and self._timer is None:
            self._timer = threading.Timer(self.grace_s, self._out_of_time)
            self._timer.daemon = True
            self._timer.start()

    def _out_of_time(self) -> None:
        code = EXIT_CODES[self.received] if self.received is not None else 143
        msg = (
            f"{self.received.name if self.received else 'signal'}: the step and checkpoint did not finish within "
            f"checkpoint.grace_s={self.grace_s:g}s; exiting {code} now (the previous complete checkpoint stays "
            "the one `latest` names)"
        )
        log.error(msg)
        print(msg, flush=True)
        os._exit(code)

    def exit_code(self) -> int | None:
        """Collective: None to keep training, else the exit code every rank should stop with."""
        local = 0 if self.received is None else (2 if self.received == signal.SIGTERM else 1)
        code = int(dist.all_reduce_max(torch.tensor([local], dtype=torch.int64)).item())
        return None if code == 0 else (143 if code == 2 else 0)

    def restore(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Watchdog:
    """Exit non-zero (code 3) with a message when no step completes within ``timeout_s`` (0 = off)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s, self.last = timeout_s, time.monotonic()
        self._stop = threading.Event()
        if timeout_s > 0:
            threading.Thread(target=self._run, name="train-watchdog", daemon=True).start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout_s / 4)):
            idle = time.monotonic() - self.last
            if idle > self.timeout_s:
                msg = (
                    f"watchdog: no training step completed for {idle:.0f}s (train.watchdog_s={self.timeout_s:g}) "
                    f"on rank {dist.get_rank()}; aborting (a hung collective or data source?)"
                )
                log.error(msg)
                print(msg, flush=True)
                os._exit(3)
