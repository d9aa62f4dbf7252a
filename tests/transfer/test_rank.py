"""Backbone ranking: cross-validated accuracy (stratified and grouped folds), Kendall's tau, the choice rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgetl.core.metrics import stratified_folds
from edgetl.transfer import kendall_tau_b, rank_backbones
from edgetl.transfer._stats import grouped_folds
from edgetl.transfer.rank import choose_backbone, cv_accuracy, score_backbones


def _features(n_per_class: int, k: int, strength: float, d: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), n_per_class)
    centres = rng.normal(size=(k, d))
    return (strength * centres[y] + rng.normal(size=(len(y), d))).astype(np.float32), y


def test_kendall_tau_b():
    assert kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau_b([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert kendall_tau_b([1, 2, 3], [1, 1, 2]) == pytest.approx(2 / math.sqrt(6))  # tie-corrected
    assert math.isnan(kendall_tau_b([1, 2, 3], [5, 5, 5]))


def test_folds_are_stratified_and_groups_stay_whole():
    y = np.repeat([0, 1, 2], [20, 13, 7])
    f = stratified_folds(y, 5, seed=0)
    for c in range(3):
        counts = np.bincount(f[y == c], minlength=5)
        assert counts.max() - counts.min() <= 1
    groups = np.array([f"{c}-{i // 4}" for i, c in enumerate(y)])  # runs of 4 rows of one class
    g = grouped_folds(y, groups, 3, seed=0)
    for name in np.unique(groups):
        assert len(np.unique(g[groups == name])) == 1
    assert len(np.unique(g)) == 3


def test_cv_accuracy_extremes():
    X, y = _features(30, 3, strength=6.0)
    cv = cv_accuracy(X, y)
    assert cv.accuracy == 1.0 and cv.lower > 0.9 and cv.n == 90 and cv.correct.all()
    rng = np.random.default_rng(1)
    chance = cv_accuracy(rng.normal(size=(90, 32)).astype(np.float32), y)
    assert chance.lower < 1 / 3 < chance.upper or chance.accuracy < 0.5


def test_grouped_folds_expose_memorised_groups():
    """Each group is a tight cluster with a random label: a stratified split memorises groups, grouped folds do not."""
    rng = np.random.default_rng(0)
    n_groups, per = 24, 6
    centres = rng.normal(size=(n_groups, 32)) * 3
    group_label = np.arange(n_groups) % 2
    rng.shuffle(group_label)
    rows = np.repeat(np.arange(n_groups), per)
    X = (centres[rows] + 0.05 * rng.normal(size=(len(rows), 32))).astype(np.float32)
    y, groups = group_label[rows], np.array([f"g{r}" for r in rows])
    assert cv_accuracy(X, y).accuracy > 0.95
    grouped = cv_accuracy(X, y, groups)
    assert grouped.grouped and grouped.accuracy < 0.8 and grouped.lower < 0.5


def _scores(strengths: dict, latency: dict, seed: int = 0):
    feats = {}
    y = None
    for name, s in strengths.items():
        X, y = _features(25, 4, strength=s, seed=seed)
        feats[name] = X
    return score_backbones(feats, y, latency_ms=latency, seed=seed, bootstrap=20)


def test_cheaper_backbone_chosen_within_noise():
    rng = np.random.default_rng(2)
    X, y = _features(25, 4, strength=1.0)
    feats = {"lite0": X, "lite2": X + 0.02 * rng.normal(size=X.shape).astype(np.float32)}
    lat = {"lite0": 5.0, "lite2": 12.0}
    for by in ("cv", "logme"):
        r = rank_backbones(feats, y, latency_ms=lat, by=by, bootstrap=20)
        assert r.choice == "lite0", r.reason
        assert len(r.table) == 2 and {row["backbone"] for row in r.table} == {"lite0", "lite2"}


def test_clearly_better_dearer_backbone_is_chosen_and_budget_respected():
    scores = _scores({"cheap": 0.25, "dear": 3.0}, {"cheap": 4.0, "dear": 15.0})
    for by in ("cv", "logme"):
        r = choose_backbone(scores, by=by)
        assert r.choice == "dear" and r.comparisons[0]["leader_shown_better"], r.reason
        limited = choose_backbone(scores, by=by, budget_ms=10.0)
        assert limited.choice == "cheap"
        assert [row["within_budget"] for row in limited.table if row["backbone"] == "dear"] == [False]
    nothing = choose_backbone(scores, by="cv", budget_ms=1.0)
    assert nothing.choice == "cheap" and "no backbone meets" in nothing.reason


def test_without_latencies_the_leader_is_chosen():
    scores = _scores({"a": 0.25, "b": 3.0}, {})
    r = choose_backbone(scores)
    assert r.choice == r.leader == "b"
    assert r.table[0]["backbone"] == "b" and r.table[0]["rank"] == 1
    assert "b" in r.format()


def test_bad_input():
    X, y = _features(5, 2, strength=1.0)
    with pytest.raises(ValueError):
        rank_backbones({"a": X[:-1]}, y)
    with pytest.raises(ValueError):
        cv_accuracy(X, np.zeros(len(y)))
    with pytest.raises(ValueError):
        choose_backbone(score_backbones({"a": X}, y, use_cv=False, bootstrap=0), by="cv")
