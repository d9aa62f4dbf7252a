"""The device install on every Python a device ships: JetPack 6 / Ubuntu 22.04 (3.10), Debian 12 /
Raspberry Pi OS (3.11), Ubuntu 24.04 (3.12), Debian 13 (3.13).

Each interpreter found on this machine (pyenv's, or those named in ``EDGETL_TEST_PYTHONS``) gets a
fresh venv with ``edgetl[openvino]`` installed from a wheel of this checkout, the way a device
installs it: no torch in it at all. The bundle fitted on the laptop side is then predicted, evaluated
and adapted there through the console script. An interpreter that is missing is skipped with the
reason; one that is present must pass.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

VERSIONS = ("3.10", "3.11", "3.12", "3.13")


def _candidates() -> dict[str, Path]:
    """Interpreters by minor version: ``EDGETL_TEST_PYTHONS`` (paths, os.pathsep-separated) first,
    then every pyenv version directory."""
    found: dict[str, Path] = {}
    for p in filter(None, os.environ.get("EDGETL_TEST_PYTHONS", "").split(os.pathsep)):
        r = subprocess.run(
            [p, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True
        )
        if r.returncode == 0:
            found.setdefault(r.stdout.strip(), Path(p))
    root = os.environ.get("PYENV_ROOT") or str(Path.home() / ".pyenv")
    for d in sorted(Path(root, "versions").glob("3.*"), reverse=True):  # newest patch release first
        exe = d / "bin" / "python"
        minor = ".".join(d.name.split(".")[:2])
        if exe.exists() and minor in VERSIONS:
            found.setdefault(minor, exe)
    return found


PYTHONS = _candidates()


def _run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kw)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, REPO])
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("edgetl-*.whl")
    return whl


def _device_venv(python: Path, wheel: Path, root: Path) -> Path:
    venv = root / "venv"
    r = _run([python, "-m", "venv", venv])
    assert r.returncode == 0, r.stderr
    py = venv / "bin" / "python"
    spec = f"edgetl[openvino] @ {wheel.as_uri()}"
    for _attempt in range(2):  # one retry: a registry hiccup is not a failure of the install
        r = _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", spec])
        if r.returncode == 0:
            break
    assert r.returncode == 0, r.stderr[-3000:]
    return venv


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a venv and a pip install of edgetl[openvino] per interpreter
@pytest.mark.parametrize("version", VERSIONS)
def test_device_install_predicts_and_adapts(version, wheel, int8_bundle, surfaces, tmp_path):
    python = PYTHONS.get(version)
    if python is None:
        pytest.skip(f"no Python {version} on this machine (pyenv versions or EDGETL_TEST_PYTHONS)")
    venv = _device_venv(python, wheel, tmp_path)
    py, cli = venv / "bin" / "python", venv / "bin" / "edgetl"
    r = _run([py, "-c", "import importlib.util as u, sys; print(sys.version_info[:2], u.find_spec('torch'))"])
    assert r.returncode == 0 and r.stdout.strip().endswith("None"), (r.stdout, r.stderr)  # torch truly absent
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    from edgetl.device.predict import load_predictor

    expected = load_predictor(int8_bundle).predict([surfaces / "val"], top_k=2)
    r = _run([cli, "predict", int8_bundle, surfaces / "val", "--top-k", "2", "--json"], env=env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["predictions"]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        # another numpy / runtime build may order a near-tie differently; a clear answer must agree
        if e.top_k[0][1] - e.top_k[1][1] > 1e-3:
            assert g["label"] == e.label, (g, e)
        assert g["confidence"] == pytest.approx(e.confidence, abs=1e-3)

    r = _run([cli, "eval", int8_bundle, surfaces / "val", "--json"], env=env)
    assert r.returncode == 0, r.stderr
    assert 0.0 <= json.loads(r.stdout)["accuracy"] <= 1.0

    bundle = tmp_path / "b.bundle"
    shutil.copytree(int8_bundle, bundle)
    new = tmp_path / "new"
    for cdir in sorted((surfaces / "train").iterdir())[:2]:
        shutil.copytree(cdir, new / cdir.name)
    r = _run([cli, "adapt", bundle, new, "--json"], env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["version"] == 2 and out["gate"]["passed"], out
    r = _run([cli, "predict", bundle, surfaces / "val", "--json"], env=env)
    assert r.returncode == 0, r.stderr
