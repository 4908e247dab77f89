"""Where this process sits in the job: one rank/world detector for every launcher (environment only).

:func:`world_info_from_env` reads only environment variables (it never calls ``scontrol``, MPI or Ray) and
checks launchers in this order — the first that matches wins:

1. ``RANK`` and ``WORLD_SIZE`` are set: the process was started by a launcher that spawns one process per
   rank itself — torchrun, the deepspeed launcher, ``accelerate launch`` or a Ray Train worker (any
   Kubeflow-style ``env://`` launcher too). These win over SLURM because when torchrun (or accelerate)
   runs inside an ``srun`` step, ``SLURM_PROCID`` numbers the *node's launcher task*, not the rank. The
   name only labels the run: Ray (``RAY_RAYLET_PID``/``RAY_JOB_ID``, checked first because Ray Train also
   sets ``ACCELERATE_TORCH_DEVICE``), accelerate (``ACCELERATE_MIXED_PRECISION``/``ACCELERATE_DYNAMO_BACKEND``;
   it runs torchrun underneath, so before torchrun), torchrun (``TORCHELASTIC_RUN_ID``), deepspeed
   (``CROSS_RANK``/``LOCAL_SIZE``), else ``env``.
2. MPI (``OMPI_COMM_WORLD_RANK`` for OpenMPI, e.g. ``deepspeed --launcher openmpi``; ``PMI_RANK`` for
   MPICH / Intel MPI / MVAPICH): before SLURM, because ``mpirun`` inside an allocation inherits the batch
   step's ``SLURM_PROCID=0``. The master address comes from ``MASTER_ADDR`` (deepspeed's MPICH/IMPI runners
   export it; with OpenMPI pass ``-x MASTER_ADDR``), or is left to deepspeed's mpi4py discovery.
3. A Ray worker without ``RANK`` (a single-process Tune trial): world size 1. Before SLURM because a Ray
   cluster started inside ``srun`` passes that step's ``SLURM_PROCID``/``SLURM_NTASKS`` to every worker.
4. An ``srun`` step (``SLURM_STEP_ID`` set), one task per GPU: rank ``SLURM_PROCID``, local rank
   ``SLURM_LOCALID``, world ``SLURM_STEP_NUM_TASKS`` (or ``SLURM_NTASKS``), master = first host of the
   step's node list, port ``MASTER_PORT`` or derived from ``SLURM_JOB_ID``. A plain ``python`` in an sbatch
   script or ``salloc`` shell has no step id and is *not* a multi-rank run (its ``SLURM_NTASKS`` describes
   the allocation, and treating it as the world size would hang the first collective).
5. Otherwise a plain ``python`` run: world size 1, master ``127.0.0.1``, port chosen when the group starts.

``MASTER_ADDR``/``MASTER_PORT``, when set, always win over derived values.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 20000, 40000


@dataclass(frozen=True)
class WorldInfo:
    """Where this process sits in the job.

    ``master_port == 0`` means "any free port, picked by :func:`init_distributed`" (only for world size 1);
    ``master_addr == ""`` means "unknown; discovered over MPI" (only for MPI launches without MASTER_ADDR).
    """

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str

    def __post_init__(self) -> None:
        if not (0 <= self.rank < self.world_size):
            raise ValueError(f"WorldInfo: rank {self.rank} is outside world size {self.world_size}")
        if not (0 <= self.local_rank < self.local_world_size <= self.world_size):
            raise ValueError(
                f"WorldInfo: need 0 ≤ local_rank ({self.local_rank}) < local_world_size "
                f"({self.local_world_size}) ≤ world_size ({self.world_size})"
            )
        if not (0 <= self.master_port < 65536):
            raise ValueError(f"WorldInfo: master_port must be in [0, 65535]; got {self.master_port}")

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


def world_info_from_env(env: Mapping[str, str] | None = None) -> WorldInfo:
    """Detect the launcher from ``env`` (default ``os.environ``); see the module docstring for the order."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return _from_torch_env(env)
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        return _from_mpi(env)
    if _in_ray(env):
        return _single(env, "ray")
    if "SLURM_STEP_ID" in env or "SLURM_STEPID" in env:
        return _from_srun(env)
    return _single(env, "python")


