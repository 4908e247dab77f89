"""The process group and the few collectives the pipeline needs, each bounded (``train.collective_timeout_s``).

:func:`init_distributed` starts (or adopts) the group for the :class:`~pipeline.world.WorldInfo` that
:func:`~pipeline.world.world_info_from_env` detected (both re-exported here); a heartbeat in the rendezvous store
lets a rank whose collective fails name the peer that stopped. Extension builds (and their locks) live in
:mod:`pipeline.extensions`.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import sys
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from pipeline.extensions import _say, clear_stale_build_locks, deepspeed_ops_built
from pipeline.extensions import extension_build_root as extension_build_root
from pipeline.extensions import prebuild_deepspeed_ops as prebuild_deepspeed_ops
from pipeline.world import WorldInfo as WorldInfo
from pipeline.world import expand_hostlist as expand_hostlist
from pipeline.world import parse_tasks_per_node as parse_tasks_per_node
from pipeline.world import world_info_from_env as world_info_from_env

log = logging.getLogger(__name__)


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
    """Start the default process group: through DeepSpeed (with its comm layer) or torch's TCP rendezvous.

    torch wraps ``sys.excepthook`` at every group start (a ``[rank<r>]:`` prefix on each traceback line) and never
    unwraps it: :func:`cleanup` puts back the hook found here, so a process that runs many trainings (a sweep's
    worker, the fusion study) prints ``[rank0]:`` once, not once per run."""
    global _EXCEPTHOOK
    if _EXCEPTHOOK is None:
        _EXCEPTHOOK = sys.excepthook
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
_EXCEPTHOOK: Any = None  # sys.excepthook before the running group wrapped it (put back by cleanup)


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
    global _EXCEPTHOOK
    _HEARTBEAT.stop()
    if is_initialized():
        dist.destroy_process_group()
    if _EXCEPTHOOK is not None:
        sys.excepthook, _EXCEPTHOOK = _EXCEPTHOOK, None
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
