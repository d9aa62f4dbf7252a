"""Attacks that held only half-way before: manifest values inside their types' ranges that are
ruinous in what they do, files swapped between their check and their load, signatures used beyond
their scope or replayed, a lock lost across ``fit --force``, and CLI inputs that gave tracebacks.

Small FP32 bundles (the session's ``small`` fixture) keep every case to seconds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.faults.test_faults import _copy, _edit


def _one_line_error(r, code: int, needle: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr


# ------------------------------------------------------------------ bounds from what a value does
@pytest.mark.parametrize("size", [300, 4096])
def test_an_input_size_the_model_does_not_take_is_refused_in_one_line(small, tmp_path, size):
    bundle, new, _ = small
    b = _copy(bundle, tmp_path)
    _edit(b, lambda m: m["backbone"]["preprocess"].__setitem__("input_size", size))
    image = sorted((new / "brick").glob("*.png"))[0]
    _one_line_error(run_cli("predict", b, image), 2, f"input_size = {size} but backbone.onnx takes")


def test_a_task_that_does_not_match_the_bundle_is_refused_in_one_line(small, tmp_path):
    bundle, new, _ = small
    b = _copy(bundle, tmp_path)
    _edit(b, lambda m: m.__setitem__("task", "anomaly"))
    image = sorted((new / "brick").glob("*.png"))[0]
    _one_line_error(run_cli("predict", b, image), 2, "task 'anomaly' needs")
    _edit(b, lambda m: (m.__setitem__("task", "classify"), m["head"]["versions"][0].__setitem__("kind", "padim")))
    _one_line_error(run_cli("predict", b, image), 2, "'padim' head")


# ------------------------------------------------------------------------ load what was verified
def test_a_model_or_head_swapped_after_the_check_is_never_run(small, tmp_path):
    from edgetl import tasks
    from edgetl.core.bundle import load_bundle
    from edgetl.errors import BundleError
    from edgetl.heads.classification import Head

    bundle, new, _ = small
    b = _copy(bundle, tmp_path)
    image = sorted((new / "brick").glob("*.png"))[0]
    loaded = load_bundle(b)  # every hash checked here ...
    # ... then another valid model is renamed into place before the runtime opens it
    evil = tmp_path / "evil.onnx"
    shutil.copy(b / "model.onnx", evil)
    os.replace(evil, b / "backbone.onnx")
    with pytest.raises(BundleError, match="sha256 does not match"):
        tasks.for_bundle(loaded).predictor(loaded)
    shutil.copy(bundle / "backbone.onnx", b / "backbone.onnx")
    honest = tasks.for_bundle(loaded).predictor(loaded).predict([image])
    # a valid head with other weights, swapped in after the check
    head = Head.load(b / "heads" / "v1.npz")
    evil_head = Head(kind=head.kind, labels=head.labels, arrays={k: -v for k, v in head.arrays.items()},
                     meta=head.meta)
    evil_head.save(tmp_path / "evil.npz")
    loaded = load_bundle(b)
    os.replace(tmp_path / "evil.npz", b / "heads" / "v1.npz")
    with pytest.raises(BundleError, match="sha256 does not match"):
        tasks.for_bundle(loaded).predictor(loaded)
    # a swap back before use is harmless: the runtime gets exactly the bytes that were checked
    shutil.copy(bundle / "heads" / "v1.npz", b / "heads" / "v1.npz")
    again = tasks.for_bundle(loaded).predictor(loaded).predict([image])
    assert again[0].label == honest[0].label
