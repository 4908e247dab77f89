"""world_info_from_env for every launcher (each launcher's real variables), hostlists, and real gloo ranks."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

from pipeline import dist
from pipeline.world import WorldInfo, expand_hostlist, parse_tasks_per_node, world_info_from_env

_LAUNCHER_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "NODE_RANK",
    "CROSS_RANK",
    "CROSS_SIZE",
    "LOCAL_SIZE",
)
_LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "MPI_LOCAL", "MV2_", "TORCHELASTIC_", "ACCELERATE_", "RAY_")


@pytest.fixture
def env(monkeypatch):
    """A clean slate of launcher variables; returns a setter for the launcher under test."""
    for key in list(os.environ):
        if key in _LAUNCHER_VARS or key.startswith(_LAUNCHER_PREFIXES):
            monkeypatch.delenv(key)

    def set_env(**values: object) -> None:
        for k, v in values.items():
            monkeypatch.setenv(k, str(v))

    return set_env


TORCHRUN = dict(
    RANK=5,
    LOCAL_RANK=1,
    WORLD_SIZE=8,
    LOCAL_WORLD_SIZE=4,
    GROUP_RANK=1,
    ROLE_RANK=5,
    MASTER_ADDR="node07",
    MASTER_PORT=29400,
    TORCHELASTIC_RUN_ID="job42",
    TORCHELASTIC_RESTART_COUNT=0,
)
SRUN = dict(
    SLURM_JOB_ID=123456,
    SLURM_STEP_ID=0,
    SLURM_STEPID=0,
    SLURM_PROCID=5,
    SLURM_LOCALID=1,
    SLURM_NODEID=1,
    SLURM_NTASKS=8,
    SLURM_STEP_NUM_TASKS=8,
    SLURM_TASKS_PER_NODE="4(x2)",
    SLURM_STEP_TASKS_PER_NODE="4(x2)",
    SLURM_JOB_NODELIST="gpu[003-004]",
    SLURM_NODELIST="gpu[003-004]",
    SLURM_STEP_NODELIST="gpu[003-004]",
)


def test_plain_python_is_a_world_of_one(env):
    assert world_info_from_env() == WorldInfo(0, 0, 1, 1, "127.0.0.1", 0, "python")


def test_torchrun(env):
    env(**TORCHRUN)
    assert world_info_from_env() == WorldInfo(5, 1, 8, 4, "node07", 29400, "torchrun")


def test_torchrun_inside_an_srun_step_uses_torchrun_ranks(env):
    # one srun task per node runs torchrun; SLURM_PROCID is then the node index, not the rank
    env(**{**SRUN, "SLURM_PROCID": 1, "SLURM_LOCALID": 0, "SLURM_STEP_NUM_TASKS": 2, "SLURM_NTASKS": 2}, **TORCHRUN)
    assert world_info_from_env() == WorldInfo(5, 1, 8, 4, "node07", 29400, "torchrun")


def test_srun_one_task_per_gpu(env):
    env(**SRUN)
    assert world_info_from_env() == WorldInfo(5, 1, 8, 4, "gpu003", 20000 + 123456 % 40000, "srun")


def test_srun_uneven_tasks_per_node_and_explicit_master(env):
    env(
        **{
            **SRUN,
            "SLURM_STEP_NUM_TASKS": 5,
            "SLURM_STEP_TASKS_PER_NODE": "3,2",
            "SLURM_PROCID": 4,
            "SLURM_STEP_NODELIST": "a1,b[2-3]",
        },
        MASTER_ADDR="10.0.0.9",
        MASTER_PORT=12345,
    )
    assert world_info_from_env() == WorldInfo(4, 1, 5, 2, "10.0.0.9", 12345, "srun")
    os.environ.pop("MASTER_ADDR")
    assert world_info_from_env().master_addr == "a1"


def test_srun_with_only_the_job_level_variables(env):
    env(
        SLURM_JOB_ID=77,
        SLURM_STEP_ID=0,
        SLURM_PROCID=2,
        SLURM_LOCALID=0,
        SLURM_NODEID=2,
        SLURM_NTASKS=3,
        SLURM_NTASKS_PER_NODE=1,
        SLURM_NODELIST="cn[09-11]",
    )
    assert world_info_from_env() == WorldInfo(2, 0, 3, 1, "cn09", 20077, "srun")


def test_python_in_an_sbatch_script_is_not_a_multi_rank_run(env):
    # the batch step has the allocation's SLURM_NTASKS but no step id: treating it as 8 ranks would hang
    env(**{**{k: v for k, v in SRUN.items() if "STEP" not in k}, "SLURM_PROCID": 0})
    info = world_info_from_env()
    assert (info.rank, info.world_size, info.launcher) == (0, 1, "python")


def test_deepspeed_launcher(env):
    env(
        RANK=3,
        LOCAL_RANK=3,
        WORLD_SIZE=16,
        MASTER_ADDR="10.1.2.3",
        MASTER_PORT=29500,
        CROSS_RANK=0,
        CROSS_SIZE=2,
        LOCAL_SIZE=8,
    )
    assert world_info_from_env() == WorldInfo(3, 3, 16, 8, "10.1.2.3", 29500, "deepspeed")


def test_deepspeed_openmpi_launcher(env):
    env(
        OMPI_COMM_WORLD_RANK=9,
        OMPI_COMM_WORLD_SIZE=16,
        OMPI_COMM_WORLD_LOCAL_RANK=1,
        OMPI_COMM_WORLD_LOCAL_SIZE=8,
        SLURM_JOB_ID=5,
        SLURM_PROCID=0,
        SLURM_NTASKS=16,
    )  # mpirun inside an allocation
    info = world_info_from_env()
    assert info == WorldInfo(9, 1, 16, 8, "", 29500, "mpi")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        dist.init_distributed(info, backend="gloo")


def test_mpich_launcher_with_exported_master(env):
    env(PMI_RANK=2, PMI_SIZE=4, MPI_LOCALRANKID=0, MPI_LOCALNRANKS=1, MASTER_ADDR="h0", MASTER_PORT=29501)
    assert world_info_from_env() == WorldInfo(2, 0, 4, 1, "h0", 29501, "mpi")


def test_accelerate_launch(env):
    env(**TORCHRUN, ACCELERATE_MIXED_PRECISION="bf16", ACCELERATE_DYNAMO_BACKEND="NO", ACCELERATE_USE_CPU="False")
    assert world_info_from_env().launcher == "accelerate"
    assert world_info_from_env().rank == 5


def test_ray_train_worker(env):
    env(
        RANK=1,
        LOCAL_RANK=1,
        WORLD_SIZE=2,
        LOCAL_WORLD_SIZE=2,
        NODE_RANK=0,
        ACCELERATE_TORCH_DEVICE="cpu",
        MASTER_ADDR="172.17.0.2",
        MASTER_PORT=41234,
        RAY_RAYLET_PID=4242,
        RAY_JOB_ID="01000000",
    )
    assert world_info_from_env() == WorldInfo(1, 1, 2, 2, "172.17.0.2", 41234, "ray")


def test_ray_tune_trial_inside_srun_is_a_world_of_one(env):
    env(**SRUN, RAY_RAYLET_PID=4242, RAY_JOB_ID="02000000")
    info = world_info_from_env()
    assert (info.rank, info.world_size, info.launcher) == (0, 1, "ray")


@pytest.mark.parametrize(
    "values, match",
    [
        (dict(RANK=0, WORLD_SIZE=2), "MASTER_ADDR and MASTER_PORT"),
        (dict(RANK="x", WORLD_SIZE=2, MASTER_ADDR="a", MASTER_PORT=1), "RANK='x'"),
        (dict(RANK=4, WORLD_SIZE=2, MASTER_ADDR="a", MASTER_PORT=1), "outside world size"),
        (dict(SLURM_STEP_ID=0, SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_JOB_ID=1), "NODELIST"),
        (dict(SLURM_STEP_ID=0, SLURM_PROCID=0, SLURM_NTASKS=2, SLURM_NODELIST="n[1-"), "unbalanced"),
    ],
)
def test_bad_launcher_environments_are_clear_errors(env, values, match):
    env(**values)
    with pytest.raises(ValueError, match=match):
        world_info_from_env()


@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("node[001-004,007]", ["node001", "node002", "node003", "node004", "node007"]),
        ("a1,b[2-3]", ["a1", "b2", "b3"]),
        ("gpu-a[9-11]-x", ["gpu-a9-x", "gpu-a10-x", "gpu-a11-x"]),
        ("r[1-2]n[08-09]", ["r1n08", "r1n09", "r2n08", "r2n09"]),
        ("single", ["single"]),
        ("x[3],y", ["x3", "y"]),
    ],
)
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["", "node[1-", "node]1[", "node[3-1]", "node[a]", "a,,b", "n[[1]]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        expand_hostlist(bad)


def test_parse_tasks_per_node():
    assert parse_tasks_per_node("4(x2),3") == [4, 4, 3]
    assert parse_tasks_per_node("8") == [8]
    with pytest.raises(ValueError):
        parse_tasks_per_node("4x2")


def test_cuda_device_index_follows_visible_devices():
    info = WorldInfo(5, 3, 8, 4, "n", 1, "srun")
    assert dist.cuda_device_index(info, visible=4) == 3  # all of the node's GPUs visible
    assert dist.cuda_device_index(info, visible=1) == 0  # --gpus-per-task=1
    with pytest.raises(RuntimeError, match="only 2 CUDA device"):
        dist.cuda_device_index(info, visible=2)


def test_helpers_without_a_process_group(env):
    assert not dist.is_initialized()
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    assert dist.all_reduce_sum(torch.ones(2)).tolist() == [1.0, 1.0]
    assert dist.is_rank0() and dist.get_world_size() == 1
    dist.barrier()
    dist.cleanup()


def test_single_process_group_picks_a_free_port(env):
    hook = sys.excepthook
    for _ in range(2):  # a second group in the same process (a sweep worker's next trial)
        info = dist.init_distributed(world_info_from_env(), backend="gloo", timeout_s=30)
        try:
            assert dist.is_initialized() and info.master_port > 0
            assert dist.init_distributed(info) == info  # idempotent
            assert dist.broadcast_object("run-id") == "run-id"
            assert sys.excepthook is not hook  # torch's "[rank0]:" traceback prefix while the group runs
        finally:
            dist.cleanup()
        assert not dist.is_initialized()
        assert sys.excepthook is hook  # put back: prefixes do not pile up run after run


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    # what torchrun would export for this rank
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_RUN_ID="test",
    )
    info = dist.init_distributed(dist.world_info_from_env(), timeout_s=60)
    dist.init_distributed(info)  # a second call keeps the running group
    run_id = dist.broadcast_object("mlflow-run-123" if dist.is_rank0() else None)
    total = dist.all_reduce_sum(torch.tensor([rank + 1.0, 10.0 * rank]))
    dist.barrier()
    result = {"info": info.__dict__, "run_id": run_id, "total": total.tolist(), "rank0": dist.is_rank0()}
    dist.cleanup()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def test_two_gloo_ranks_broadcast_and_all_reduce(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(port, str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, res in enumerate(results):
        assert res["info"] == {
            "rank": rank,
            "local_rank": rank,
            "world_size": 2,
            "local_world_size": 2,
            "master_addr": "127.0.0.1",
            "master_port": port,
            "launcher": "torchrun",
        }
        assert res["run_id"] == "mlflow-run-123"
        assert res["total"] == [3.0, 10.0]
        assert res["rank0"] == (rank == 0)
