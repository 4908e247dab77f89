"""What ``python -m jobs.launch`` is asked to render, the resolved job config, and the tiny template filler.

Escaping rules every renderer follows (the classic multi-node bug is a per-node variable expanded once, on
the submitting or batch host, instead of on each node):

- values known at render time (paths, the interpreter, jobs.shard arguments) are inserted with
  :func:`shlex.quote`, so a space or ``$`` in them is never re-interpreted by the shell;
- values the batch shell knows once for the whole job (``$HEAD_NODE``, ``$PORT``, ``$SLURM_JOB_ID``) are
  written as double-quoted shell variables and expand in the batch shell — identical on every node;
- values that differ per node (``$SLURM_NODEID``) appear only inside a single-quoted ``bash -c '...'`` that
  srun runs on each node, so they expand there;
- Kubernetes manifests are built as Python data and dumped with ``yaml.safe_dump``; no text templating.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.config import Config, apply_overrides, to_dict

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "launch" / "templates"
TARGETS = ("slurm", "srun", "shard-array", "ray-slurm", "k8s", "kuberay")
LAUNCHERS = ("torchrun", "deepspeed", "accelerate")
# SLURM's warning must leave time for the step in flight plus the save (checkpoint.grace_s) plus the requeue
MIN_SIGNAL_LEAD_S = 120
# Kubernetes: after checkpoint.grace_s the ranks exit on their own; the rest is the launcher's shutdown
K8S_GRACE_MARGIN_S = 30
_SECRET_KEY = re.compile(r"(SECRET|PASSWORD|TOKEN|CREDENTIAL|ACCESS_KEY|PRIVATE|API_KEY)", re.I)
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class LaunchError(ValueError):
    """A launch request that cannot be rendered; the message names the option or config key."""


@dataclass(frozen=True)
class LaunchSpec:
    """One render request.

    ``gpus_per_node`` = 0 renders a CPU job: one process per node and no GPU request (used by the tests,
    and for CPU clusters). ``shard_args`` are ``jobs.shard`` arguments (``SOURCE --src ... --out ... --split
    ...``), used by ``shard-array`` and by ``k8s`` (which then renders an indexed Job instead of a PyTorchJob).
    """

    target: str
    nodes: int
    gpus_per_node: int
    launcher: str = "torchrun"
    config_source: str = "defaults"
    space: str = ""
    tasks: int = 0
    shard_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise LaunchError(f"target must be one of {list(TARGETS)}; got {self.target!r}")
        if self.nodes < 1:
            raise LaunchError(f"--nodes must be ≥ 1; got {self.nodes}")
        if self.gpus_per_node < 0:
            raise LaunchError(f"--gpus-per-node must be ≥ 0 (0 = CPU only); got {self.gpus_per_node}")
        if self.launcher not in LAUNCHERS:
            raise LaunchError(f"--launcher must be one of {list(LAUNCHERS)}; got {self.launcher!r}")
        if self.launcher != "torchrun" and self.target != "slurm":
            raise LaunchError(f"--launcher {self.launcher} applies to the slurm target only; got {self.target}")
        if self.tasks < 0:
            raise LaunchError(f"--tasks must be ≥ 1; got {self.tasks}")
        if self.space and self.target not in ("ray-slurm", "kuberay"):
            raise LaunchError(f"--space applies to ray-slurm and kuberay only; got {self.target}")
        if self.tasks and not self.shard_args:
            raise LaunchError("--tasks applies to sharding: give the jobs.shard arguments after `--`")

    @property
    def procs_per_node(self) -> int:
        """Training processes per node: one per GPU, or one on a CPU node."""
        return max(self.gpus_per_node, 1)


@dataclass
class Artifact:
    """One rendered file. ``tool`` submits it (``sbatch`` / ``kubectl``); ``after`` names the artifact it
    depends on (SLURM: ``--dependency=afterok``; Kubernetes: ``kubectl wait`` for that Job to complete)."""

    name: str
    text: str
    tool: str
    after: str = ""
    k8s_job: str = ""  # the Job name `kubectl wait` waits for, when another artifact depends on this one
    namespace: str = ""


@dataclass
class Rendered:
    artifacts: list[Artifact] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one-line hints printed with --print


def fill(template: str, values: dict[str, object], name: str = "template") -> str:
    """Replace every ``{{key}}`` in ``template``; a missing or unused key is an error (no silent blanks)."""
    used: set[str] = set()

    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            raise KeyError(f"{name}: no value for {{{{{key}}}}}")
        used.add(key)
        return str(values[key])

    out = re.sub(r"\{\{(\w+)\}\}", sub, template)
    unused = set(values) - used
    if unused:
        raise KeyError(f"{name}: values given but not used: {sorted(unused)}")
    return out


def load_template(name: str) -> str:
    """A template's text, with each ``{{include FILE}}`` line replaced by FILE's lines (minus its ``#`` header)."""

    def include(m: re.Match) -> str:
        lines = (TEMPLATES / m.group(1)).read_text().splitlines(keepends=True)
        return "".join(line for line in lines if not line.startswith("# "))

    return re.sub(r"^\{\{include ([\w.]+)\}\}\n", include, (TEMPLATES / name).read_text(), flags=re.M)


def q(value: object) -> str:
    """Shell-quote a render-time value."""
    return shlex.quote(str(value))


def job_config(cfg: Config, *, run_dir: str | None = None, base: Path | None = None) -> Config:
    """The config a cluster job runs: ``checkpoint.resume=latest`` (a requeue or restart continues), local
    relative paths made absolute against ``base`` (the submit directory; batch jobs run elsewhere), and
    ``run.dir`` replaced by ``run_dir`` when given (Kubernetes: a path on the shared volume)."""
    base = (base or Path.cwd()).resolve()
    over: dict[str, object] = {"checkpoint.resume": "latest"}
    paths = {
        "run.dir": cfg.run.dir,
        "data.shards": cfg.data.shards,
        "model.init_weights": cfg.model.init_weights,
        "model.encoder_weights": cfg.model.encoder_weights,
    }
    for key, value in paths.items():
        if value and "://" not in value and not Path(value).is_absolute():
            over[key] = str(base / value)
    if run_dir is not None:
        over["run.dir"] = run_dir
    return apply_overrides(cfg, over)


def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def plain_env(cfg: Config) -> list[tuple[str, str]]:
    """``launch.env`` as (key, value) pairs; secret-looking keys are refused (they belong in the Secret)."""
    pairs = []
    for item in cfg.launch.env:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_KEY.fullmatch(key):
            raise LaunchError(f"launch.env: entry {item!r} must look like KEY=VALUE")
        if _SECRET_KEY.search(key):
            raise LaunchError(
                f"launch.env: {key} looks like a credential; put it in the Secret "
                f"launch.env_from={cfg.launch.env_from!r} (k8s) or the submitting environment (SLURM), "
                "never in a rendered file"
            )
        pairs.append((key, value))
    return pairs


def signal_lead_s(cfg: Config) -> int:
    """Seconds of warning SLURM gives before the end: ≥ 120, and ≥ checkpoint.grace_s + 60."""
    return max(MIN_SIGNAL_LEAD_S, math.ceil(cfg.checkpoint.grace_s) + 60)


def job_name(cfg: Config, suffix: str = "") -> str:
    """A name valid for SLURM and as a Kubernetes object name (lowercase RFC 1123 label, ≤ 52 chars so that
    operator-added suffixes such as ``-worker-12`` still fit in 63)."""
    base = cfg.run.name.lower()
    base = base if base.startswith("mango") else f"mango-{base}"
    name = re.sub(r"[^a-z0-9-]+", "-", f"{base}{suffix}").strip("-")
    return name[:52].rstrip("-")
