"""Per-group accuracy: the worst group, its gap with a Bonferroni-adjusted interval, and the flag's false-alarm rate."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgetl.core.gate import wilson_interval as wilson
from edgetl.transfer.groups import group_accuracy


def test_a_real_gap_is_flagged():
    y = np.zeros(300, int)
    pred = np.concatenate([np.zeros(200, int), np.r_[np.zeros(60, int), np.ones(40, int)]])
    groups = ["cam0"] * 100 + ["cam1"] * 100 + ["cam2"] * 100
    r = group_accuracy(y, pred, groups)
    assert r.worst == "cam2" and r.flagged and r.gap_pp == pytest.approx(40.0)
    assert r.groups[0]["group"] == "cam2" and r.groups[0]["accuracy"] == 0.6
    assert r.adjusted_confidence == pytest.approx(1 - 0.05 / 3)
    assert "beyond noise" in r.message and "\n" not in r.message
    # the interval is Newcombe's hybrid score interval from edgetl.gate's Wilson bounds
    l1, u1 = wilson(200, 200, confidence=r.adjusted_confidence)
    l2, u2 = wilson(60, 100, confidence=r.adjusted_confidence)
    assert r.lower_pp == pytest.approx(100 * (0.4 - math.sqrt((1 - l1) ** 2 + (u2 - 0.6) ** 2)), abs=0.01)
    assert r.upper_pp == pytest.approx(100 * (0.4 + math.sqrt((u1 - 1) ** 2 + (0.6 - l2) ** 2)), abs=0.01)


def test_small_gaps_on_small_groups_are_noise():
    y = np.zeros(20, int)
    pred = np.r_[np.zeros(10, int), np.zeros(8, int), np.ones(2, int)]
    r = group_accuracy(y, pred, ["a"] * 10 + ["b"] * 10)
    assert r.worst == "b" and not r.flagged and "within noise" in r.message
    assert not group_accuracy(y, pred, ["a"] * 10 + ["b"] * 10, min_gap_pp=50).flagged


def test_false_alarm_rate_with_equal_groups_is_below_nominal():
    rng = np.random.default_rng(0)
    flags = 0
    trials = 400
    for _ in range(trials):
        groups = np.repeat(["a", "b", "c", "d", "e"], 40)
        correct = rng.random(200) < 0.8
        flags += group_accuracy(np.ones(200, int), correct.astype(int), groups).flagged
    assert flags / trials <= 0.07  # nominal 0.05, Bonferroni-conservative


def test_edge_cases():
    r = group_accuracy([1, 1], [1, 0], ["x", "x"])
    assert r.worst is None and not r.flagged
    r = group_accuracy([1] * 12, [1] * 10 + [0, 0], ["big"] * 10 + ["tiny"] * 2, min_group_size=5)
    assert r.worst == "big"
    with pytest.raises(ValueError):
        group_accuracy([1, 2], [1], ["a", "b"])
