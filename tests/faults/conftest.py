"""The fault suite's shared bundle: fitted once per session (tiny FP32, ONNX Runtime)."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import run_cli


@pytest.fixture(scope="session")
def small(surfaces, cache_dir, tmp_path_factory):
    """A 3-class FP32 bundle and a folder of new labelled images (known classes and a new one)."""
    root = tmp_path_factory.mktemp("faults")
    data = root / "data"
    for split in ("train", "val"):
        for c in ("brick", "grass", "gravel"):
            shutil.copytree(surfaces / split / c, data / split / c)
    bundle = root / "base.bundle"
    r = run_cli("fit", data, "--out", bundle, "--precision", "fp32", "--runtime", "onnxruntime", "--json")
    assert r.returncode == 0, r.stderr
    new = root / "new"
    for c in ("brick", "grass", "gravel", "wood"):
        shutil.copytree(surfaces / "train" / c, new / c)
    return bundle, new, data


@pytest.fixture(scope="session")
def defect_bundle(cache_dir, tmp_path_factory):
    """A small FP32 defect detector (the built-in parts example) and its data."""
    from edgetl.datasets.images import make_defects

    root = tmp_path_factory.mktemp("faults-defects")
    make_defects(root / "data", seed=0, n_train_good=16, n_test_good=6, n_test_defect=5, size=128)
    out = root / "parts.bundle"
    r = run_cli(
        "fit", root / "data", "--out", out, "--precision", "fp32", "--runtime", "onnxruntime", "--json", "--quiet"
    )
    assert r.returncode == 0, r.stderr
    return out, root / "data"


def write_policy(path, keys, may: dict) -> None:
    """A device trust policy naming each key in ``may`` (key name -> operations it may sign), with
    the public key ``keygen`` wrote beside it in ``keys``."""
    path.write_text(
        "".join(
            f'[[key]]\nname = "{name}"\npublic_key = "{(keys / f"{name}.pub").read_text().strip()}"\n'
            f"may = {list(ops)!r}\n".replace("'", '"')
            for name, ops in may.items()
        )
    )
