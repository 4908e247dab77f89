"""The tasks: one :class:`~pipeline.tasks.base.Task` object per ``model.task`` value, and the registry by name.

Everything that differs between tasks — model pieces (head, decoders, allowed inputs, spatial or not),
layout of the batch, config checks, metrics and their direction, evaluation figures, what is served — is an
attribute or method of the task object; the rest of the pipeline asks :func:`get_task` instead of comparing
``model.task`` with a name. Adding a task = one module here + one line in :data:`TASKS` below + its tests
(``docs/tasks.md``).
"""

from __future__ import annotations

from pipeline.config_rules import ConfigError

from . import classification, density, segmentation, translation
from .base import REGISTRY, LatentTask, Modality, Task, names_where, register, role

#: every task, in the order the config documents them (and error messages list them)
TASKS: tuple[Task, ...] = tuple(
    register(module.TASK) for module in (density, segmentation, translation, classification)
)

__all__ = ["TASKS", "LatentTask", "Modality", "Task", "get_task", "names_where", "role", "task_names"]


def task_names() -> tuple[str, ...]:
    """The valid ``model.task`` values, in registration order."""
    return tuple(REGISTRY)


def get_task(name: str) -> Task:
    """The task called ``name``; ConfigError (a ValueError) naming the valid ones otherwise."""
    task = REGISTRY.get(name)
    if task is None:
        *rest, last = task_names()
        raise ConfigError(f"model.task={name!r} is not available; use {', '.join(rest)} or {last}")
    return task
