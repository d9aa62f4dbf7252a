"""A task is one package: nothing outside :mod:`edgetl.tasks` may branch on a task's name.

Code that compares ``task == "anomaly"`` grows a new branch in every layer for each task added,
and a task that forgets one fails far from its own package. What differs by task is asked of the
task (an attribute, a hook or an adapter it provides), so this test reads every module outside
``edgetl/tasks/`` and fails on a comparison, membership test or ``match`` case against a string
literal naming a registered task, and on ``getattr(task, "...", default)``, which hides a hook
the ``Task`` base does not declare behind a default.
"""

from __future__ import annotations

import ast
from pathlib import Path

import edgetl
from edgetl import tasks

SRC = Path(edgetl.__file__).resolve().parent
TASKS_DIR = SRC / "tasks"

_COMPARE_OPS = (ast.Eq, ast.NotEq, ast.In, ast.NotIn, ast.Is, ast.IsNot)


def _names_in(node: ast.AST, names: set[str]) -> list[str]:
    """Task names a string literal (or a tuple, set or list of them) spells."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value] if node.value in names else []
    if isinstance(node, (ast.Tuple, ast.Set, ast.List)):
        return [n for elt in node.elts for n in _names_in(elt, names)]
    return []


def _is_task(node: ast.AST) -> bool:
    """Whether an expression reads like a task object (``task``, ``self.task_obj``, ``r.task``)."""
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return "task" in name.lower()


def task_branches(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, what) for every branch on a task's name in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            if any(isinstance(op, _COMPARE_OPS) for op in node.ops):
                for side in (node.left, *node.comparators):
                    for n in _names_in(side, names):
                        found.append((node.lineno, f"comparison with {n!r}"))
        elif isinstance(node, ast.match_case):
            for pat in ast.walk(node.pattern):
                if isinstance(pat, ast.MatchValue):
                    for n in _names_in(pat.value, names):
                        found.append((pat.lineno, f"match case {n!r}"))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) == 3
            and _is_task(node.args[0])
        ):
            found.append((node.lineno, "getattr on a task with a default (declare the hook on Task)"))
    return found


def _outside_tasks():
    for path in sorted(SRC.rglob("*.py")):
        if TASKS_DIR not in path.parents:
            yield path


def test_the_detector_finds_each_kind_of_branch():
    names = set(tasks.TASKS)
    assert names, "the task registry is empty"
    some = sorted(names)[0]
    source = "\n".join(
        [
            f"a = t.name == {some!r}",
            f"b = {some!r} != t.name",
            f"c = t.name in ({some!r}, 'other')",
            f"d = t.name not in {{{some!r}}}",
            "e = getattr(task, 'hook', None)",
            "match t.name:",
            f"    case {some!r}:",
            "        pass",
            "f = t.name == 'not-a-task'",
            "g = getattr(thing, 'hook', None)",
        ]
    )
    lines = [line for line, _ in task_branches(source, names)]
    assert set(lines) == {1, 2, 3, 4, 5, 7}


def test_no_module_outside_tasks_branches_on_a_task_name():
    names = set(tasks.TASKS)
    found = [
        f"{path.relative_to(SRC.parent)}:{line}: {what}"
        for path in _outside_tasks()
        for line, what in sorted(task_branches(path.read_text(encoding="utf-8"), names))
    ]
    assert not found, (
        f"{len(found)} branch(es) on a task's name outside edgetl/tasks; ask the task instead:\n" + "\n".join(found)
    )


def test_every_task_supplies_what_the_layers_above_ask():
    """The abstract hooks are all implemented (the registry could instantiate each task), and every
    task names its gate's metric and the key its predictions name an item by."""
    from edgetl.tasks.base import Task

    assert Task.__abstractmethods__, "Task declares what every task must supply as abstract methods"
    for name, task in tasks.TASKS.items():
        assert task.name == name and task.gate_metric and task.item_key, name
        assert not type(task).__abstractmethods__, name
