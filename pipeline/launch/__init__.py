"""Render (and optionally submit) cluster jobs from the typed config: ``python -m jobs.launch TARGET ...``.

:func:`render` maps a :class:`LaunchSpec` to :class:`Rendered` files; :func:`submit` hands them to ``sbatch`` /
``kubectl``. The training entry point is the same ``jobs.train`` everywhere; launchers only set the environment.
"""

from __future__ import annotations

from pipeline.config import Config
from pipeline.launch.kube import render_k8s, render_kuberay
from pipeline.launch.slurm import render_ray_slurm, render_shard_array, render_slurm
from pipeline.launch.spec import TARGETS, Artifact, LaunchError, LaunchSpec, Rendered
from pipeline.launch.submit import SubmitError, submit

_RENDERERS = {
    "slurm": render_slurm,
    "srun": render_slurm,
    "shard-array": render_shard_array,
    "ray-slurm": render_ray_slurm,
    "k8s": render_k8s,
    "kuberay": render_kuberay,
}


def render(cfg: Config, spec: LaunchSpec) -> Rendered:
    """The files for ``spec.target`` (see the module docstrings of ``slurm`` and ``kube``)."""
    if spec.shard_args and spec.target not in ("shard-array", "k8s"):
        raise LaunchError(f"jobs.shard arguments after `--` apply to shard-array and k8s only; got {spec.target}")
    return _RENDERERS[spec.target](cfg, spec)


__all__ = ["TARGETS", "Artifact", "LaunchError", "LaunchSpec", "Rendered", "SubmitError", "render", "submit"]
