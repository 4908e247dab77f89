"""One rank/world detector for every launcher, and the few collectives the pipeline needs.

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

import datetime
import glob
import itertools
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 20000, 40000
log = logging.getLogger(__name__)


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


def init_distributed(
    info: WorldInfo | None = None,
    backend: str | None = None,
    timeout_s: float = 1800.0,
    *,
    use_deepspeed: bool = False,
) -> WorldInfo:
    """Start the default process group (idempotent) and return the ``WorldInfo`` it was started with.

    ``backend`` None = ``nccl`` when CUDA is available (the device :func:`cuda_device_index` is selected first),
    else ``gloo``. Exports ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``LOCAL_WORLD_SIZE``/``MASTER_ADDR``/
    ``MASTER_PORT`` so libraries that read them (DeepSpeed) agree with ``info``. With ``use_deepspeed`` the
    group is started by ``deepspeed.init_distributed`` (which also sets up DeepSpeed's comm layer; its first
    call JIT-compiles a CPU op). A group that is already up (e.g. started by Ray Train) is kept after
    checking that its rank and size match ``info``. ``timeout_s`` bounds every collective.
    """
    info = world_info_from_env() if info is None else info
    if timeout_s <= 0:
        raise ValueError(f"init_distributed: timeout_s must be > 0; got {timeout_s}")
    if dist.is_available() and dist.is_initialized():
        _adopt_running_group(info, use_deepspeed)
        return info
    backend = _choose_backend(info, backend)
    if not info.master_addr and not use_deepspeed:
        raise RuntimeError(
            f"init_distributed: {info.launcher} launch without MASTER_ADDR: export the rank-0 host "
            "(e.g. `mpirun -x MASTER_ADDR=<host> -x MASTER_PORT=<port>`) or pass use_deepspeed=True for "
            "deepspeed's mpi4py discovery"
        )
    if info.local_rank == 0:
        _prepare_extension_builds(use_deepspeed)
    port = info.master_port or _free_port()
    if info.master_addr:
        _export_world_env(info, port)
    timeout = _bound_collective_timeouts(timeout_s, backend)
    _start_group(info, backend, port, timeout, use_deepspeed)
    if info.world_size > 1:
        _HEARTBEAT.start(info.rank, info.world_size)
    return WorldInfo(
        info.rank,
        info.local_rank,
        info.world_size,
        info.local_world_size,
        info.master_addr or os.environ.get("MASTER_ADDR", ""),
        port,
        info.launcher,
    )


def _adopt_running_group(info: WorldInfo, use_deepspeed: bool) -> None:
    """Keep a group that is already up (e.g. started by Ray Train) once its rank and size match ``info``."""
    if (dist.get_rank(), dist.get_world_size()) != (info.rank, info.world_size):
        raise RuntimeError(
            f"init_distributed: a process group is already running as rank {dist.get_rank()} of "
            f"{dist.get_world_size()}, but the environment says rank {info.rank} of {info.world_size}"
        )
    if use_deepspeed:
        import deepspeed  # heavy: optional DeepSpeed dependency; adopts the running torch group

        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)


def _choose_backend(info: WorldInfo, backend: str | None) -> str:
    """``backend``, or ``nccl``/``gloo`` by CUDA; for ``nccl`` selects this rank's CUDA device."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("init_distributed: backend 'nccl' needs CUDA, which is not available here")
        torch.cuda.set_device(cuda_device_index(info))
    return backend


def _prepare_extension_builds(use_deepspeed: bool) -> None:
    """Once per node: clear stale build locks, and say so when DeepSpeed's CPU comm op is about to be built."""
    clear_stale_build_locks()  # a build killed half-way would make init_distributed wait forever
    if use_deepspeed and not deepspeed_ops_built():
        _say(
            "building DeepSpeed's CPU comm op once (about 1-2 minutes on a small machine; `make` builds it "
            "ahead of time)"
        )


