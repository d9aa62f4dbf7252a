"""The package layout is the architecture: imports only go down the layers, the device side never
reaches the laptop side, no module borrows another package's private names, and only the export
and pipeline layers may import torch and its friends (docs/ARCHITECTURE.md).

Read from the source with ``ast`` (function-level imports included), so a lazy import inside a
function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "edgetl"

# What each top-level part of the package may import from edgetl (itself always).
ALLOWED = {
    "errors": set(),
    "core": {"errors"},
    "heads": {"errors", "core"},
    "transfer": {"errors", "core", "heads"},
    "tasks": {"errors", "core", "heads", "transfer"},
    "device": {"errors", "core", "heads", "transfer", "tasks"},
    "export": {"errors", "core"},
    "datasets": {"errors"},
    "pipeline": {"errors", "core", "heads", "transfer", "tasks", "export", "device"},
    "fleet": {"errors", "core", "heads", "transfer", "tasks", "device"},
    "report": {"errors", "core", "heads", "transfer", "tasks", "device"},
    "serve": {"errors", "core", "heads", "transfer", "tasks", "device"},
    "cli": {
        "errors",
        "core",
        "heads",
        "transfer",
        "tasks",
        "device",
        "export",
        "pipeline",
        "datasets",
        "fleet",
        "report",
        "serve",
    },
    "__init__": set(),
}
# Libraries that pull in torch (or are the training stack): allowed only where training happens.
HEAVY = {"torch", "torchvision", "timm", "transformers", "optimum", "sentence_transformers", "nncf"}
HEAVY_ALLOWED = {"export", "pipeline"}


def _part(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _module(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, top_level: bool = False):
    """(imported module, [names], line) for every import in the file (``top_level``: only those that
    run at import time), relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module(path) if path.name == "__init__.py" else _module(path).rsplit(".", 1)[0]
    for node in tree.body if top_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield name, [a.name for a in node.names], node.lineno


FILES = sorted(SRC.rglob("*.py"))


def _edgetl_target(name: str, names: list[str]) -> list[str]:
    """The edgetl modules an import statement reaches (``from edgetl import tasks`` reaches edgetl.tasks)."""
    if name == "edgetl":
        return [f"edgetl.{n}" for n in names]
    return [name] if name.startswith("edgetl.") else []


def test_there_is_something_to_check():
    parts = {_part(p) for p in FILES}
    assert {"core", "heads", "tasks", "device", "export", "pipeline", "cli"} <= parts
    assert len(FILES) > 40


def _layer_violations(path: Path) -> list[str]:
    """Imports of edgetl parts that are not below this file's part (or an unknown part)."""
    part = _part(path)
    if part not in ALLOWED:
        return [f"{part}: a new top-level part of edgetl; give it a layer in this test and in docs/ARCHITECTURE.md"]
    bad = []
    for name, names, line in _imports(path):
        for target in _edgetl_target(name, names):
            other = target.split(".")[1]
            if other == "__version__" or other == part:
                continue
            if other not in ALLOWED[part]:
                bad.append(f"line {line}: {part} imports {target}")
    return bad


def _private_name_violations(path: Path) -> list[str]:
    """Private names (or private modules) imported from another edgetl package."""
    mine = _module(path).split(".")[:2]
    bad = []
    for name, names, line in _imports(path):
        if not name.startswith("edgetl"):
            continue
        target = name.split(".")
        private = [n for n in names if n.startswith("_") and n != "__version__"]
        private_module = any(seg.startswith("_") and seg != "__init__" for seg in target[2:])
        if (private or private_module) and target[:2] != mine:
            bad.append(f"line {line}: from {name} import {', '.join(names)}")
    return bad


def _heavy_import_violations(path: Path) -> list[str]:
    """torch and its friends imported outside the layers where training happens."""
    if _part(path) in HEAVY_ALLOWED:
        return []
    return [f"line {line}: import {name}" for name, _, line in _imports(path) if name.split(".")[0] in HEAVY]


RULES = {
    "imports go down the layers": _layer_violations,
    "no private names from another package": _private_name_violations,
    "torch only where training happens": _heavy_import_violations,
}


def test_every_module_keeps_the_import_rules():
    """Every source file against every rule, all findings reported at once (one test, not one per
    file and rule: a broken rule shows every file that breaks it in a single failure)."""
    findings = [
        f"{path.relative_to(SRC)}: {rule}: {finding}"
        for path in FILES
        for rule, check in RULES.items()
        for finding in check(path)
    ]
    assert not findings, "\n".join(findings)


