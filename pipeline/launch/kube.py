"""Kubernetes manifests: a Kubeflow ``PyTorchJob`` for training, an indexed ``Job`` for sharding, a KubeRay ``RayJob``.

Built as Python data and dumped with ``yaml.safe_dump_all`` (no text templating, so no YAML escaping bugs).
Shared by every pod: the image ``launch.image:launch.tag`` (built from the repo's ``Dockerfile``, code in
``/opt/mango``), credentials only through ``envFrom: secretRef`` (``launch.env_from``: ``AWS_*``,
``MLFLOW_TRACKING_*``), the resolved config from a ConfigMap mounted read-only at ``/etc/mango``, a
memory-backed ``/dev/shm`` (NCCL and DataLoader workers need more than the container default of 64 MiB), and
the ``launch.pvc`` ReadWriteMany claim at ``launch.pvc_mount`` for run directories (checkpoint shards of every
rank must land in one place); without a claim, checkpoints go to ``checkpoint.remote`` on S3.

Preemption: the kubelet sends SIGTERM to PID 1 (``launch/templates/pod.sh``), which forwards it to the pod's
ranks; every rank of the job stops after the same step, saves and exits 143 (also in the pods that were not
signalled), pod.sh exits 143, and ``restartPolicy: ExitCode`` restarts pods whose exit code is ≥ 128
(retryable) but not 0 (success) or 1–127 (permanent errors). The restarted pods resume from ``latest``.
``terminationGracePeriodSeconds`` = ``checkpoint.grace_s`` (after which the ranks exit on their own) + 30 s.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from pipeline.config import Config
from pipeline.launch.slurm import _space, parse_shard_args
from pipeline.launch.spec import (
    K8S_GRACE_MARGIN_S,
    Artifact,
    LaunchError,
    LaunchSpec,
    Rendered,
    config_yaml,
    job_config,
    job_name,
    plain_env,
)

WORKDIR = "/opt/mango"  # the Dockerfile's WORKDIR
CONFIG_DIR = "/etc/mango"


def render_k8s(cfg: Config, spec: LaunchSpec) -> Rendered:
    """A ConfigMap + PyTorchJob, or with ``jobs.shard`` arguments an indexed Job + its merge Job."""
    if spec.shard_args:
        return _render_shard(cfg, spec)
    run_cfg = _pod_config(cfg)
    name = job_name(cfg)
    procs = spec.procs_per_node
    # pod.sh starts the pod's ranks itself from the operator's PET_* variables: torchrun would report ranks that
    # exited 143 as 1, a permanent error for the ExitCode policy (see launch/templates/pod.sh)
    command = ["bash", "launch/templates/pod.sh", "python", "-m", "jobs.train", "--config", f"{CONFIG_DIR}/config.yaml"]
    pod = _pod_template(cfg, spec, "pytorch", command, gpus=spec.gpus_per_node, config_map=f"{name}-config")
    replicas = {"Master": {"replicas": 1, "restartPolicy": "ExitCode", "template": pod}}
    if spec.nodes > 1:
        replicas["Worker"] = {"replicas": spec.nodes - 1, "restartPolicy": "ExitCode", "template": pod}
    job = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _meta(cfg, name),
        "spec": {
            "nprocPerNode": str(procs),
            "runPolicy": {"backoffLimit": cfg.launch.max_restarts, "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": replicas,
        },
    }
    docs = [_config_map(cfg, f"{name}-config", run_cfg), job]
    return Rendered(
        [Artifact(f"{name}.yaml", _dump(docs), "kubectl", namespace=cfg.launch.namespace)],
        [f"logs: kubectl -n {cfg.launch.namespace} logs -f {name}-master-0"],
    )


def render_kuberay(cfg: Config, spec: LaunchSpec) -> Rendered:
    """A RayJob: a Ray cluster (head + ``nodes`` GPU workers) that runs ``jobs.sweep`` and shuts down after."""
    space = _space(spec)
    run_cfg = _pod_config(cfg)
    name = job_name(cfg, "-sweep")
    cm = f"{name}-config"
    head = _pod_template(cfg, spec, "ray-head", None, gpus=0, config_map=cm)
    head["spec"]["containers"][0]["ports"] = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    worker = _pod_template(cfg, spec, "ray-worker", None, gpus=spec.gpus_per_node, config_map=cm)
    job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _meta(cfg, name),
        "spec": {
            "entrypoint": f"python -m jobs.sweep --config {CONFIG_DIR}/config.yaml --space {space}",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "rayClusterSpec": {
                "rayVersion": "2.60.0",
                "headGroupSpec": {"rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"}, "template": head},
                "workerGroupSpecs": [
                    {
                        "groupName": "gpu" if spec.gpus_per_node else "cpu",
                        "replicas": spec.nodes,
                        "minReplicas": spec.nodes,
                        "maxReplicas": spec.nodes,
                        "rayStartParams": {"num-gpus": str(spec.gpus_per_node)},
                        "template": worker,
                    }
                ],
            },
        },
    }
    docs = [_config_map(cfg, cm, run_cfg), job]
    return Rendered([Artifact(f"{name}.yaml", _dump(docs), "kubectl", namespace=cfg.launch.namespace)])


def _render_shard(cfg: Config, spec: LaunchSpec) -> Rendered:
    shard = parse_shard_args(spec.shard_args, spec.tasks)
    name = job_name(cfg, "-shard")
    args = list(spec.shard_args)
    # JOB_COMPLETION_INDEX (set per pod by an Indexed Job) is read by jobs.shard as the task index
    work = _batch_job(cfg, spec, name, ["python", "-m", "jobs.shard", *args, "--num-tasks", str(spec.tasks), "--quiet"])
    work["spec"].update(
        {"completionMode": "Indexed", "completions": spec.tasks, "parallelism": min(spec.tasks, spec.nodes)}
    )
    merge = _batch_job(
        cfg, spec, f"{name}-merge", ["python", "-m", "jobs.shard", "merge", shard.out, "--split", shard.split]
    )
    ns = cfg.launch.namespace
    return Rendered(
        [
            Artifact(f"{name}.yaml", _dump([work]), "kubectl", k8s_job=name, namespace=ns),
            Artifact(f"{name}-merge.yaml", _dump([merge]), "kubectl", after=f"{name}.yaml", namespace=ns),
        ],
        [f"after `kubectl -n {ns} wait --for=condition=complete job/{name}`, apply {name}-merge.yaml"],
    )


# -- pieces -----------------------------------------------------------------------------------------


def _pod_config(cfg: Config) -> Config:
    """The config the pods run: run.dir on the shared volume (or S3 checkpoints), shards pods can read."""
    if "://" not in cfg.data.shards and not cfg.data.shards.startswith("/"):
        raise LaunchError(
            f"data.shards={cfg.data.shards!r} is a relative local path, which pods cannot see: use "
            f"s3://... or an absolute path on the volume (launch.pvc mounted at {cfg.launch.pvc_mount})"
        )
    if not cfg.launch.pvc and not cfg.checkpoint.remote:
        raise LaunchError(
            "checkpoints would die with the pod: set launch.pvc (a ReadWriteMany claim) or "
            "checkpoint.remote=s3://bucket/prefix"
        )
    run_dir = f"{cfg.launch.pvc_mount}/runs/{cfg.run.name}" if cfg.launch.pvc else f"/tmp/mango/runs/{cfg.run.name}"
    return job_config(cfg, run_dir=run_dir)


def _image(cfg: Config) -> str:
    if not cfg.launch.tag:
        raise LaunchError(
            "launch.tag is empty: set the tag of the image you built and pushed "
            f"(docker build -t {cfg.launch.image}:<tag> . && docker push {cfg.launch.image}:<tag>)"
        )
    return f"{cfg.launch.image}:{cfg.launch.tag}"


def _meta(cfg: Config, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": cfg.launch.namespace,
        "labels": {"app.kubernetes.io/name": "mango", "app.kubernetes.io/instance": name},
    }


def _config_map(cfg: Config, name: str, run_cfg: Config) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(cfg, name),
        "data": {"config.yaml": config_yaml(run_cfg)},
    }


def _container(cfg: Config, name: str, command: list[str] | None, gpus: int) -> dict[str, Any]:
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}] + [{"name": k, "value": v} for k, v in plain_env(cfg)]
    limits: dict[str, Any] = {"nvidia.com/gpu": gpus} if gpus else {}
    c: dict[str, Any] = {
        "name": name,
        "image": _image(cfg),
        "imagePullPolicy": "IfNotPresent",
        "workingDir": WORKDIR,
        "env": env,
        "envFrom": [{"secretRef": {"name": cfg.launch.env_from}}],  # credentials: never inline
        "resources": {"requests": {"cpu": cfg.launch.cpus_per_gpu * max(gpus, 1)}, "limits": limits},
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        ],
    }
    if command is not None:
        c["command"] = command
    if cfg.launch.pvc:
        c["volumeMounts"].append({"name": "runs", "mountPath": cfg.launch.pvc_mount})
    return c


def _volumes(cfg: Config, config_map: str | None) -> list[dict[str, Any]]:
    vols: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": cfg.launch.shm_size}}]
    if config_map:
        vols.append({"name": "config", "configMap": {"name": config_map}})
    if cfg.launch.pvc:
        vols.append({"name": "runs", "persistentVolumeClaim": {"claimName": cfg.launch.pvc}})
    return vols


def _pod_template(
    cfg: Config, spec: LaunchSpec, container: str, command: list[str] | None, *, gpus: int, config_map: str
) -> dict[str, Any]:
    return {
        "metadata": {"labels": {"app.kubernetes.io/name": "mango"}},
        "spec": {
            "terminationGracePeriodSeconds": math.ceil(cfg.checkpoint.grace_s) + K8S_GRACE_MARGIN_S,
            "containers": [_container(cfg, container, command, gpus)],
            "volumes": _volumes(cfg, config_map),
        },
    }


def _batch_job(cfg: Config, spec: LaunchSpec, name: str, command: list[str]) -> dict[str, Any]:
    c = _container(cfg, "shard", command, 0)
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "config"]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(cfg, name),
        "spec": {
            "backoffLimit": 6,
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "mango"}},
                "spec": {"restartPolicy": "Never", "containers": [c], "volumes": _volumes(cfg, None)},
            },
        },
    }


def _dump(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False)
