"""A head kind is one registered class: no module outside the registry branches on kind names.

The count is read from the source with ``ast``: a comparison (``==``, ``!=``, ``in``, ``not in``)
between something named like a kind (``kind``, ``head_kind``, ``cfg.kind``, ``step.kind`` ...) and
a string literal naming a registered kind (or a tuple of them, or a ``*KINDS`` constant) is a
branch on the kind that belongs in the kind's class. Also: the fleet merger must not build method
names out of strings to dispatch on a kind.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from edgetl.errors import ConfigError
from edgetl.fleet import merger as _merger  # noqa: F401  (registers the fleet's merges)
from edgetl.heads import registry

SRC = Path(__file__).resolve().parents[2] / "src" / "edgetl"
REGISTRY_MODULES = {SRC / "heads" / "registry.py"}
_KIND_NAME = re.compile(r"(^|_)kind$")
# The defect head can also be saved as its patch part, under the mode name "patch".
EXTRA_KIND_NAMES = {"patch"}


def _kind_names() -> set[str]:
    return set(registry.names()) | set(registry.fleet_merge_names()) | EXTRA_KIND_NAMES


def _named_kind(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return bool(_KIND_NAME.search(node.id))
    if isinstance(node, ast.Attribute):
        return bool(_KIND_NAME.search(node.attr)) and not (
            isinstance(node.value, ast.Attribute) and node.value.attr == "dtype"
        )
    return False


def _names_kinds(node: ast.AST, kinds: set[str]) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and node.value in kinds
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_kinds(e, kinds) for e in node.elts)
    if isinstance(node, ast.Starred):
        return _names_kinds(node.value, kinds)
    if isinstance(node, ast.Name):
        return node.id.endswith("KINDS")
    return False


def kind_branches(source: str, kinds: set[str]) -> list[int]:
    """Line numbers of the comparisons of a kind-named value with kind names in ``source``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        if any(_named_kind(o) for o in operands) and any(_names_kinds(o, kinds) for o in operands):
            lines.append(node.lineno)
    return lines


def count_sites(root: Path, kinds: set[str], skip=()) -> dict[str, list[int]]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        if path in skip:
            continue
        found = kind_branches(path.read_text(encoding="utf-8"), kinds)
        if found:
            out[str(path.relative_to(root))] = found
    return out


def test_the_counter_finds_kind_branches():
    src = """
if head.kind == "linear": pass
if cfg.kind in ("mlp", "ridge"): pass
if step.kind in ANOMALY_KINDS: pass
x = 1 if kind != "padim" else 2
if a.dtype.kind == "f": pass
if backbone_kind == "text": pass
if label == "linear": pass
"""
    assert kind_branches(src, _kind_names()) == [2, 3, 4, 5]


def test_no_head_kind_branches_outside_the_registry():
    sites = count_sites(SRC, _kind_names(), skip=REGISTRY_MODULES)
    assert sites == {}, f"{sum(map(len, sites.values()))} head-kind branches: {sites}"


def test_the_fleet_merger_does_not_build_method_names():
    tree = ast.parse((SRC / "fleet" / "merger.py").read_text(encoding="utf-8"))
    built = [
        n.lineno
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Name)
        and n.func.id == "getattr"
        and len(n.args) >= 2
        and not isinstance(n.args[1], ast.Constant)
    ]
    assert built == []


def test_unknown_kinds_fail_with_the_valid_list():
    with pytest.raises(ConfigError, match="valid kinds: linear, mlp, prototype"):
        registry.get("lineer", "classify")
    with pytest.raises(ConfigError, match="choose one of ridge"):
        registry.fleet_merge("nope")


def test_the_kind_lists_hold_every_built_in_kind():
    """The lists the CLI and the tasks offer are taken after the built-in kinds registered (an import
    order that read the registry first would offer no kind at all)."""
    from edgetl.heads.classification import HEAD_KINDS
    from edgetl.heads.defect import DEFECT_KINDS
    from edgetl.heads.oneclass import IMAGE_KINDS
    from edgetl.heads.patch import PATCH_KINDS

    assert set(HEAD_KINDS) >= {"linear", "mlp", "prototype"}
    assert set(PATCH_KINDS) >= {"patchcore", "padim"} and set(IMAGE_KINDS) >= {"knn", "gaussian"}
    assert "combined" in DEFECT_KINDS
