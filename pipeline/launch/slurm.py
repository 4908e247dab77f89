"""SLURM batch scripts: ``slurm`` (a launcher per node), ``srun`` (a task per GPU), ``shard-array``, ``ray-slurm``.

Each renderer returns the text of ``#!/bin/bash`` scripts for ``sbatch`` (templates in ``launch/templates/``;
see :mod:`pipeline.launch.spec` for the escaping rules). The per-node wrapper ``launch/templates/node.sh``
is not rendered: the scripts run it from the job's code snapshot, so it is the very text the tests exercise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import Config
from pipeline.launch.spec import (
    REPO,
    Artifact,
    LaunchError,
    LaunchSpec,
    Rendered,
    config_yaml,
    fill,
    job_config,
    job_name,
    load_template,
    plain_env,
    q,
    signal_lead_s,
)

_RAY_PORT = 6379


def render_slurm(cfg: Config, spec: LaunchSpec) -> Rendered:
    """``slurm`` (torchrun / deepspeed / accelerate per node) and ``srun`` (the ranks are srun's tasks)."""
    run_cfg = job_config(cfg)
    procs = spec.procs_per_node
    if spec.target == "srun":
        tasks_per_node, cpus, task_log = procs, cfg.launch.cpus_per_gpu, "rank%t.log"
        # no launcher: srun's tasks are the ranks (pipeline.dist reads SLURM_PROCID/LOCALID/STEP_NUM_TASKS), and
        # srun itself delivers the forwarded USR2 to each of them
        step = f"{q(cfg.launch.python)} -m jobs.train --config config.yaml"
        title = f"MANGO training, {spec.nodes} node(s) × {procs} task(s): one srun task per GPU, no torchrun"
        prepare = ""
    else:
        tasks_per_node, cpus, task_log = 1, cfg.launch.cpus_per_gpu * procs, "node%n.log"
        step, prepare = _node_step(cfg, spec)
        title = f"MANGO training, {spec.nodes} node(s) × {procs} rank(s): {spec.launcher} on each node"
    values = _common(cfg, run_cfg, spec, cpus) | {
        "title": title,
        "target": spec.target,
        "nodes": spec.nodes,
        "tasks_per_node": tasks_per_node,
        "signal_lead_s": signal_lead_s(cfg),
        "config_yaml": config_yaml(run_cfg),
        "port": _port(cfg),
        "prepare": prepare,
        "task_log": task_log,
        "step": step,
    }
    text = fill(load_template("slurm_train.sh"), values, "slurm_train.sh")
    return Rendered(
        [Artifact(f"{job_name(cfg)}.sbatch", text, "sbatch")],
        [f"logs: {_log_dir(run_cfg)}/<job name>-<job id>/ (batch log beside it)"],
    )


def _node_step(cfg: Config, spec: LaunchSpec) -> tuple[str, str]:
    """The srun step command (one task per node) and any batch-shell preparation it needs."""
    py, nodes, procs = q(cfg.launch.python), spec.nodes, spec.procs_per_node
    train = "-m jobs.train --config config.yaml"
    if spec.launcher == "torchrun":
        # c10d needs no node rank: the nodes agree on ranks through the store on $HEAD_NODE
        return (
            f"bash launch/templates/node.sh {py} -m torch.distributed.run --nnodes={nodes} "
            f'--nproc_per_node={procs} --rdzv_backend=c10d --rdzv_endpoint="$HEAD_NODE:$PORT" '
            f'--rdzv_id="$SLURM_JOB_ID" {train}'
        ), ""
    if spec.launcher == "deepspeed":
        # --no_ssh: each node runs its own launcher and needs its node rank, which exists only on that node:
        # $SLURM_NODEID sits in single quotes so it expands in srun's task, not here in the batch shell.
        prepare = f'printf "%s slots={procs}\\n" $NODES > "$JOB_LOG_DIR/hostfile"\n'
        return (
            'bash -c \'exec bash launch/templates/node.sh "$0" -m deepspeed.launcher.runner '
            '--node_rank="$SLURM_NODEID" "$@"\' '
            f'{py} --hostfile="$JOB_LOG_DIR/hostfile" --no_ssh --master_addr="$HEAD_NODE" '
            '--master_port="$PORT" --no_local_rank --module jobs.train --config config.yaml'
        ), prepare
    # accelerate as the multi-process launcher only (see README: its DeepSpeed plugin is not used)
    return (
        'bash -c \'exec bash launch/templates/node.sh "$0" -m accelerate.commands.launch '
        '--machine_rank="$SLURM_NODEID" "$@"\' '
        f"{py} --config_file=launch/accelerate/multi_node.yaml --num_machines={nodes} "
        f'--num_processes={nodes * procs} --main_process_ip="$HEAD_NODE" --main_process_port="$PORT" '
        f"{train}"
    ), ""


def render_shard_array(cfg: Config, spec: LaunchSpec) -> Rendered:
    """An array job of ``--tasks`` ``jobs.shard`` tasks, and the merge job that depends on it."""
    shard = parse_shard_args(spec.shard_args, spec.tasks)
    run_cfg = job_config(cfg)
    name = job_name(cfg, "-shard")
    array = fill(
        load_template("slurm_shard_array.sh"),
        {
            **_shard_common(cfg, run_cfg, spec),
            "title": f"Sharding {shard.source} into {shard.out} ({shard.split})",
            "job_name": name,
            "tasks": spec.tasks,
            "last_task": spec.tasks - 1,
            "shard_args": " ".join(q(a) for a in spec.shard_args),
        },
        "slurm_shard_array.sh",
    )
    merge = fill(
        load_template("slurm_shard_merge.sh"),
        {
            **_shard_common(cfg, run_cfg, spec),
            "title": f"Merge of {shard.out} split {shard.split}",
            "job_name": f"{name}-merge",
            "out": q(shard.out),
            "split": q(shard.split),
        },
        "slurm_shard_merge.sh",
    )
    return Rendered(
        [
            Artifact(f"{name}.sbatch", array, "sbatch"),
            Artifact(f"{name}-merge.sbatch", merge, "sbatch", after=f"{name}.sbatch"),
        ],
        [f"submit: sbatch {name}.sbatch, then sbatch --dependency=afterok:<its job id> {name}-merge.sbatch"],
    )


def render_ray_slurm(cfg: Config, spec: LaunchSpec) -> Rendered:
    """A Ray cluster over the allocation (head on the first node), then ``jobs.sweep`` as its driver."""
    space = _space(spec)
    run_cfg = job_config(cfg)
    cpus = cfg.launch.cpus_per_gpu * spec.procs_per_node
    workers = ""
    if spec.nodes > 1:
        n = spec.nodes - 1
        workers = (
            f'srun --nodes={n} --ntasks={n} --ntasks-per-node=1 --exclude="$HEAD_NODE" '
            '--output="$JOB_LOG_DIR/ray-worker-%n.log" --open-mode=append \\\n'
            f'    {q(cfg.launch.python)} -m ray.scripts.scripts start --block --address="$RAY_ADDRESS" '
            f'--num-cpus={cpus} --num-gpus={spec.gpus_per_node} &\nRAY_PIDS="$RAY_PIDS $!"\n'
        )
    values = _common(cfg, run_cfg, spec, cpus) | {
        "title": f"MANGO sweep on a {spec.nodes}-node Ray cluster",
        "nodes": spec.nodes,
        "config_yaml": config_yaml(run_cfg),
        "port": cfg.launch.rdzv_port or _RAY_PORT,
        "workers": workers,
        "python": q(cfg.launch.python),
        "gpus": spec.gpus_per_node,
        "space": q(space),
    }
    text = fill(load_template("slurm_ray.sh"), values, "slurm_ray.sh")
    return Rendered([Artifact(f"{job_name(cfg, '-sweep')}.sbatch", text, "sbatch")])


# -- pieces -----------------------------------------------------------------------------------------


def _common(cfg: Config, run_cfg: Config, spec: LaunchSpec, cpus: int) -> dict[str, object]:
    return {
        "config_source": spec.config_source,
        "job_name": job_name(cfg),
        "cpus_per_task": cpus,
        "sbatch_resources": _sbatch_resources(cfg, spec),
        "time": cfg.launch.time,
        "setup": cfg.launch.setup,
        "exports": _exports(cfg),
        "repo": q(REPO),
        "run_dir": q(run_cfg.run.dir),
        "log_dir": q(_log_dir(run_cfg)),
    }


def _shard_common(cfg: Config, run_cfg: Config, spec: LaunchSpec) -> dict[str, object]:
    return {
        "cpus_per_task": cfg.launch.cpus_per_gpu,
        "sbatch_resources": _sbatch_resources(cfg, spec, gpus=False),
        "time": cfg.launch.time,
        "setup": cfg.launch.setup,
        "exports": _exports(cfg),
        "repo": q(REPO),
        "log_dir": q(_log_dir(run_cfg)),
        "python": q(cfg.launch.python),
    }


def _sbatch_resources(cfg: Config, spec: LaunchSpec, gpus: bool = True) -> str:
    lines = []
    if gpus and spec.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
    for opt, value in (("partition", cfg.launch.partition), ("account", cfg.launch.account), ("qos", cfg.launch.qos)):
        if value:
            lines.append(f"#SBATCH --{opt}={value}")
    return "".join(line + "\n" for line in lines)


def _exports(cfg: Config) -> str:
    return "".join(f"export {k}={q(v)}\n" for k, v in plain_env(cfg))


def _log_dir(run_cfg: Config) -> str:
    """Absolute: SLURM opens --output before the script runs, relative to a directory we do not control.
    It also lands unquoted in ``#SBATCH --output=`` (sbatch does not parse shell quoting there, and ``%`` is a
    pattern), so a path with blanks, quotes or ``%`` is refused rather than silently mangled."""
    log_dir = run_cfg.launch.log_dir or f"{run_cfg.run.dir}/logs"
    if not Path(log_dir).is_absolute():
        log_dir = str(Path.cwd().resolve() / log_dir)
    if q(log_dir) != log_dir or "%" in log_dir:
        raise LaunchError(
            f"log directory {log_dir!r} (launch.log_dir, default <run.dir>/logs) must consist of "
            "letters, digits and ._/+=,@:- only: it goes into #SBATCH --output, where sbatch reads "
            "no shell quoting and '%' is a pattern; set launch.log_dir"
        )
    return log_dir


def log_dir_for(cfg: Config) -> str:
    """The directory ``--output`` points into; ``--submit`` creates it (SLURM does not)."""
    return _log_dir(job_config(cfg))


def _port(cfg: Config) -> str:
    # one port per job: two jobs sharing a head node do not collide (same rule as pipeline.dist for srun)
    return str(cfg.launch.rdzv_port) if cfg.launch.rdzv_port else "$(( 20000 + SLURM_JOB_ID % 40000 ))"


def _space(spec: LaunchSpec) -> str:
    if not spec.space:
        raise LaunchError(f"{spec.target} needs --space launch/sweeps/<name>.yaml (the search space for jobs.sweep)")
    path = Path(spec.space)
    if path.is_absolute() or not (REPO / path).is_file():
        raise LaunchError(
            f"--space {spec.space!r}: expected a file under the repository, e.g. "
            "launch/sweeps/<name>.yaml (the job runs it from the repo or the image)"
        )
    return spec.space


class ShardRequest(argparse.Namespace):
    source: str
    out: str
    split: str


def parse_shard_args(args: tuple[str, ...], tasks: int) -> ShardRequest:
    """Check the ``jobs.shard`` arguments an array needs: a source, ``--out`` and ``--split`` (merge commits one
    split), and no ``--task-index``/``--num-tasks`` (the array sets them)."""
    if not args:
        raise LaunchError(
            "sharding needs jobs.shard arguments after `--`, e.g. "
            "`-- sunrgbd --src /data/SUNRGBD --out shards/sun --split train`"
        )
    if tasks < 1:
        raise LaunchError("sharding needs --tasks N (the number of array tasks / indexed completions)")
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("source")
    p.add_argument("--out")
    p.add_argument("--split")
    p.add_argument("--task-index")
    p.add_argument("--num-tasks")
    ns, _ = p.parse_known_args(list(args), namespace=ShardRequest())
    if ns.source.startswith("-") or ns.source == "merge":
        raise LaunchError(f"the jobs.shard arguments must start with a source name; got {ns.source!r}")
    if ns.task_index is not None or ns.num_tasks is not None:
        raise LaunchError("do not pass --task-index/--num-tasks after `--`: each array task sets its own")
    if not ns.out or not ns.split:
        raise LaunchError("the jobs.shard arguments need --out and --split (the merge commits one split)")
    return ns
