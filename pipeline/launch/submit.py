"""Submission: ``sbatch`` for SLURM scripts, ``kubectl apply`` for manifests, in dependency order.

A missing tool is a :class:`SubmitError` naming it (``jobs.launch`` exits 2), checked for every artifact
before anything is submitted, so a half-submitted pipeline (array job without its merge) cannot happen that way.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from pipeline.launch.spec import Artifact, Rendered


class SubmitError(RuntimeError):
    """Submission failed or is impossible here; the message names the tool."""


_HINT = {
    "sbatch": "run this on a SLURM login node (or drop --submit and copy the --print output there)",
    "kubectl": "install kubectl and point it at the cluster (KUBECONFIG), or drop --submit and apply --print output",
}


def submit(rendered: Rendered, log_dir: str | None = None) -> list[str]:
    """Submit every artifact; returns one line per submission (job id or kubectl's answer).

    ``log_dir`` (SLURM) is created first: ``#SBATCH --output`` points into it and SLURM does not create it.
    """
    for art in rendered.artifacts:
        if shutil.which(art.tool) is None:
            raise SubmitError(f"--submit needs `{art.tool}`, which is not on PATH: {_HINT[art.tool]}")
    if log_dir and any(a.tool == "sbatch" for a in rendered.artifacts):
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    ids: dict[str, str] = {}
    lines = []
    for art in rendered.artifacts:
        if art.tool == "sbatch":
            cmd = ["sbatch", "--parsable"]
            if art.after:
                cmd.append(f"--dependency=afterok:{ids[art.after]}")
            out = _run(cmd, art)
            ids[art.name] = out.split(";")[0].strip()  # --parsable prints "jobid" or "jobid;cluster"
            lines.append(f"{art.name}: submitted batch job {ids[art.name]}")
        else:
            if art.after:
                prev = next(a for a in rendered.artifacts if a.name == art.after)
                _run(
                    [
                        "kubectl",
                        "-n",
                        prev.namespace,
                        "wait",
                        "--for=condition=complete",
                        "--timeout=-1s",
                        f"job/{prev.k8s_job}",
                    ],
                    art,
                    stdin=False,
                )
            lines.append(f"{art.name}: {_run(['kubectl', 'apply', '-f', '-'], art).strip()}")
    return lines


def _run(cmd: list[str], art: Artifact, stdin: bool = True) -> str:
    r = subprocess.run(cmd, input=art.text if stdin else None, capture_output=True, text=True)
    if r.returncode != 0:
        raise SubmitError(
            f"`{' '.join(cmd)}` failed for {art.name} (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}"
        )
    return r.stdout
