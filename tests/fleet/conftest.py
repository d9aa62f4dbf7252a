"""Fleet test fixtures: real bundles (FP32 ONNX Runtime, so no calibration) made once per session
with edgetl's own CLI, and their backbone features, shared by the tests that need them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from . import _digits

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
EDGETL = [str(Path(sys.executable).parent / "edgetl")]
FIT_FP32 = ["--precision", "fp32", "--runtime", "onnxruntime", "--target", "cpu-x86", "--quiet"]


def run_edgetl(*args, timeout=900) -> subprocess.CompletedProcess:
    r = subprocess.run(EDGETL + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """(images, labels, factory rows, the rest) of scikit-learn's digits as 64x64 RGB."""
    images, labels = _digits.digits_arrays()
    factory, rest = _digits.factory_split(labels, 12, seed=0)
    return images, labels, factory, rest


@pytest.fixture(scope="session")
def digits_bundle(cache_dir, tmp_path_factory, digits):
    """A bundle fitted on 12 images per digit (the "factory" release every device starts from)."""
    images, labels, factory, _ = digits
    root = tmp_path_factory.mktemp("digits")
    data = _digits.write_folder(root / "factory", images, labels, factory)
    run_edgetl("fit", data, "--out", root / "factory.bundle", *FIT_FP32)
    return root / "factory.bundle"


@pytest.fixture(scope="session")
def digits_features(digits_bundle, digits, tmp_path_factory):
    """Backbone features of every digit image, through the bundle's own backbone."""
    from edgetl.fleet import _edgetl as et

    images, labels, _, _ = digits
    root = tmp_path_factory.mktemp("digits-all")
    _digits.write_folder(root, images, labels, np.arange(len(labels)))
    paths = [root / f"d{labels[i]}" / f"{i:04d}.png" for i in range(len(labels))]
    X = et.image_features(et.load_bundle(digits_bundle), paths)
    return X, labels, paths


@pytest.fixture(scope="session")
def defects(cache_dir, tmp_path_factory):
    """The built-in defects example and a PatchCore bundle fitted on its good images."""
    root = tmp_path_factory.mktemp("defects")
    run_edgetl("example", "defects", root / "data")
    run_edgetl("fit", root / "data", "--out", root / "parts.bundle", "--head", "patchcore", *FIT_FP32)
    return root / "data", root / "parts.bundle"