def _export_world_env(info: WorldInfo, port: int) -> None:
    """Export the rank/world variables so libraries that read them (DeepSpeed) agree with ``info``."""
    os.environ.update(
        {
            "RANK": str(info.rank),
            "LOCAL_RANK": str(info.local_rank),
            "WORLD_SIZE": str(info.world_size),
            "LOCAL_WORLD_SIZE": str(info.local_world_size),
            "MASTER_ADDR": info.master_addr,
            "MASTER_PORT": str(port),
        }
    )


def _bound_collective_timeouts(timeout_s: float, backend: str) -> datetime.timedelta:
    """Record ``timeout_s`` and make it torch's default group timeout; returns it as a ``timedelta``.

    Groups made later with new_group(timeout=None) — DeepSpeed's data-parallel clones, whose all-reduces
    carry the gradients — take torch's module default (30 min), not the default group's timeout: make the
    bound apply to them too, or a hung peer would stall the gradient all-reduce for half an hour.
    """
    global _TIMEOUT_S
    _TIMEOUT_S = timeout_s
    timeout = datetime.timedelta(seconds=timeout_s)
    distributed_c10d.default_pg_timeout = timeout
    if backend == "nccl":
        distributed_c10d.default_pg_nccl_timeout = timeout
    return timeout


def _start_group(info: WorldInfo, backend: str, port: int, timeout: datetime.timedelta, use_deepspeed: bool) -> None:
    """Start the default process group: through DeepSpeed (with its comm layer) or torch's TCP rendezvous."""
    if use_deepspeed:
        import deepspeed  # heavy: optional DeepSpeed dependency, only for use_deepspeed

        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=not info.master_addr,
            timeout=timeout,
            distributed_port=port,
        )
    else:
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{_host_for_url(info.master_addr)}:{port}",
            rank=info.rank,
            world_size=info.world_size,
            timeout=timeout,
        )


# -- never a silent hang ----------------------------------------------------------------------------

_TIMEOUT_S = 0.0  # the bound the running group was started with (train.collective_timeout_s)


def extension_build_root() -> str:
    """torch's JIT extension cache (``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``)."""
    from torch.utils.cpp_extension import get_default_build_root  # heavy: pulls in setuptools (~0.15 s)

    return os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()


