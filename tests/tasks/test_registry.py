"""The task registry: one object per ``model.task``, and no task-name branches outside ``pipeline/tasks/``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from pipeline import config, metrics
from pipeline.config import ConfigError, load_config
from pipeline.tasks import TASKS, LatentTask, get_task, names_where, task_names

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("pipeline", "jobs", "benchmarks")


def test_the_registry_lists_the_four_tasks_in_order():
    assert task_names() == ("density", "segmentation", "translation", "classification")
    assert [t.name for t in TASKS] == list(task_names())
    assert all(get_task(n) is t for n, t in zip(task_names(), TASKS))


def test_config_and_metrics_take_their_task_list_from_the_registry():
    assert config.TASKS == task_names() == metrics.TASKS
    assert config.ModelConfig.__dataclass_fields__["task"].metadata["choices"] == task_names()
    for name in task_names():
        assert load_config(None, [f"model.task={name}"]).model.task == name
    with pytest.raises(ConfigError, match="model.task"):
        load_config(None, ["model.task=depth"])
    with pytest.raises(ConfigError, match="use density, segmentation, translation or classification"):
        get_task("depth")


@pytest.mark.parametrize(
    ("name", "headline", "higher"),
    [
        ("density", "bits_per_dim", False),
        ("segmentation", "miou", True),
        ("translation", "mae", False),
        ("classification", "micro_f1", True),
    ],
)
def test_each_task_names_its_headline_metric_and_direction(name, headline, higher):
    task = get_task(name)
    assert (task.headline, task.higher_is_better) == (headline, higher)
    assert headline in task.metrics
    assert task.better(1.0, 0.5) is higher and task.better(0.5, 1.0) is not higher
    assert metrics.REQUIRED_SUMS[name] == task.required_sums


def test_the_task_attributes_the_pipeline_asks_for():
    assert names_where("spatial") == ["segmentation", "translation"]
    assert names_where("needs_num_classes") == ["segmentation", "classification"]
    assert names_where("gan") == names_where("image_distances") == ["translation"]
    assert names_where("can_sample") == ["density"]
    assert [t.name for t in TASKS if isinstance(t, LatentTask)] == names_where("latent")
    assert get_task("classification").input_kinds == ("image", "text")
    assert get_task("translation").decoders == ("direct", "warp", "select")


def test_finalize_goes_through_the_task():
    sums = {"confusion": torch.tensor([[3, 1], [0, 4]]), "count": torch.tensor(2.0), "task_loss_sum": torch.tensor(1.0)}
    assert metrics.finalize("segmentation", sums) == get_task("segmentation").finalize(sums)
    assert set(metrics.finalize("segmentation", sums)) == {*get_task("segmentation").metrics, "task_loss"}


# -- no task-name branches outside pipeline/tasks/ ---------------------------------------------------------------


def _is_task(node: ast.AST) -> bool:
    """``task`` / ``self.task`` / ``cfg.model.task`` / ``io.task`` ... (a name or attribute called task)."""
    return (isinstance(node, ast.Name) and node.id == "task") or (
        isinstance(node, ast.Attribute) and node.attr == "task"
    )


def _is_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return True
    return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(_is_literal(e) for e in node.elts)


def task_name_comparisons(source: str) -> list[int]:
    """Lines comparing a ``task`` name or attribute with a string literal (==, !=, in, not in)."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        for op, (a, b) in zip(node.ops, zip(operands, operands[1:])):
            if isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) and (
                (_is_task(a) and _is_literal(b)) or (_is_literal(a) and _is_task(b))
            ):
                hits.append(node.lineno)
    return hits


def test_the_checker_finds_task_name_branches():
    src = 'if task == "density": pass\nif cfg.model.task in ("a", "b"): pass\nif "x" != self.task: pass\n'
    assert task_name_comparisons(src) == [1, 2, 3]
    assert task_name_comparisons("if get_task(task).latent: pass\nif task in TASKS: pass\nif t == 'x': pass\n") == []


def test_nothing_outside_pipeline_tasks_branches_on_a_task_name():
    found = []
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            if (REPO / "pipeline" / "tasks") in path.parents:
                continue
            found += [f"{path.relative_to(REPO)}:{n}" for n in task_name_comparisons(path.read_text(encoding="utf-8"))]
    assert not found, "task-name branches outside pipeline/tasks/ (ask get_task(name) instead): " + ", ".join(found)
