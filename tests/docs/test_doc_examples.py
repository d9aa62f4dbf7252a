"""The docs say what the tool does: every command line in README.md, docs/ and examples/ names a
command and options that exist, and the README's quickstarts and Python API run for real, in the
order a newcomer would type them, on the built-in examples."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "examples").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)


def blocks(page: Path) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block of a markdown page."""
    return [(m.group(1), m.group(2)) for m in _FENCE.finditer(page.read_text(encoding="utf-8"))]


def command_lines(body: str) -> list[str]:
    """The shell lines of a block that run edgetl (continuations joined, prompts dropped)."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        line = line.strip().removeprefix("$ ")
        if line.startswith("edgetl "):
            out.append(line)
    return out


def _options(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")} | {"-h", "--help"}


def check_line(line: str) -> str | None:
    """What is wrong with one documented command line, or None: the subcommand path must exist and
    every option must be one that command takes (values and placeholders are not judged)."""
    from edgetl.cli import main

    words = shlex.split(line, comments=True)[1:]
    cmd: click.Command = main
    options = _options(main)
    i = 0
    while i < len(words):
        w = words[i]
        if w.startswith("-"):
            name = w.split("=", 1)[0]
            if name not in options:
                return f"{line!r}: {cmd.name} has no option {name}"
        elif isinstance(cmd, click.Group) and not (w.startswith("<") or w == "..."):
            sub = cmd.commands.get(w)
            if sub is None:
                return f"{line!r}: no command {w!r} under {cmd.name}"
            cmd, options = sub, _options(sub)
        i += 1
    return None


def test_the_docs_hold_command_lines():
    """The check below has something to check (a docs reshuffle cannot silently empty it)."""
    lines = [
        ln for page in PAGES for lang, body in blocks(page) if lang in ("bash", "sh", "") for ln in command_lines(body)
    ]
    assert len(lines) >= 30, lines


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_documented_command_line_exists(page):
    bad = [
        err
        for lang, body in blocks(page)
        if lang in ("bash", "sh", "")
        for line in command_lines(body)
        if (err := check_line(line))
    ]
    assert not bad, "\n".join(bad)


def test_the_line_check_catches_a_stale_option():
    assert check_line("edgetl fit data/ --out b.bundle --no-such-option") is not None
    assert check_line("edgetl fleet nosuch parts.bundle") is not None
    assert check_line("edgetl fit data/ --out b.bundle --head linear") is None


@pytest.mark.slow
def test_readme_quickstarts_and_api_run(tmp_path, cache_dir):
    """Every README block but the `make` one (it is this suite and the same demo) runs as written, in
    order, in one empty folder: bash blocks through the installed `edgetl`, then the Python API."""
    env = {**os.environ, "EDGETL_CACHE": str(cache_dir), "PYTHONPATH": str(REPO / "src")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    readme = blocks(REPO / "README.md")
    shell = [body for lang, body in readme if lang == "bash" and not body.lstrip().startswith("make ")]
    python = [body for lang, body in readme if lang == "python"]
    assert len(shell) >= 4 and len(python) == 1
    for body in shell:
        # the console script as installed, or the module where the venv has no script (editable dev runs)
        script = (
            body
            if (Path(sys.executable).parent / "edgetl").exists()
            else body.replace("edgetl ", f"{shlex.quote(sys.executable)} -m edgetl.cli ")
        )
        r = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=1500,
        )
        assert r.returncode == 0, f"README block failed:\n{body}\n--- stderr:\n{r.stderr[-3000:]}"
    assert any((tmp_path / "maps").iterdir()), "predict --heatmaps wrote no heat map"
    r = subprocess.run(
        [sys.executable, "-c", python[0]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500
    )
    assert r.returncode == 0, r.stderr[-3000:]
    first = r.stdout.splitlines()[0].split()
    assert 0.5 <= float(first[0]) <= 1.0, r.stdout
