"""MLflow tracking for rank 0 that never blocks, slows or crashes training.

Where runs go is decided in :mod:`pipeline.tracking.store` (``tracking.uri`` ← ``MLFLOW_TRACKING_URI`` ←
the project's shared ``sqlite:///<root>/mlflow.db``).

How logging stays off the training path: every ``log_*`` call validates its input, then appends to a
bounded queue and returns. A background thread sends in batches (``log_batch``). When the queue is full
the oldest entry is dropped and counted. A failed send is retried a few times (by MLflow's HTTP session
for ``http(s)`` stores — its retries are bounded here, see :func:`bound_http_retries` — and by the tracker
for local stores); if it still fails, the store is considered unreachable: ONE warning is logged for the
whole run, whatever cannot be sent is dropped and counted, and sending is tried again after ``cooldown_s``.
``close`` waits at most ``timeout_s`` for the queue to drain. Rejections by a live store (HTTP 4xx, e.g.
a metric name it refuses) drop only that batch; the first one is warned about with the store's reason.

Secrets: params pass through :func:`~pipeline.tracking.redaction.redact_params` (rules in ``is_secret_key``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .metrics_log import plot_metrics
from .redaction import redact_params
from .store import bound_http_retries, ensure_experiment, resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from pipeline.config import Config

log = logging.getLogger(__name__)

_BATCH_LIMITS = {"metric": 1000, "param": 100, "tag": 100}  # MLflow's log_batch limits per kind
_MAX_KEY = 250
_KEY_NAME = re.compile(r"[\w\-. /]{1,250}")  # what MLflow accepts in metric/param/tag names
_HTTP_SCHEMES = ("http://", "https://")


@dataclass
class TrackerStats:
    """Counts of queued entries (a metric, a param, a tag, an artifact or the run's end each count one)."""

    sent: int = 0
    dropped_full: int = 0  # evicted because the queue was full
    dropped_unreachable: int = 0  # could not be sent (store unreachable, or still queued at close)
    rejected: int = 0  # refused by a live server (HTTP 4xx)

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_unreachable + self.rejected


class _QuietRetries(logging.Filter):
    """Hides urllib3's connection-pool records (per-attempt "Retrying …" warnings) while the current thread
    is inside a tracker call: the tracker reports an unreachable store once, itself."""

    local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "active", False)


_QUIET = _QuietRetries()
logging.getLogger("urllib3.connectionpool").addFilter(_QUIET)