def test_the_rules_catch_what_they_forbid(tmp_path, monkeypatch):
    """Each rule finds a violation written for it, so an empty finding list above means something."""
    import sys

    here = sys.modules[__name__]
    monkeypatch.setattr(here, "SRC", tmp_path / "edgetl")  # a source tree with one bad device module
    probe = tmp_path / "edgetl" / "device" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(
        "import torch\n"
        "from edgetl.pipeline import fit\n"
        "from edgetl.core._private import thing\n"
        "from ..heads.classification import _hidden\n"
    )
    assert _layer_violations(probe) == ["line 2: device imports edgetl.pipeline"]
    assert _private_name_violations(probe) == [
        "line 3: from edgetl.core._private import thing",
        "line 4: from edgetl.heads.classification import _hidden",
    ]
    assert _heavy_import_violations(probe) == ["line 1: import torch"]
    assert "a new top-level part" in _layer_violations(tmp_path / "edgetl" / "newpart" / "x.py")[0]


def module_edges(*, top_level: bool) -> dict[str, set[str]]:
    """Module -> the edgetl modules it imports (``top_level``: only at import time; else function-level
    imports too). ``from pkg import sub`` reaches the submodule ``pkg.sub``; ``from pkg import NAME``
    reaches ``pkg`` itself, its ``__init__`` included, even from inside the package."""
    modules = {_module(p) for p in FILES}

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rsplit(".", 1)[0] if "." in target else ""
        return target or None

    edges: dict[str, set[str]] = {}
    for path in FILES:
        mod = _module(path)
        targets: list[str] = []
        for name, names, _ in _imports(path, top_level=top_level):
            if name != "edgetl" and not name.startswith("edgetl."):
                continue
            subs = [f"{name}.{n}" for n in names if f"{name}.{n}" in modules]
            targets += subs if subs and len(subs) == len(names) else [*subs, name]
        edges[mod] = {r for t in targets if (r := resolve(t)) and r != mod}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n, stack + [n])):
                return found
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_no_import_cycle_between_modules():
    """No two modules import each other, directly or around a loop, whether the import runs at import
    time or inside a function (a lazy import that closes a loop is a cycle in the design all the
    same). A package's __init__ counts as a module: importing a name it defines is an edge to it."""
    cycle = find_cycle(module_edges(top_level=False))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_sees_lazy_and_package_imports():
    """The check finds a loop closed by a function-level import, and one through a package's __init__."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"p": {"p.x"}, "p.x": {"p"}, "q": set()}) == ["p", "p.x", "p"]
    # the report package imports its collector only inside a function: an edge all the same
    assert "edgetl.report.collect" in module_edges(top_level=False)["edgetl.report"]
    assert "edgetl.report.collect" not in module_edges(top_level=True)["edgetl.report"]


def _module_aliases(path: Path) -> dict[str, str]:
    """Names a file binds to edgetl *modules* (``from . import _edgetl as et``, ``import edgetl.core.bundle
    as b``), mapped to the module's dotted name."""
    aliases = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("edgetl.") and a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            package = _module(path) if path.name == "__init__.py" else _module(path).rsplit(".", 1)[0]
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                parent = ".".join(base + ([node.module] if node.module else []))
            else:
                parent = node.module or ""
            if not parent.startswith("edgetl"):
                continue
            for a in node.names:
                full = f"{parent}.{a.name}"
                where = SRC.parent / Path(*full.split("."))
                if (where / "__init__.py").is_file() or where.with_suffix(".py").is_file():
                    aliases[a.asname or a.name] = full  # a module or package, not a function or class
    return aliases


def test_every_attribute_read_off_an_edgetl_module_exists():
    """``et.verify_delivery`` where ``et`` is an edgetl module: the module must have it. A name
    imported only to be handed on (a facade such as edgetl.fleet._edgetl) looks unused to a linter,
    and an automatic fix that drops it breaks its users only when they run; this finds it at once."""
    import importlib

    missing = []
    for path in FILES:
        aliases = _module_aliases(path)
        if not aliases:
            continue
        used = {
            (node.value.id, node.attr, node.lineno)
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
        }
        for alias, attr, line in sorted(used):
            target = aliases[alias]
            if _part(SRC / Path(*target.split(".")[1:])) in HEAVY_ALLOWED:
                continue  # importing these loads torch: the layer rules above cover them
            module = importlib.import_module(target)
            if not hasattr(module, attr):
                missing.append(f"{path.relative_to(SRC)} line {line}: {target} has no {attr!r}")
    assert not missing, "\n".join(missing)
