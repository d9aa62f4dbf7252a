"""The device path (predict, eval, adapt, info of a bundle) runs where torch cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import run_cli

# Every module of the device side: the layers below the laptop side (docs/ARCHITECTURE.md), found
# by walking the packages, so a new module is covered the day it is added.
# The report, the service and fleet rounds run on the device side too (with their extras).
DEVICE_PACKAGES = [
    "edgetl.core",
    "edgetl.heads",
    "edgetl.tasks",
    "edgetl.device",
    "edgetl.report",
    "edgetl.serve",
    "edgetl.fleet",
]


def device_modules() -> list[str]:
    import importlib.util
    import pkgutil

    found = ["edgetl", "edgetl.cli", "edgetl.errors", *DEVICE_PACKAGES]
    for pkg in DEVICE_PACKAGES:
        spec = importlib.util.find_spec(pkg)
        found += [m.name for m in pkgutil.walk_packages(spec.submodule_search_locations, prefix=pkg + ".")]
    return found


DEVICE_MODULES = device_modules()


def test_device_modules_import_without_torch(no_torch_env):
    assert len(DEVICE_MODULES) > 30 and "edgetl.tasks.anomaly.task" in DEVICE_MODULES
    code = (
        "import importlib, sys\n"
        + "".join(f"importlib.import_module({m!r})\n" for m in DEVICE_MODULES)
        + (
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision', 'nncf')]\n"
            "assert not bad, bad\nprint('ok')"
        )
    )
    import os

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **no_torch_env})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_blocker_really_blocks(no_torch_env):
    import os

    r = subprocess.run(
        [sys.executable, "-c", "import torch"], capture_output=True, text=True, env={**os.environ, **no_torch_env}
    )
    assert r.returncode != 0 and "blocked" in r.stderr


def test_predict_and_eval_without_torch_match_in_process(int8_bundle, surfaces, no_torch_env):
    from edgetl.device.predict import load_predictor

    p = load_predictor(int8_bundle)
    expected = [x.to_dict() for x in p.predict([surfaces / "val"], top_k=3)]
    r = run_cli("predict", int8_bundle, surfaces / "val", "--top-k", "3", "--json", env=no_torch_env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["predictions"]
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    assert [g["confidence"] for g in got] == pytest.approx([e["confidence"] for e in expected], abs=1e-6)
    r = run_cli("eval", int8_bundle, surfaces / "val", "--json", env=no_torch_env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] == pytest.approx(p.evaluate(surfaces / "val")["accuracy"])
    r = run_cli("info", int8_bundle, env=no_torch_env)
    assert r.returncode == 0, r.stderr