class MlflowTracker:
    """One MLflow run, fed from rank 0 without blocking (see the module docstring).

    Typical use::

        tracker = MlflowTracker.from_config(cfg)            # rank 0 only
        run_id = tracker.start(cfg.run.name, tags={"data.manifest_sha256": digest})
        tracker.log_config(cfg, run_dir / "config.yaml")
        tracker.log_metrics({"loss": 3.2, "bits_per_dim": 4.6}, step)   # sent every ``log_every`` steps
        tracker.close()                                       # or use it as a context manager

    ``start`` is the only call that talks to the store synchronously; it is bounded by the HTTP retry
    limits and, when the store is unreachable, returns None after the one warning (every later call then
    drops its input and counts it).
    """

    def __init__(
        self,
        experiment: str,
        *,
        uri: str = "",
        log_every: int = 1,
        queue_size: int = 1000,
        timeout_s: float = 10.0,
        retries: int = 2,
        cooldown_s: float = 30.0,
    ):
        if not experiment:
            raise ValueError("MlflowTracker: experiment name must not be empty")
        for name, value, low in (("log_every", log_every, 1), ("queue_size", queue_size, 1), ("retries", retries, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"MlflowTracker: {name} must be an int ≥ {low}; got {value!r}")
        if timeout_s <= 0 or cooldown_s < 0:
            raise ValueError(f"MlflowTracker: need timeout_s > 0 and cooldown_s ≥ 0; got {timeout_s}, {cooldown_s}")
        self.uri = resolve_tracking_uri(uri)
        if not re.match(r"^[a-z][a-z0-9+.-]*:", self.uri) and not os.path.isabs(self.uri):
            raise ValueError(f"MlflowTracker: tracking URI {self.uri!r} needs a scheme (sqlite:///, http://, file:) ")
        self.experiment, self.log_every = experiment, log_every
        self.timeout_s, self.retries, self.cooldown_s = float(timeout_s), retries, float(cooldown_s)
        self._http = self.uri.startswith(_HTTP_SCHEMES)
        bound_http_retries(retries, timeout_s)
        self.stats = TrackerStats()
        self._queue: collections.deque[tuple[str, Any]] = collections.deque()
        self._queue_size = queue_size
        self._cond = threading.Condition()
        self._closing = False
        self._warned = False
        self._warned_rejection = False
        self._down_until = 0.0
        self._run_id: str | None = None
        self._client: MlflowClient | None = None
        self._thread: threading.Thread | None = None
        self._staging: Path | None = None
        self._resumed_params: dict[str, str] = {}  # params of a resumed run, as the store has them
        self._logged_params: dict[str, str] = {}  # params queued by this tracker
        self._started = False

    @classmethod
    def from_config(cls, cfg: Config) -> MlflowTracker:
        t = cfg.tracking
        return cls(
            t.experiment,
            uri=t.uri,
            log_every=t.log_every,
            queue_size=t.queue_size,
            timeout_s=t.timeout_s,
            retries=t.retries,
        )

    # -- lifecycle ----------------------------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (broadcast it to the other ranks), or None when not started/unreachable."""
        return self._run_id

    @property
    def active(self) -> bool:
        return self._run_id is not None and not self._closing

    def start(
        self,
        run_name: str | None = None,
        *,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> str | None:
        """Create the run (nested under ``parent_run_id`` if given), or reopen ``run_id`` to resume it.

        Returns the run id, or None (after the one warning) when the store cannot be reached. A ``run_id``
        the store does not know (a checkpoint moved to another store) starts a new run tagged
        ``mango.resumed_from=<run_id>``, with a warning: a requeued job must not die over its tracking.
        """
        from mlflow import MlflowClient  # heavy: optional tracking dependency

        if self._started:
            raise RuntimeError("MlflowTracker.start: already started")
        self._started = True
        run_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            run_tags["mlflow.parentRunId"] = parent_run_id
        self._client = MlflowClient(tracking_uri=self.uri)
        try:
            with self._quiet():
                run = self._resume(run_id, run_tags) if run_id else None
                if run is None:
                    if run_id:
                        run_tags["mango.resumed_from"] = run_id
                    exp_id = ensure_experiment(self._client, self.experiment)
                    run = self._client.create_run(exp_id, tags=run_tags, run_name=run_name)
        except Exception as e:  # whatever the store raises, training goes on without it
            self._warn_unreachable(e)
            self._closing = True
            return None
        self._run_id = run.info.run_id
        self._staging = Path(tempfile.mkdtemp(prefix="mango-mlflow-"))
        self._thread = threading.Thread(target=self._worker, name="mlflow-tracker", daemon=True)
        self._thread.start()
        return self._run_id

    def _resume(self, run_id: str, tags: dict[str, str]) -> Any:
        """The reopened run, or None (after a warning) when the store has no run ``run_id``."""
        from mlflow.entities import RunTag  # heavy: optional tracking dependency
        from mlflow.exceptions import MlflowException  # heavy: optional tracking dependency

        try:
            run = self._client.get_run(run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("MLflow tracking: run %s to resume does not exist at %s; starting a new run", run_id, self.uri)
            return None
        self._resumed_params = dict(run.data.params)
        self._client.update_run(run_id, status="RUNNING")
        if tags:
            self._client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
        return run

    def close(self, status: str = "FINISHED") -> TrackerStats:
        """Finish the run (``FINISHED``, ``FAILED`` or ``KILLED``), waiting at most ``timeout_s`` for pending
        sends; whatever is still queued then is dropped and counted. Safe to call twice."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"MlflowTracker.close: status must be FINISHED, FAILED or KILLED; got {status!r}")
        if self._thread is None or self._closing:
            return self.stats
        self._enqueue("end", status, evictable=False)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(self.timeout_s)
        with self._cond:
            self.stats.dropped_unreachable += len(self._queue)
            self._queue.clear()
        if self._thread.is_alive():
            log.info("MLflow tracking: gave up waiting for a send after %.0f s", self.timeout_s)
            # a send still hanging at the end is the store being unreachable too (a server that died late in
            # the run never got to fail a send): the run's one warning says so if nothing else did
            self._warn_unreachable(TimeoutError(f"a send did not finish within {self.timeout_s:.0f} s"))
        if self.stats.dropped:
            log.info("MLflow tracking: %s", self.stats)
        if self._staging is not None and not self._thread.is_alive():
            shutil.rmtree(self._staging, ignore_errors=True)
        return self.stats

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED"))

    # -- logging (all non-blocking) -----------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params after :func:`redact_params`. MLflow params are immutable: re-logging a name with the
        same value is a no-op, with another value a ``ValueError`` — except on a resumed run, whose params
        from before the restart are kept (its config differs in ``checkpoint.resume`` at least)."""
        self._require_started()
        clean = redact_params(params)
        for key, value in clean.items():
            _check_name(key, "param")
            if self._logged_params.get(key, value) != value:
                raise ValueError(
                    f"MlflowTracker.log_params: {key!r} was already logged as {self._logged_params[key]!r}; "
                    f"MLflow params cannot change (got {value!r})"
                )
        changed = sorted(k for k in clean if k in self._resumed_params and self._resumed_params[k] != clean[k])
        if changed:
            log.info("MLflow tracking: the resumed run keeps its original params for %s", ", ".join(changed))
        for key, value in clean.items():
            if key not in self._logged_params and key not in self._resumed_params:
                self._logged_params[key] = value
                self._enqueue("param", (key, value))

    def log_config(self, cfg: Config, yaml_path: str | os.PathLike | None = None) -> None:
        """The flattened resolved config as params, and its YAML file (if given) as artifact ``config/``."""
        from pipeline.config import flatten  # heavy: pipeline.config imports torch; pipeline.tracking stays torch-free

        self.log_params(flatten(cfg))
        if yaml_path is not None:
            self.log_artifact(yaml_path, "config")

    def log_metrics(self, metrics: Mapping[str, Any], step: int, *, force: bool = False) -> bool:
        """Queue ``metrics`` at ``step`` when ``step % log_every == 0`` or ``force`` (use it for validation
        and final values); returns whether they were queued. Values must be real numbers (NaN/inf allowed);
        0-d tensors are read with ``.item()`` only on steps that are sent (it synchronises a GPU)."""
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"MlflowTracker.log_metrics: step must be a non-negative int; got {step!r}")
        for key in metrics:
            _check_name(key, "metric")
        if not (force or step % self.log_every == 0):
            return False
        values = {}
        for key, value in metrics.items():
            if hasattr(value, "item") and callable(value.item):
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"MlflowTracker.log_metrics: metric {key!r} must be a real number; got {value!r}")
            values[key] = float(value)
        now_ms = int(time.time() * 1000)
        for key, value in values.items():
            self._enqueue("metric", (key, value, now_ms, step))
        return True

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Run tags, e.g. ``{"data.manifest_sha256": ...}``; values are stringified."""
        for key, value in tags.items():
            _check_name(key, "tag")
            self._enqueue("tag", (key, str(value)))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file (copied now, so the caller may rewrite it at once) under ``artifact_path``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"MlflowTracker.log_artifact: not a file: {path}")
        self._require_started()
        if self._staging is None or not self.active:
            self._count_dropped(1)
            return
        slot = Path(tempfile.mkdtemp(dir=self._staging))
        copy = slot / path.name
        shutil.copy2(path, copy)
        self._enqueue("artifact", (str(copy), artifact_path))

    def log_metrics_plot(self, jsonl_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
        """Render the loss / bits-per-dim plot from ``metrics.jsonl`` to ``png_path`` and log it under ``plots/``."""
        png = plot_metrics(jsonl_path, png_path)
        self.log_artifact(png, "plots")
        return png

    # -- internals ----------------------------------------------------------------------------------------

    def _enqueue(self, kind: str, item: Any, evictable: bool = True) -> None:
        self._require_started()
        with self._cond:
            if self._run_id is None or self._closing:
                self.stats.dropped_unreachable += 1
                return
            if evictable and len(self._queue) >= self._queue_size:
                self._queue.popleft()  # the oldest entry goes: recent values matter more on a live dashboard
                self.stats.dropped_full += 1
            self._queue.append((kind, item))
            self._cond.notify()

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("MlflowTracker: call start() before logging")

    def _count_dropped(self, n: int) -> None:
        with self._cond:
            self.stats.dropped_unreachable += n

    def _take_batch(self) -> list[tuple[str, Any]] | None:
        """Wait for work; return consecutive entries of one kind that one ``log_batch`` can carry (or one
        artifact / end). Kinds are not mixed, so a rejected param never takes metrics down with it."""
        with self._cond:
            while not self._queue and not self._closing:
                self._cond.wait()
            if not self._queue:
                return None
            first = self._queue.popleft()
            batch = [first]
            limit = _BATCH_LIMITS.get(first[0], 1)
            while self._queue and self._queue[0][0] == first[0] and len(batch) < limit:
                batch.append(self._queue.popleft())
            return batch

    def _worker(self) -> None:
        while (batch := self._take_batch()) is not None:
            if time.monotonic() < self._down_until:
                self._count_dropped(len(batch))
                continue
            try:
                with self._quiet():
                    self._send(batch)
            except Exception as e:  # a tracker must never take training down
                if _is_rejection(e):
                    self.stats.rejected += len(batch)
                    # first refusal is a warning; repeats (same cause, usually) only go to the debug log
                    level = logging.DEBUG if self._warned_rejection else logging.WARNING
                    self._warned_rejection = True
                    log.log(level, "MLflow tracking: the store refused %d entries: %s", len(batch), _short(e))
                else:
                    self._count_dropped(len(batch))
                    self._warn_unreachable(e)
                    self._down_until = time.monotonic() + self.cooldown_s
                continue
            self.stats.sent += len(batch)
            if self._down_until:
                self._down_until = 0.0
                log.info("MLflow tracking at %s is reachable again", self.uri)

    def _send(self, batch: list[tuple[str, Any]]) -> None:
        """One store operation, retried for local stores (MLflow's HTTP session retries http ones)."""
        from mlflow.entities import Metric, Param, RunTag  # heavy: optional tracking dependency

        attempts = 1 if self._http else 1 + self.retries
        for attempt in range(attempts):
            try:
                kind, item = batch[0]
                if kind == "artifact":
                    self._client.log_artifact(self._run_id, item[0], item[1])
                    shutil.rmtree(Path(item[0]).parent, ignore_errors=True)
                elif kind == "end":
                    self._client.set_terminated(self._run_id, status=item)
                else:
                    self._client.log_batch(
                        self._run_id,
                        metrics=[Metric(k, v, ts, st) for k, v, ts, st in _only(batch, "metric")],
                        params=[Param(k, v) for k, v in _only(batch, "param")],
                        tags=[RunTag(k, v) for k, v in _only(batch, "tag")],
                        synchronous=True,
                    )
                return
            except Exception as e:
                if attempt == attempts - 1 or _is_rejection(e):
                    raise
                time.sleep(0.2 * 2**attempt)

    def _warn_unreachable(self, error: BaseException) -> None:
        with self._cond:  # the worker and close() may both get here
            first, self._warned = not self._warned, True
        if first:
            log.warning(
                "MLflow tracking at %s is unreachable or failing (%s); training continues and what cannot be "
                "sent is dropped (this warning is shown once per run)",
                self.uri,
                _short(error),
            )

    @staticmethod
    @contextlib.contextmanager
    def _quiet() -> Iterator[None]:
        _QuietRetries.local.active = True
        try:
            yield
        finally:
            _QuietRetries.local.active = False


def _only(batch: list[tuple[str, Any]], kind: str) -> list[Any]:
    return [item for kind_, item in batch if kind_ == kind]


def _check_name(key: Any, what: str) -> None:
    if not isinstance(key, str) or not _KEY_NAME.fullmatch(key) or ".." in key or key.startswith("/"):
        raise ValueError(
            f"MlflowTracker: {what} name {key!r} is not accepted by MLflow (letters, digits, _ - . space /; "
            f"at most {_MAX_KEY} characters)"
        )


def _is_rejection(e: BaseException) -> bool:
    """A live server said no (HTTP 4xx) — as opposed to the store being unreachable or failing."""
    from mlflow.exceptions import MlflowException  # heavy: optional tracking dependency

    return isinstance(e, MlflowException) and 400 <= e.get_http_status_code() < 500


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}{'...' if len(text) > 200 else ''}"
