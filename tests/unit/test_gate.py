"""The one conversion gate, on constructed paired outcomes with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from edgetl.core.gate import (
    GateDecision,
    accuracy_gate,
    auroc_gate,
    delong,
    enforce,
    paired_difference_interval,
    wilson_interval,
)
from edgetl.errors import GateError


def _pairs(n: int, ref_right: int, lost: int, gained: int = 0):
    """Paired correctness: the reference gets ``ref_right`` right; the converted model loses
    ``lost`` of those and gains ``gained`` of the reference's mistakes."""
    ref = np.zeros(n, bool)
    ref[:ref_right] = True
    new = ref.copy()
    new[:lost] = False
    new[ref_right : ref_right + gained] = True
    return ref, new


def test_no_drop_on_enough_items_passes():
    g = accuracy_gate(*_pairs(500, 470, 0), tolerance_pp=1.0)
    assert g.verdict == "passed" and g.drop_pp == 0.0 and g.upper_pp <= 1.0


def test_one_image_of_40_is_noise_not_a_refusal():
    g = accuracy_gate(*_pairs(40, 39, 1), tolerance_pp=1.0)
    assert g.drop_pp == pytest.approx(2.5)
    assert g.verdict == "inconclusive" and g.passed
    assert g.lower_pp < 1.0 < g.upper_pp
    # the count it names really would settle the question at the rates observed
    assert g.needed_items and g.needed_items > 40
    k = -(-g.needed_items // 40)  # the same rates, k times the items
    assert accuracy_gate(*_pairs(40 * k, 39 * k, k), tolerance_pp=1.0).verdict != "inconclusive"
    assert accuracy_gate(*_pairs(40 * (k - 2), 39 * (k - 2), k - 2), tolerance_pp=1.0).verdict == "inconclusive"


def test_a_real_ten_point_drop_is_refused():
    g = accuracy_gate(*_pairs(40, 38, 4), tolerance_pp=1.0)
    assert g.drop_pp == pytest.approx(10.0)
    assert g.verdict == "refused" and not g.passed and g.lower_pp > 1.0
    with pytest.raises(GateError, match=r"loses 10.00 points .*bounds \[.*on 40 images"):
        enforce(g, model="int8 model", target="t")
    enforce(g, model="int8 model", target="t", allow=True)  # --allow-drop writes it anyway


def test_gains_offset_losses_in_the_paired_count():
    # 3 lost, 3 gained: no net drop, even though 6 items changed
    g = accuracy_gate(*_pairs(1000, 930, 3, gained=3), tolerance_pp=1.0)
    assert g.drop_pp == 0.0 and g.verdict == "passed"


def test_interval_covers_the_truth_at_its_nominal_rate():
    """Simulated paired models with a true 2-point drop: the one-sided 95 % lower bound lies
    below the truth in about 95 % of draws (small-sample coverage is the reason for the method)."""
    rng = np.random.default_rng(0)
    n, misses = 60, 0
    for _ in range(400):
        ref = rng.random(n) < 0.9
        new = ref & (rng.random(n) > 0.04) | (~ref & (rng.random(n) < 0.16))  # 3.6 lost - 1.6 gained = 2
        _, lower, upper = paired_difference_interval(ref, new)
        misses += lower > 0.02
    assert misses / 400 <= 0.08


def test_wilson_matches_a_hand_computed_value():
    lo, hi = wilson_interval(38, 40)
    assert lo == pytest.approx(0.8597, abs=1e-3) and hi == pytest.approx(0.9833, abs=1e-3)


def test_delong_aurocs_match_sklearn_and_variance_matches_bootstrap():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(80), np.ones(60)].astype(bool)
    a = rng.normal(size=140) + 1.2 * y
    b = a + rng.normal(size=140) * 0.5
    auc_a, auc_b, var = delong(y, a, b)
    assert auc_a == pytest.approx(roc_auc_score(y, a)) and auc_b == pytest.approx(roc_auc_score(y, b))
    diffs = []
    for _ in range(1000):
        i = np.r_[rng.choice(np.flatnonzero(~y), 80), rng.choice(np.flatnonzero(y), 60)]
        diffs.append(roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]))
    assert np.sqrt(var) == pytest.approx(np.std(diffs), rel=0.2)


def test_auroc_pairs():
    rng = np.random.default_rng(2)
    y = np.r_[np.zeros(100), np.ones(100)].astype(bool)
    ref = rng.normal(size=200) + 2.0 * y
    same = auroc_gate(y, ref, ref + rng.normal(size=200) * 1e-3, tolerance_pp=1.0)
    assert same.verdict == "passed" and same.metric == "image_auroc"
    broken = auroc_gate(y, ref, rng.normal(size=200), tolerance_pp=1.0)  # the converted model lost all signal
    assert broken.verdict == "refused" and broken.drop_pp > 30
    small = auroc_gate(y[90:110], ref[90:110], ref[90:110] + rng.normal(size=20) * 0.7, tolerance_pp=1.0)
    assert small.verdict in ("inconclusive", "passed") and small.passed
    assert auroc_gate(np.zeros(10, bool), ref[:10], ref[:10], tolerance_pp=1).verdict == "not measured"


def test_decision_round_trips_through_a_report():
    g = accuracy_gate(*_pairs(40, 39, 1), tolerance_pp=1.0)
    d = g.to_dict()
    assert d["passed"] and GateDecision.from_dict({**d, "accuracy_control": {}}) == g
    assert "inconclusive" in g.describe() and "40 items" in g.describe()
