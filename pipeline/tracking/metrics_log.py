"""A run's metrics as JSON lines at ``<run.dir>/metrics.jsonl`` (rank 0), and the plot rendered from them.

One line per logged step, e.g. ``{"step": 10, "time": 1795530191.2, "loss": 3.21, "bits_per_dim": 4.6,
"lr": 0.001, "grad_norm": 0.8}``; validation lines carry ``val_*`` keys. ``time`` is Unix seconds.
Non-finite numbers are written as ``null`` (strict JSON has no NaN), so a skipped step still leaves a line.
The file needs no server: ``jq``/pandas read it while the run goes on.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# (panel title, keys drawn in it): train curves as lines, validation (val_*) with markers
PLOT_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss", "val_loss")),
    ("bits / dim", ("bits_per_dim", "val_bits_per_dim")),
)


class MetricsLog:
    """Appends one JSON object per call to ``path`` (created with its parent directory on first write).

    Every call opens, appends one whole line and closes, so the file is complete after each step, survives a
    crash, and a forked DataLoader worker never inherits a handle.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Append ``{"step", "time", **metrics}``; returns the record written.

        Values: numbers (Python, NumPy or 0-d tensors via ``.item()``), bools, strings or None.
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"MetricsLog.log: step must be a non-negative int; got {step!r}")
        record: dict[str, Any] = {"step": step, "time": round(time.time(), 3)}
        for key, value in metrics.items():
            if not isinstance(key, str) or key in ("step", "time"):
                raise ValueError(f"MetricsLog.log: metric names must be strings other than step/time; got {key!r}")
            record[key] = _jsonable(key, value)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        return record

    def truncate_after(self, step: int) -> int:
        """Drop lines with ``step > step`` (a resumed run repeats the steps after its checkpoint).

        Returns how many records were dropped; rewrites the file atomically (a torn last line goes too).
        """
        if not self.path.exists():
            return 0
        records = read_metrics(self.path)
        kept = [r for r in records if r["step"] <= step]
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        return len(records) - len(kept)


class KeysLog(MetricsLog):
    """``<run.dir>/keys/rank<r>.jsonl`` (``train.log_keys``): the sample keys of every micro-batch a rank trained,
    one line ``{"step", "time", "keys": [...]}`` each (``step`` = the optimizer step the micro-batch belongs to),
    truncated like ``metrics.jsonl`` on resume. Answers "which samples did step N see" and proves an epoch's
    coverage (each key once) across resizes."""

    def log_keys(self, step: int, keys: Sequence[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"step": step, "time": round(time.time(), 3), "keys": [str(k) for k in keys]}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``, in file order. A torn last line (a crash mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_metrics: no metrics file at {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"read_metrics: {path}:{i + 1} is not a JSON line") from None
    return records


def plot_metrics(
    jsonl_path: str | os.PathLike,
    png_path: str | os.PathLike,
    panels: Sequence[tuple[str, Sequence[str]]] = PLOT_PANELS,
) -> Path:
    """Render loss and bits/dim against step from ``metrics.jsonl`` into a PNG; returns the PNG path.

    Uses the Agg canvas directly (no pyplot state), so it is safe off the main thread and on headless nodes.
    Raises ``ValueError`` when the file holds none of the panels' keys.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy: matplotlib, only when plotting
    from matplotlib.figure import Figure  # heavy: matplotlib, only when plotting

    records = read_metrics(jsonl_path)
    series = {
        key: [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        for _, keys in panels
        for key in keys
    }
    if not any(series.values()):
        wanted = sorted({k for _, keys in panels for k in keys})
        raise ValueError(f"plot_metrics: {jsonl_path} has no values for any of {wanted}")
    fig = Figure(figsize=(5.0 * len(panels), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (title, keys) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for key in keys:
            if series[key]:
                steps, values = zip(*series[key])
                style = {"marker": "o", "linestyle": "--"} if key.startswith("val_") else {"linewidth": 1.2}
                ax.plot(steps, values, label=key, **style)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    return png_path


def _jsonable(key: str, value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # 0-d tensors, NumPy scalars
        value = value.item()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise ValueError(
        f"MetricsLog.log: metric {key!r} must be a number, bool, string or None; got {type(value).__name__}"
    )
