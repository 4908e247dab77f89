"""Rendered scripts and manifests: syntax, required fields, escaping, rendezvous wiring, submission.

Scripts are checked with ``bash -n`` and then *run* under the fake SLURM (tests/launch/conftest.py) with a
recorder standing in for the nodes' Python, so the per-node values each task really saw are asserted — not
the text. The real training runs are in test_cluster_runs.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import jobs.launch
from pipeline.config import load_config
from pipeline.launch import LaunchError, LaunchSpec, render
from pipeline.launch.spec import REPO, fill

from .conftest import FAKE, FakeSlurm, _stand_in

DEMO = str(REPO / "launch" / "configs" / "demo.yaml")


def _cfg(*overrides: str):
    return load_config(DEMO, list(overrides))


def _one(target: str, *overrides: str, nodes: int = 2, gpus: int = 4, **kw) -> str:
    rendered = render(_cfg(*overrides), LaunchSpec(target, nodes, gpus, config_source=DEMO, **kw))
    assert len(rendered.artifacts) == 1
    return rendered.artifacts[0].text


def _bash_n(text: str, tmp_path: Path, name: str = "job.sh") -> Path:
    path = tmp_path / name
    path.write_text(text)
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return path


@pytest.fixture(scope="module")
def recorder(fake_slurm: FakeSlurm) -> str:
    _stand_in(fake_slurm.bin, "recorder-python", FAKE / "recorder.py")
    return str(fake_slurm.bin / "recorder-python")


def _dry_run(fake: FakeSlurm, script: Path, job_id: int, nodes: int = 2, **env: str) -> subprocess.CompletedProcess:
    before = len(fake.records("python"))
    r = subprocess.run(
        ["bash", str(script)],
        env={**os.environ, **fake.env(job_id, nodes), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    r.calls = fake.records("python")[before:]  # type: ignore[attr-defined]
    return r


# -- SLURM ------------------------------------------------------------------------------------------


def test_slurm_script_has_the_lifecycle_directives(tmp_path: Path) -> None:
    text = _one("slurm", "launch.partition=gpu", "launch.account=proj", "checkpoint.grace_s=100")
    _bash_n(text, tmp_path)
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --cpus-per-task=32",
    ):
        assert line + "\n" in text, line
    assert "#SBATCH --signal=B:USR2@160\n" in text  # grace_s + 60 when that exceeds the default 120 s
    assert "srun --kill-on-bad-exit=1 " in text and "--rdzv_backend=c10d" in text
    assert "resume: latest" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "#SBATCH --signal=B:USR2@120\n" in _one("slurm")  # the default grace (60 s) keeps the 120 s warning


def test_srun_script_runs_one_task_per_gpu_without_torchrun(tmp_path: Path) -> None:
    text = _one("srun", nodes=2, gpus=8)
    _bash_n(text, tmp_path)
    assert "#SBATCH --ntasks-per-node=8\n" in text and "torch.distributed.run" not in text
    assert "-m jobs.train --config config.yaml" in text and "node.sh" not in text


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed", "accelerate"])
def test_each_node_gets_its_own_rank_and_the_first_host_as_master(
    launcher: str, fake_slurm: FakeSlurm, recorder: str, tmp_path: Path
) -> None:
    text = _one(
        "slurm",
        f"launch.python={recorder}",
        f"run.dir={tmp_path / 'run'}",
        "launch.env=[NCCL_DEBUG=WARN]",
        nodes=3,
        gpus=2,
        launcher=launcher,
    )
    (tmp_path / "run" / "logs").mkdir(parents=True)
    job = 5000 + len(launcher)
    r = _dry_run(fake_slurm, _bash_n(text, tmp_path), job, nodes=3)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = sorted(r.calls, key=lambda c: int(c["env"]["SLURM_NODEID"]))
    assert [c["env"]["SLURM_NODEID"] for c in calls] == ["0", "1", "2"]
    port = 20000 + job % 40000
    for node, call in enumerate(calls):
        argv, env = call["argv"], call["env"]
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == str(port)  # the allocation's first host
        assert env["NCCL_DEBUG"] == "WARN"
        assert Path(call["cwd"]).name == str(job) and Path(call["cwd"]).parent.name == "code"  # the snapshot
        if launcher == "torchrun":
            assert argv[:2] == ["-m", "torch.distributed.run"]
            assert f"--rdzv_endpoint=127.0.0.1:{port}" in argv and "--nnodes=3" in argv and "--nproc_per_node=2" in argv
        elif launcher == "deepspeed":
            assert argv[:3] == ["-m", "deepspeed.launcher.runner", f"--node_rank={node}"]  # expanded on the node
            hostfile = next(a for a in argv if a.startswith("--hostfile=")).split("=", 1)[1]
            assert Path(hostfile).read_text() == "127.0.0.1 slots=2\n127.0.0.2 slots=2\n127.0.0.3 slots=2\n"
            assert {"--no_ssh", "--no_local_rank", "--module", "--master_addr=127.0.0.1"} <= set(argv)
        else:
            assert argv[:3] == ["-m", "accelerate.commands.launch", f"--machine_rank={node}"]
            assert "--num_processes=6" in argv and "--main_process_ip=127.0.0.1" in argv
        assert argv[-3:] == ["jobs.train", "--config", "config.yaml"]  # the same entry point behind every launcher
    assert not fake_slurm.records("requeue") or all(q != str(job) for q in fake_slurm.records("requeue"))


def test_a_requeued_start_reuses_the_code_snapshot(fake_slurm: FakeSlurm, recorder: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    script = _bash_n(_one("slurm", f"launch.python={recorder}", f"run.dir={run}", nodes=1, gpus=1), tmp_path)
    assert _dry_run(fake_slurm, script, 6001, nodes=1).returncode == 0
    snap = run / "code" / "6001"
    assert (snap / "pipeline" / "train" / "loop.py").is_file() and (snap / "launch" / "templates" / "node.sh").is_file()
    assert (snap / "config.yaml").is_file() and not list(snap.rglob("__pycache__"))
    marker = snap / "pipeline" / "edited-after-submission"
    marker.write_text("the requeued start must not recopy the code")
    r = _dry_run(fake_slurm, script, 6001, nodes=1, SLURM_RESTART_COUNT="1")
    assert r.returncode == 0 and marker.exists() and "start 2" in r.stdout
    assert (run / "logs" / "mango-demo-6001" / "node0.log").exists()  # per-job log dir, per-node log


def test_a_failing_node_fails_the_job_without_requeue(fake_slurm: FakeSlurm, recorder: str, tmp_path: Path) -> None:
    (tmp_path / "run" / "logs").mkdir(parents=True)
    script = _bash_n(_one("slurm", f"launch.python={recorder}", f"run.dir={tmp_path / 'run'}", gpus=1), tmp_path)
    r = _dry_run(fake_slurm, script, 6002, FAKE_EXIT_ON_NODE_1="7")
    assert r.returncode == 7 and "6002" not in fake_slurm.records("requeue")


def test_shard_array_and_its_dependent_merge(fake_slurm: FakeSlurm, recorder: str, tmp_path: Path) -> None:
    args = ("--", "sunrgbd", "--src", "/data/SUN RGBD", "--out", "/shared/shards/sun", "--split", "train")
    cfg = _cfg(f"launch.python={recorder}", f"run.dir={tmp_path / 'run'}")
    rendered = render(cfg, LaunchSpec("shard-array", 1, 0, tasks=3, shard_args=args[1:]))
    array, merge = rendered.artifacts
    assert merge.after == array.name and "#SBATCH --array=0-2\n" in array.text
    (tmp_path / "run" / "logs").mkdir(parents=True)
    r = _dry_run(fake_slurm, _bash_n(array.text, tmp_path, "array.sh"), 6003, nodes=1, SLURM_ARRAY_TASK_ID="2")
    assert r.returncode == 0, r.stderr
    (call,) = r.calls
    assert call["argv"] == [
        "-m",
        "jobs.shard",
        "sunrgbd",
        "--src",
        "/data/SUN RGBD",
        "--out",
        "/shared/shards/sun",
        "--split",
        "train",
        "--task-index",
        "2",
        "--num-tasks",
        "3",
        "--quiet",
    ]
    r = _dry_run(fake_slurm, _bash_n(merge.text, tmp_path, "merge.sh"), 6004, nodes=1)
    assert r.calls[0]["argv"] == ["-m", "jobs.shard", "merge", "/shared/shards/sun", "--split", "train"]
    with pytest.raises(LaunchError, match="--split"):
        render(cfg, LaunchSpec("shard-array", 1, 0, tasks=3, shard_args=("sunrgbd", "--out", "x")))
    with pytest.raises(LaunchError, match="--task-index"):
        render(cfg, LaunchSpec("shard-array", 1, 0, tasks=3, shard_args=args[1:] + ("--task-index", "0")))


def test_ray_slurm_starts_head_workers_then_the_sweep(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="--space"):
        _one("ray-slurm")
    with pytest.raises(LaunchError, match="under the repository"):
        _one("ray-slurm", space="launch/sweeps/no-such-space.yaml")
    text = _one("ray-slurm", nodes=3, gpus=4, space="launch/sweeps/tiny.yaml")
    _bash_n(text, tmp_path)
    head = text.index("start --head --block")
    workers = text.index('start --block --address="$RAY_ADDRESS"')
    sweep = text.index("-m jobs.sweep --config")
    assert head < workers < sweep and '--nodes=2 --ntasks=2 --ntasks-per-node=1 --exclude="$HEAD_NODE"' in text
    assert "--space launch/sweeps/tiny.yaml" in text and "--num-gpus=4" in text


# -- Kubernetes -------------------------------------------------------------------------------------


def _docs(text: str) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(text)}


def test_pytorchjob_manifest(tmp_path: Path) -> None:
    text = _one(
        "k8s",
        "launch.tag=1.2.3",
        "launch.pvc=mango-runs",
        "data.shards=s3://bucket/shards/stereo",
        "launch.env=[NCCL_SOCKET_IFNAME=eth0]",
        "checkpoint.grace_s=90",
        nodes=3,
        gpus=8,
    )
    docs = _docs(text)
    job, cm = docs["PyTorchJob"], docs["ConfigMap"]
    assert job["apiVersion"] == "kubeflow.org/v1" and job["spec"]["nprocPerNode"] == "8"
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 2
    run_cfg = yaml.safe_load(cm["data"]["config.yaml"])
    assert run_cfg["run"]["dir"] == "/mnt/mango/runs/demo" and run_cfg["checkpoint"]["resume"] == "latest"
    for role in specs.values():
        assert role["restartPolicy"] == "ExitCode"  # 143 (SIGTERM, saved) is retryable, 0 is success
        pod = role["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= 90 + 30
        (c,) = pod["containers"]
        assert c["name"] == "pytorch" and c["image"] == "mango-pipeline:1.2.3"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert c["command"] == [
            "bash",
            "launch/templates/pod.sh",
            "python",
            "-m",
            "jobs.train",
            "--config",
            "/etc/mango/config.yaml",
        ]
        assert c["envFrom"] == [{"secretRef": {"name": "mango-credentials"}}]
        assert {"name": "NCCL_SOCKET_IFNAME", "value": "eth0"} in c["env"]
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        vols = {v["name"]: v for v in pod["volumes"]}
        assert mounts["dshm"]["mountPath"] == "/dev/shm" and vols["dshm"]["emptyDir"]["medium"] == "Memory"
        assert vols["runs"]["persistentVolumeClaim"]["claimName"] == "mango-runs"
        assert mounts["runs"]["mountPath"] == "/mnt/mango"
        assert vols["config"]["configMap"]["name"] == cm["metadata"]["name"] and mounts["config"]["readOnly"]


def test_k8s_refuses_what_would_break_or_leak() -> None:
    ok = ("launch.tag=1", "launch.pvc=runs", "data.shards=s3://b/s")
    with pytest.raises(LaunchError, match="launch.tag"):
        _one("k8s", "launch.pvc=runs", "data.shards=s3://b/s")
    with pytest.raises(LaunchError, match="relative local path"):
        _one("k8s", "launch.tag=1", "launch.pvc=runs")
    with pytest.raises(LaunchError, match="checkpoints would die"):
        _one("k8s", "launch.tag=1", "data.shards=s3://b/s")
    with pytest.raises(LaunchError, match="AWS_SECRET_ACCESS_KEY looks like a credential"):
        _one("k8s", *ok, "launch.env=[AWS_SECRET_ACCESS_KEY=abc]")
    # S3 checkpoints instead of a volume: no PVC in the pods
    text = _one("k8s", "launch.tag=1", "data.shards=s3://b/s", "checkpoint.remote=s3://b/ckpt")
    assert "persistentVolumeClaim" not in text


def test_indexed_shard_job_and_kuberay(tmp_path: Path) -> None:
    cfg = _cfg("launch.tag=2", "launch.pvc=runs", "data.shards=s3://b/s")
    work, merge = render(
        cfg,
        LaunchSpec(
            "k8s", 4, 0, tasks=16, shard_args=("sunrgbd", "--src", "/data", "--out", "s3://b/sun", "--split", "train")
        ),
    ).artifacts
    job = next(yaml.safe_load_all(work.text))
    assert job["apiVersion"] == "batch/v1" and job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == 16 and job["spec"]["parallelism"] == 4
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"][-4:] == ["train", "--num-tasks", "16", "--quiet"] and "--task-index" not in c["command"]
    assert (
        merge.after == work.name
        and "merge" in next(yaml.safe_load_all(merge.text))["spec"]["template"]["spec"]["containers"][0]["command"]
    )

    docs = _docs(render(cfg, LaunchSpec("kuberay", 2, 1, space="launch/sweeps/tiny.yaml")).artifacts[0].text)
    ray = docs["RayJob"]["spec"]
    assert docs["RayJob"]["apiVersion"] == "ray.io/v1"
    assert ray["entrypoint"] == "python -m jobs.sweep --config /etc/mango/config.yaml --space launch/sweeps/tiny.yaml"
    (group,) = ray["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 2 and ray["shutdownAfterJobFinishes"] is True
    worker = group["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1 and worker["envFrom"][0]["secretRef"]


# -- CLI, submission, templates ---------------------------------------------------------------------


def test_submit_without_the_tool_exits_2_naming_it(tmp_path: Path, monkeypatch, capsys) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # no sbatch, no kubectl
    base = [sys.executable, "-m", "jobs.launch"]
    r = subprocess.run(
        base + ["slurm", "--config", DEMO, "--nodes", "2", "--gpus-per-node", "1", "--submit"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "`sbatch`" in r.stderr, r.stderr
    monkeypatch.setenv("PATH", str(tmp_path))
    assert (
        jobs.launch.main(
            [
                "k8s",
                "--config",
                DEMO,
                "--nodes",
                "1",
                "--gpus-per-node",
                "1",
                "--submit",
                "launch.tag=1",
                "launch.pvc=r",
                "data.shards=s3://b/s",
            ]
        )
        == 2
    )
    assert "`kubectl`, which is not on PATH" in capsys.readouterr().err


def test_submit_chains_the_merge_after_the_array(
    fake_slurm: FakeSlurm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    for k, v in fake_slurm.env(0).items():
        monkeypatch.setenv(k, v)
    before = len(fake_slurm.records("sbatch"))
    rc = jobs.launch.main(
        [
            "shard-array",
            "--config",
            DEMO,
            "--nodes",
            "1",
            "--gpus-per-node",
            "0",
            "--tasks",
            "4",
            "--submit",
            f"run.dir={tmp_path / 'run'}",
            "--",
            "embedded",
            "--src",
            "stereo",
            "--out",
            "shards/x",
            "--split",
            "train",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    first, second = fake_slurm.records("sbatch")[before:]
    assert first["argv"] == ["--parsable"] and "--array=0-3" in first["script"]
    job_id = capsys.readouterr().out.split("submitted batch job ")[1].split()[0]
    assert second["argv"] == ["--parsable", f"--dependency=afterok:{job_id}"]
    assert (tmp_path / "run" / "logs").is_dir()  # --output's directory exists before the job starts


def test_cli_errors_exit_2(capsys) -> None:
    assert jobs.launch.main(["slurm", "--config", DEMO, "--nodes", "0", "--gpus-per-node", "1"]) == 2
    assert "--nodes" in capsys.readouterr().err
    assert (
        jobs.launch.main(["srun", "--config", DEMO, "--nodes", "1", "--gpus-per-node", "1", "--launcher", "deepspeed"])
        == 2
    )
    assert jobs.launch.main(["slurm", "--config", DEMO, "--nodes", "1", "--gpus-per-node", "1", "optim.lr=-1"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    for extra, word in ((["--space", "launch/sweeps/tiny.yaml"], "--space"), (["--tasks", "4"], "--tasks")):
        assert jobs.launch.main(["slurm", "--config", DEMO, "--nodes", "1", "--gpus-per-node", "1", *extra]) == 2
        assert word in capsys.readouterr().err  # an option that does not apply is an error, not ignored


def test_fill_refuses_missing_and_unused_values() -> None:
    assert fill("a {{x}} b", {"x": 1}) == "a 1 b"
    with pytest.raises(KeyError, match="no value"):
        fill("{{x}} {{y}}", {"x": 1})
    with pytest.raises(KeyError, match="not used"):
        fill("{{x}}", {"x": 1, "z": 2})


def test_render_time_values_are_shell_quoted(fake_slurm: FakeSlurm, recorder: str, tmp_path: Path) -> None:
    run = tmp_path / "a dir with $HOME and 'quotes'"
    (run / "logs").mkdir(parents=True)
    with pytest.raises(LaunchError, match="#SBATCH --output"):
        _one("slurm", f"run.dir={run}")  # the default log dir <run.dir>/logs cannot go into #SBATCH --output
    script = _bash_n(
        _one(
            "slurm", f"launch.python={recorder}", f"run.dir={run}", f"launch.log_dir={run.parent}/logs", nodes=1, gpus=1
        ),
        tmp_path,
    )
    r = _dry_run(fake_slurm, script, 6005, nodes=1)
    assert r.returncode == 0, r.stderr
    assert Path(r.calls[0]["cwd"]) == run / "code" / "6005"
    cfg = yaml.safe_load((run / "code" / "6005" / "config.yaml").read_text())
    assert cfg["run"]["dir"] == str(run)


def test_rendered_files_are_written_with_out(tmp_path: Path, capsys) -> None:
    assert (
        jobs.launch.main(["srun", "--config", DEMO, "--nodes", "1", "--gpus-per-node", "2", "--out", str(tmp_path)])
        == 0
    )
    (path,) = tmp_path.glob("*.sbatch")
    assert path.read_text().startswith("#!/bin/bash") and capsys.readouterr().out == ""


def test_k8s_submit_applies_the_merge_only_after_the_indexed_job(fake_slurm: FakeSlurm, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", fake_slurm.env(0)["PATH"])
    monkeypatch.setenv("FAKE_SLURM_LOG", str(fake_slurm.log))
    before = len(fake_slurm.records("kubectl"))
    assert (
        jobs.launch.main(
            [
                "k8s",
                "--config",
                DEMO,
                "--nodes",
                "2",
                "--gpus-per-node",
                "0",
                "--tasks",
                "8",
                "--submit",
                "launch.tag=1",
                "launch.pvc=runs",
                "data.shards=s3://b/s",
                "--",
                "embedded",
                "--src",
                "stereo",
                "--out",
                "s3://b/x",
                "--split",
                "train",
            ]
        )
        == 0
    )
    apply, wait, merge = fake_slurm.records("kubectl")[before:]
    assert apply == {"argv": ["apply", "-f", "-"], "kinds": ["Job"]}
    assert wait["argv"] == [
        "-n",
        "default",
        "wait",
        "--for=condition=complete",
        "--timeout=-1s",
        "job/mango-demo-shard",
    ]
    assert merge["kinds"] == ["Job"] and "job/mango-demo-shard-merge created" in capsys.readouterr().out


def test_dockerfile_mirrors_the_readme_setup() -> None:
    from pipeline.launch.kube import WORKDIR

    text = (REPO / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM python:3.11" in text and f"WORKDIR {WORKDIR}\n" in text
    assert "pip install -r requirements.txt" in text and "pip install --no-deps -e ." in text  # as the Makefile
    assert "build-essential" in text and "procps" in text  # DeepSpeed's JIT op; pgrep for node.sh
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "runs", "mlruns"} <= set(ignored)


def test_srun_tasks_get_usr2_and_the_job_requeues(fake_slurm: FakeSlurm, recorder: str, tmp_path: Path) -> None:
    (tmp_path / "run" / "logs").mkdir(parents=True)
    script = _bash_n(
        _one("srun", f"launch.python={recorder}", f"run.dir={tmp_path / 'run'}", nodes=2, gpus=2), tmp_path
    )
    started, signalled = len(fake_slurm.records("python")), len(fake_slurm.records("signal"))
    proc = subprocess.Popen(
        ["bash", str(script)],
        env={**os.environ, **fake_slurm.env(6006), "FAKE_WAIT_FOR_USR2": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 30
    while len(fake_slurm.records("python")) < started + 4:  # 2 nodes × 2 tasks, each a rank (no torchrun)
        assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.05)
    ranks = fake_slurm.records("python")[started:]
    assert sorted(r["env"]["SLURM_PROCID"] for r in ranks) == ["0", "1", "2", "3"]
    assert all(r["argv"] == ["-m", "jobs.train", "--config", "config.yaml"] for r in ranks)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert sorted(s["procid"] for s in fake_slurm.records("signal")[signalled:]) == ["0", "1", "2", "3"]
    assert "6006" in fake_slurm.records("requeue")