# -- hostlists --------------------------------------------------------------------------------------


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a SLURM hostlist: ``"node[001-003,007],gpu-a[1-2]-x"`` → ``["node001", ..., "gpu-a2-x"]``.

    Several bracket groups in one name expand as a Cartesian product (``r[1-2]n[1-2]`` → 4 hosts);
    zero padding follows the range's first bound. Raises ``ValueError`` on malformed input.
    """
    if not isinstance(hostlist, str) or not hostlist.strip():
        raise ValueError(f"expand_hostlist: empty hostlist {hostlist!r}")
    hosts: list[str] = []
    for item in _split_top_level(hostlist.strip()):
        parts = re.split(r"(\[[^\[\]]*\])", item)
        if any(("[" in p or "]" in p) and not (p.startswith("[") and p.endswith("]")) for p in parts):
            raise ValueError(f"expand_hostlist: unbalanced brackets in {item!r}")
        choices = [_expand_range(p[1:-1], item) if p.startswith("[") else [p] for p in parts]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth < 0 or depth > 1:
            raise ValueError(f"expand_hostlist: unbalanced or nested brackets in {text!r}")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"expand_hostlist: unbalanced brackets in {text!r}")
    items.append(text[start:])
    if any(not it for it in items):
        raise ValueError(f"expand_hostlist: empty host name in {text!r}")
    return items


def _expand_range(spec: str, item: str) -> list[str]:
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m:
            raise ValueError(f"expand_hostlist: bad range {part!r} in {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"expand_hostlist: descending range {part!r} in {item!r}")
        out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return out


def parse_tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed per-node task counts: ``"4(x2),3"`` → ``[4, 4, 3]``."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"parse_tasks_per_node: cannot parse {spec!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


# -- launchers --------------------------------------------------------------------------------------


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int:
    for name in names:
        if name in env:
            try:
                return int(env[name])
            except ValueError:
                raise ValueError(f"world_info_from_env: {name}={env[name]!r} is not an integer") from None
    if default is None:
        raise ValueError(f"world_info_from_env: none of {', '.join(names)} is set")
    return default


def _in_ray(env: Mapping[str, str]) -> bool:
    return "RAY_RAYLET_PID" in env or "RAY_JOB_ID" in env


def _from_torch_env(env: Mapping[str, str]) -> WorldInfo:
    if _in_ray(env):
        launcher = "ray"
    elif "ACCELERATE_MIXED_PRECISION" in env or "ACCELERATE_DYNAMO_BACKEND" in env:
        launcher = "accelerate"
    elif "TORCHELASTIC_RUN_ID" in env:
        launcher = "torchrun"
    elif "CROSS_RANK" in env or "LOCAL_SIZE" in env:
        launcher = "deepspeed"
    else:
        launcher = "env"
    world = _int(env, "WORLD_SIZE")
    local_rank = _int(env, "LOCAL_RANK", default=0)
    # torchrun/accelerate/Ray set LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE; a bare env:// launch
    # (e.g. Kubeflow: one process per pod) sets neither, and then this process is alone on its node.
    local_world = _int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=1)
    if world > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        raise ValueError(
            f"world_info_from_env: {launcher} launch with WORLD_SIZE={world} needs MASTER_ADDR and MASTER_PORT"
        )
    return WorldInfo(
        _int(env, "RANK"),
        local_rank,
        world,
        local_world,
        env.get("MASTER_ADDR") or "127.0.0.1",
        _int(env, "MASTER_PORT", default=0),
        launcher,
    )


def _from_mpi(env: Mapping[str, str]) -> WorldInfo:
    if "OMPI_COMM_WORLD_RANK" in env:
        rank = _int(env, "OMPI_COMM_WORLD_RANK")
        world = _int(env, "OMPI_COMM_WORLD_SIZE")
        local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", default=0)
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "LOCAL_SIZE", default=1)
    else:
        rank, world = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE", "WORLD_SIZE")
        local_rank = _int(env, "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK", default=0)
        local_world = _int(env, "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE", "LOCAL_SIZE", default=1)
    addr = env.get("MASTER_ADDR", "")
    if addr and "MASTER_PORT" not in env:
        raise ValueError("world_info_from_env: MPI launch with MASTER_ADDR but no MASTER_PORT")
    # without MASTER_ADDR, deepspeed's mpi4py discovery finds rank 0's host and uses its default port 29500
    return WorldInfo(rank, local_rank, world, local_world, addr, _int(env, "MASTER_PORT", default=29500), "mpi")


def _from_srun(env: Mapping[str, str]) -> WorldInfo:
    rank = _int(env, "SLURM_PROCID")
    world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    local_rank = _int(env, "SLURM_LOCALID", default=0)
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node:
        counts = parse_tasks_per_node(per_node)
        node = _int(env, "SLURM_NODEID", default=0)
        if node >= len(counts):
            raise ValueError(f"world_info_from_env: SLURM_NODEID={node} but tasks per node are {per_node!r}")
        local_world = counts[node]
    else:
        local_world = _int(env, "SLURM_NTASKS_PER_NODE", default=1)
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ValueError("world_info_from_env: srun step without SLURM_JOB_NODELIST/SLURM_NODELIST or MASTER_ADDR")
        addr = expand_hostlist(nodelist)[0]
    if "MASTER_PORT" in env:
        port = _int(env, "MASTER_PORT")
    else:
        # every task of the job derives the same port; different jobs sharing a node rarely collide
        port = _SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID", "SLURM_JOBID") % _SLURM_PORT_SPAN
    return WorldInfo(rank, local_rank, world, local_world, addr, port, "srun")


def _single(env: Mapping[str, str], launcher: str) -> WorldInfo:
    return WorldInfo(0, 0, 1, 1, env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", default=0), launcher)
