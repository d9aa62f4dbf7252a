"""The numbers behind the report's pictures, on inputs whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from edgetl.core.metrics import auroc
from edgetl.report.collect import calibration, coverage_curve, map_scale, roc_curve


def test_roc_curve_area_is_the_auroc_and_marks_the_threshold():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(200, bool), np.ones(100, bool)]
    s = np.r_[rng.normal(0.7, 0.2, 200), rng.normal(1.3, 0.3, 100)]
    s[:20] = s[200:220]  # ties across the classes
    c = roc_curve(y, s)
    assert c["fpr"][0] == c["tpr"][0] == 0 and c["fpr"][-1] == c["tpr"][-1] == 1
    assert np.all(np.diff(c["fpr"]) >= 0) and np.all(np.diff(c["tpr"]) >= 0)
    assert np.trapezoid(c["tpr"], c["fpr"]) == pytest.approx(auroc(y, s), abs=1e-4)
    assert c["at_threshold"] == {
        "fpr": pytest.approx(np.mean(s[~y] >= 1), abs=1e-4),
        "tpr": pytest.approx(np.mean(s[y] >= 1), abs=1e-4),
    }
    thin = roc_curve(y, s, points=20)
    assert len(thin["fpr"]) <= 20 and np.trapezoid(thin["tpr"], thin["fpr"]) == pytest.approx(auroc(y, s), abs=0.03)


def test_calibration_bins_and_error():
    conf = np.array([0.95, 0.95, 0.95, 0.95, 0.55, 0.55])
    right = np.array([True, True, True, False, True, False])
    cal = calibration(conf, right)
    full = [b for b in cal["bins"] if b["n"]]
    assert [(b["lo"], b["n"], b["accuracy"]) for b in full] == [(0.5, 2, 0.5), (0.9, 4, 0.75)]
    assert cal["ece"] == pytest.approx(4 / 6 * 0.2 + 2 / 6 * 0.05, abs=1e-4)
    assert sum(b["n"] for b in cal["bins"]) == len(conf)


def test_coverage_curve_answers_fewer_and_better():
    conf = np.array([0.9, 0.8, 0.7, 0.4, 0.3])
    right = np.array([True, True, True, False, False])
    c = coverage_curve(conf, right, points=10)
    assert c[0] == {"threshold": 0.0, "coverage": 1.0, "accuracy": 0.6}
    at = next(p for p in c if p["threshold"] >= 0.5)
    assert at["coverage"] == 0.6 and at["accuracy"] == 1.0
    assert all(a["coverage"] >= b["coverage"] for a, b in zip(c, c[1:]))


def test_map_scale_is_the_threshold_only_where_the_score_is_the_maps_peak():
    rng = np.random.default_rng(1)
    maps = rng.random((6, 8, 8)).astype(np.float32) * 10
    y = np.array([False, False, False, True, True, True])
    assert map_scale(maps, maps.reshape(6, -1).max(axis=1), 7.5, y) == (7.5, "threshold")
    # A score that adds an image-level term: the maps' own good peaks set the colour scale.
    ref, how = map_scale(maps, maps.reshape(6, -1).max(axis=1) * 3 + 1, 30.0, y)
    assert how == "good peaks" and ref == pytest.approx(np.median(maps[:3].reshape(3, -1).max(axis=1)))