def _lock_holders(path: str) -> list[int] | None:
    """PIDs of local processes with ``path`` open (torch's build lock keeps its fd open while building);
    None where /proc cannot tell."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    real, holders = os.path.realpath(path), []
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        try:
            for fd in os.listdir(fd_dir):
                if os.readlink(os.path.join(fd_dir, fd)) == real:
                    holders.append(int(fd_dir.split("/")[2]))
                    break
        except OSError:  # gone, or not ours to look at
            continue
    return holders


def clear_stale_build_locks(root: str | None = None) -> list[str]:
    """Report and remove torch extension-build locks (``<root>/*/<op>/lock``) that no live process holds
    (a build killed half-way leaves one, and every later build waits on it forever); report, and leave, a
    lock a live build holds. Only processes on this host are seen: a shared cache directory built from
    several hosts at once is not supported. Returns the removed paths."""
    root = root or extension_build_root()
    removed = []
    for lock in sorted(glob.glob(os.path.join(root, "*", "*", "lock")) + glob.glob(os.path.join(root, "*", "lock"))):
        try:
            before = os.stat(lock)
        except OSError:
            continue
        holders = _lock_holders(lock)
        if holders is None:
            continue
        if holders:
            _say(f"extension build lock {lock} is held by pid {holders[0]} (a build in progress); waiting for it")
            continue
        try:
            after = os.stat(lock)
            if (after.st_ino, after.st_mtime_ns) != (before.st_ino, before.st_mtime_ns):
                continue  # replaced meanwhile by a live build
            os.unlink(lock)
        except OSError:
            continue
        removed.append(lock)
        age = time.time() - before.st_mtime
        _say(
            f"removed a stale extension build lock {lock} ({age:.0f}s old, no live process holds it: a build "
            "was killed half-way); the op is rebuilt"
        )
    return removed


def _say(msg: str) -> None:
    """One warning line: through logging when it is configured, else straight to stderr."""
    if logging.getLogger().handlers:
        log.warning(msg)
    else:
        print(msg, file=sys.stderr, flush=True)


def deepspeed_ops_built(root: str | None = None) -> bool:
    """Whether DeepSpeed's CPU comm op (JIT-built by ``deepspeed.init_distributed``) is in the extension cache."""
    root = root or extension_build_root()
    return bool(glob.glob(os.path.join(root, "*", "deepspeed_shm_comm*", "*.so")))


def prebuild_deepspeed_ops() -> None:
    """Build DeepSpeed's CPU comm op now, with a progress line (``make`` calls this once at set-up)."""
    clear_stale_build_locks()
    if deepspeed_ops_built():
        print("DeepSpeed's CPU comm op: already built", flush=True)
        return
    from deepspeed.accelerator import get_accelerator  # heavy: optional DeepSpeed dependency

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        print("DeepSpeed's CPU comm op: not used on this accelerator", flush=True)
        return
    print("building DeepSpeed's CPU comm op (once, about 1-2 minutes) ...", flush=True)
    start = time.monotonic()
    builder.load()
    print(f"built DeepSpeed's CPU comm op in {time.monotonic() - start:.0f}s", flush=True)


class _Heartbeat:
    """Each rank stamps ``mango/hb/<rank>`` in the rendezvous store every ``interval`` seconds, so a rank
    whose collective fails can name the peer that stopped (:func:`lost_ranks`)."""

    interval = 1.0

    def __init__(self) -> None:
        self.rank, self.world = 0, 1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _store(self):
        return distributed_c10d._get_default_store()

    def start(self, rank: int, world: int) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self.rank, self.world = rank, world
        self._stop.clear()
        try:
            store = self._store()
        except Exception:  # noqa: BLE001 - no default store (a group started elsewhere): no heartbeats
            return

        def beat() -> None:
            while not self._stop.is_set():
                try:
                    store.set(f"mango/hb/{rank}", repr(time.time()))
                except Exception:  # noqa: BLE001 - any store failure means: no heartbeat
                    return  # the store is gone (its host died): lost_ranks says so
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=beat, name="mango-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval)
        self._thread = None

    def lost(self, stale_s: float) -> tuple[list[int], str]:
        """(ranks whose heartbeat is older than ``stale_s``, a note); all ranks unknown when the store is gone."""
        try:
            store = self._store()
            keys = [f"mango/hb/{r}" for r in range(self.world)]
            now, lost = time.time(), []
            for r, key in enumerate(keys):
                if r == self.rank:
                    continue
                if not store.check([key]) or now - float(store.get(key).decode()) > stale_s:
                    lost.append(r)
            return lost, ""
        except Exception:  # noqa: BLE001 - any store failure means: no heartbeat
            return [], "the rendezvous store is unreachable (its host, usually rank 0 or the launcher, is gone)"


_HEARTBEAT = _Heartbeat()


def lost_ranks(stale_s: float | None = None) -> tuple[list[int], str]:
    """Peers that stopped beating (see :class:`_Heartbeat`); waits a few intervals first so that a peer
    that died a moment ago is told apart from a live one."""
    stale = stale_s if stale_s is not None else 4 * _HEARTBEAT.interval
    time.sleep(stale + _HEARTBEAT.interval)
    return _HEARTBEAT.lost(stale)


# what gloo / NCCL / the c10d store raise when a peer died or hung (RuntimeError and its DistError subclasses)
_COLLECTIVE_FAILURE = re.compile(
    r"gloo|NCCL|ProcessGroup|c10d|DistBackendError|DistNetworkError|DistStoreError|"
    r"Connection closed by peer|Connection reset by peer|Timed out waiting \d+ms"
)


def describe_rendezvous_failure(exc: BaseException) -> str | None:
    """One line for a process group that never formed (a rank that did not join within the bound), else None."""
    text = f"{type(exc).__name__}: {exc}"
    if is_initialized() or not re.search(
        r"clients joined|DistStoreError|Timed out after|Socket Timeout|"
        r"DistNetworkError",
        text,
    ):
        return None
    first = " ".join(str(exc).split())[:200]
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    return (
        f"rank {os.environ.get('RANK', '?')}: the process group did not form at {where} within "
        f"train.collective_timeout_s={_TIMEOUT_S or float('nan'):g} (a rank that never started, or a wrong "
        f"MASTER_ADDR/MASTER_PORT?) ({first})"
    )


def describe_collective_failure(exc: BaseException) -> str | None:
    """One line for a collective that failed because a peer was lost or hung (else None): which rank is
    lost, and the bound (``train.collective_timeout_s``) that ended the wait."""
    text = f"{type(exc).__name__}: {exc}"
    if (
        not isinstance(exc, RuntimeError)
        or not is_initialized()
        or get_world_size() < 2
        or not _COLLECTIVE_FAILURE.search(text)
    ):
        return None
    rank = get_rank()
    _HEARTBEAT.stop()
    lost, note = lost_ranks()
    who = (
        f"lost rank(s) {', '.join(map(str, lost))} (no heartbeat)"
        if lost
        else (note or "no peer stopped beating: a hung collective")
    )
    first = " ".join(str(exc).split())[:160]
    return (
        f"rank {rank}: a collective failed or timed out — {who}; train.collective_timeout_s={_TIMEOUT_S:g} bounds "
        f"every collective ({first})"
    )


def cuda_device_index(info: WorldInfo, visible: int | None = None) -> int:
    """The CUDA device this rank drives, among the ``visible`` ones (default ``torch.cuda.device_count()``).

    ``local_rank`` when the node's devices are all visible (torchrun, ``srun --gpus-per-node``); 0 when the
    launcher gave each task exactly one (``srun --gpus-per-task=1`` sets CUDA_VISIBLE_DEVICES per task, while
    SLURM_LOCALID still counts 0..3).
    """
    visible = torch.cuda.device_count() if visible is None else visible
    if info.local_rank < visible:
        return info.local_rank
    if visible == 1:
        return 0
    raise RuntimeError(
        f"cuda_device_index: local rank {info.local_rank} but only {visible} CUDA device(s) are visible "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})"
    )


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Rank in the running group, else the rank the environment announces (0 for a plain run)."""
    return dist.get_rank() if is_initialized() else world_info_from_env().rank


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else world_info_from_env().world_size


def is_rank0() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``src``'s (picklable) ``obj`` on every rank; returns ``obj`` unchanged without a process group."""
    if not is_initialized():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it (unchanged without a process group)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM, "all_reduce_sum")


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise max of ``tensor`` over ranks, in place (unchanged without a process group)."""
    return _all_reduce(tensor, dist.ReduceOp.MAX, "all_reduce_max")


def _all_reduce(tensor: torch.Tensor, op, name: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor; got {type(tensor).__name__}")
    if not is_initialized():
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        # NCCL reduces CUDA tensors only; small host-side flags and sums make the round trip
        on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_device, op=op)
        tensor.copy_(on_device.cpu())
    else:
        dist.all_reduce(tensor, op=op)
    return tensor


def cleanup() -> None:
    """Destroy the default process group if one is running (safe to call twice).

    DeepSpeed caches groups cloned from the default one (``deepspeed.utils.groups``); they die with it, so the
    cache is emptied too, or the next group started in this process (a second in-process run) would be handed
    the dead clones ("Group ... is not registered").
    """
    _HEARTBEAT.stop()
    if is_initialized():
        dist.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:  # the group caches of the pinned DeepSpeed (0.19): dicts of groups, or one group
        for name in _DEEPSPEED_GROUP_CACHES:
            value = getattr(groups, name, None)
            if isinstance(value, dict):
                value.clear()
            elif value is not None:
                setattr(groups, name, None)


_DEEPSPEED_GROUP_CACHES = (
    "_EXPERT_PARALLEL_GROUP",
    "_EXPERT_PARALLEL_GROUP_RANKS",
    "_EXPERT_DATA_PARALLEL_GROUP",
    "_EXPERT_DATA_PARALLEL_GROUP_RANKS",
    "_WORLD_GROUP",
    "_ZERO_PARAM_INTRA_PARALLEL_GROUP",
    "_ALL_TO_ALL_GROUP",
    "_TENSOR_MODEL_PARALLEL_GROUP",
    "_MODEL_PARALLEL_GROUP",
    "_DATA_PARALLEL_GROUP",
)


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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
