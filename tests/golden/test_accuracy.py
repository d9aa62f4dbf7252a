"""Golden accuracy of each head on the built-in example: regressions and unexplained gains both fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgetl.heads.classification import HEAD_KINDS, HeadConfig
from edgetl.pipeline.fit import FitOptions, fit

REFERENCE = json.loads((Path(__file__).with_name("reference.json")).read_text())


def test_every_head_has_a_golden_figure():
    assert set(REFERENCE["fp32"]) == set(HEAD_KINDS)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_head_accuracy_matches_reference(kind, surfaces, cache_dir, tmp_path):
    opts = FitOptions(
        target="cpu-x86", precision="fp32", head=HeadConfig(kind=kind), cache_dir=str(cache_dir), quiet=True
    )
    r = fit(surfaces, tmp_path / f"{kind}.bundle", options=opts)
    acc = r.metrics["accuracy"]
    assert acc > 3 / len(r.bundle.labels)  # far above chance (1/8), whatever the reference says
    assert acc == pytest.approx(REFERENCE["fp32"][kind], abs=REFERENCE["tolerance"]), (
        f"{kind}: {acc:.4f} vs golden {REFERENCE['fp32'][kind]}: explain the change and update reference.json"
    )
