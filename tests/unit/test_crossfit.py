"""Out-of-fold evidence (edgetl.heads.crossfit): folds, OOF logits, head choice, temperature."""

import numpy as np
import pytest

from edgetl.heads.classification import HeadConfig, softmax
from edgetl.heads.crossfit import (
    LOO_MAX_ITEMS,
    cross_fit,
    expected_calibration_error,
    fit_temperature,
    fold_plan,
    scale_logits,
)
from edgetl.heads.training import train_head

LABELS = [f"c{i}" for i in range(4)]


def blobs(per_class, *, d=24, sep=1.5, seed=0, k=4):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, d)) * sep
    y = np.repeat(np.arange(k), per_class)
    return (means[y] + rng.normal(size=(len(y), d))).astype(np.float32), y


def test_fold_plan_tiny_data_is_leave_one_out_and_singletons_are_never_held_out():
    y = np.array([0, 0, 0, 1, 1, 2])
    plan = fold_plan(y, 3)
    assert plan.method == "leave-one-out" and plan.folds == 5
    assert plan.fold[5] == -1  # the only item of class 2: held out, its class would vanish
    assert sorted(plan.fold[:5].tolist()) == [0, 1, 2, 3, 4]


def test_fold_plan_larger_data_is_stratified_5_fold():
    y = np.repeat(np.arange(4), 30)
    plan = fold_plan(y, 4, seed=3)
    assert len(y) > LOO_MAX_ITEMS and plan.method == "stratified 5-fold"
    for c in range(4):  # every fold holds every class, 6 items each
        assert np.bincount(plan.fold[y == c], minlength=5).tolist() == [6] * 5


def test_fold_plan_keeps_groups_together_and_says_none_when_nothing_can_be_held_out():
    y = np.repeat([0, 1], 12)
    groups = [f"g{i // 3}" for i in range(24)]  # 4 groups per class
    plan = fold_plan(y, 2, groups=groups)
    assert plan.method.startswith("grouped")
    for g in set(groups):
        assert len({int(plan.fold[i]) for i in range(24) if groups[i] == g}) == 1
    none = fold_plan(np.arange(5), 5)
    assert none.folds == 0 and (none.fold == -1).all() and none.method.startswith("none")


@pytest.mark.parametrize("kind", ["prototype", "linear"])
def test_out_of_fold_logits_come_from_a_head_that_never_saw_the_item(kind):
    X, y = blobs(8, sep=0.6)
    cfg = HeadConfig(kind=kind, l2=0.1 if kind == "linear" else None)
    cf = cross_fit(X, y, LABELS, cfg=cfg, calibrate=False)
    assert cf.plan.method == "leave-one-out" and cf.scored.all()
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        alone = train_head(X[keep], y[keep], LABELS, cfg=cfg)
        ref = alone.logits(X[i : i + 1])[0]
        if kind == "prototype":  # closed form: the very same numbers up to float32 rounding
            np.testing.assert_allclose(cf.logits[i], ref, rtol=1e-4, atol=1e-4)
        elif np.diff(np.sort(ref)[-2:])[0] > 0.25:
            # linear folds share the standardisation of all rows (one row of 32 moves the mean and
            # scale by ~1/32 of a standard deviation): the same answer wherever the answer is clear
            assert np.argmax(cf.logits[i]) == np.argmax(ref)
    # the shipped head trains on all items
    assert cf.head.meta["n_train"] == len(y)


def test_kind_choice_acts_only_on_a_lead_beyond_noise_and_states_every_candidate():
    X, y = blobs(3, sep=0.9, seed=1)
    cf = cross_fit(X, y, LABELS, cfg=HeadConfig(), kinds=("prototype", "linear"))
    chosen = next(i for i, c in enumerate(cf.candidates) if c["chosen"])
    c = cf.candidates
    # the preferred (first) stays unless another leads it by more than one standard error ...
    assert chosen == 0 or c[chosen]["lead_se"] > 1
    # ... and then the best of those that do
    assert all(o["oof_score"] <= c[chosen]["oof_score"] for o in c if o["lead_se"] is not None and o["lead_se"] > 1)
    assert cf.head.kind == c[chosen]["kind"]
    assert cf.head.meta["oof"]["candidates"] == cf.candidates


def test_temperature_recovers_a_known_one():
    rng = np.random.default_rng(0)
    L = rng.normal(size=(20000, 5)) * 3.0
    y = np.array([rng.choice(5, p=p) for p in softmax(L / 2.0)])  # true probabilities: temperature 2
    s = fit_temperature(L, y)
    # 20,000 items pin a single parameter to well under a few percent (smoothing 1/(n+2) is negligible)
    assert s == pytest.approx(0.5, rel=0.05)
    P_raw, P_cal = softmax(L), softmax(s * L)
    assert expected_calibration_error(P_cal, y) < expected_calibration_error(P_raw, y)


def test_calibrated_head_is_the_same_head_with_scaled_logits_and_keeps_its_answers():
    X, y = blobs(20, sep=0.5, seed=2)
    cf = cross_fit(X, y, LABELS, cfg=HeadConfig(l2=0.01))
    s = 1.0 / cf.calibration["temperature"]
    raw = train_head(X, y, LABELS, cfg=HeadConfig(l2=0.01))
    np.testing.assert_array_equal(cf.head.predict(X), raw.predict(X))
    np.testing.assert_allclose(cf.head.logits(X), scale_logits(raw, s).logits(X), rtol=1e-4, atol=1e-4)
    assert cf.calibration["nll_after"] <= cf.calibration["nll_before"] + 1e-9


def test_a_calibrate_config_stays_calibrated_when_retrained():
    """adapt retrains with the recorded config: calibrate=True cross-fits again."""
    X, y = blobs(15, sep=0.5, seed=4)
    head = train_head(X, y, LABELS, cfg=HeadConfig(l2=0.1, calibrate=True))
    assert head.meta["calibration"]["method"] == "temperature"
    assert head.meta["temperature"] == head.meta["calibration"]["temperature"]
    plain = train_head(X, y, LABELS, cfg=HeadConfig(l2=0.1))
    assert "calibration" not in plain.meta


def test_one_item_a_class_trains_and_says_nothing_can_be_measured():
    X, y = blobs(1)
    cf = cross_fit(X, y, LABELS, cfg=HeadConfig(), kinds=("prototype", "linear"))
    assert cf.plan.folds == 0 and not cf.scored.any()
    assert cf.head.kind == "prototype"  # the preferred kind stands when nothing can score the others
    assert cf.calibration["method"] == "none" and "reason" in cf.calibration
    assert (cf.head.predict(X) == y).all()


def test_a_lead_of_one_item_does_not_replace_the_preferred_head():
    """Two candidates that differ by one item out of 80: noise, the preferred one ships."""
    from edgetl.heads.crossfit import _choose

    y = np.repeat(np.arange(4), 20)
    right = np.eye(4)[y] * 5.0
    a, b = right.copy(), right.copy()
    a[:10] = np.roll(a[:10], 1, axis=1)  # the preferred gets 10 wrong
    b[1:10] = np.roll(b[1:10], 1, axis=1)  # the other 9: one item better
    assert _choose([(None, a, 70 / 80), (None, b, 71 / 80)], y)[0] == 0
    b[:] = right  # 10 items better: far beyond one standard error
    assert _choose([(None, a, 70 / 80), (None, b, 80 / 80)], y)[0] == 1
