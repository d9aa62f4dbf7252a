"""Drift on the device: the stored arrays, calibrated per-image p-values, the folder test's level and power,
per-class tests, and the no-torch path."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from edgetl.transfer.drift import (
    DRIFT_ARRAYS,
    DriftReference,
    drift_summary,
    fit_drift_reference,
    load_drift_reference,
    save_drift_reference,
)

D, K = 48, 3


class Mixture:
    """Three Gaussian classes in D dimensions with a low-rank within-class structure plus isotropic noise."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.means = rng.normal(size=(K, D)) * 2
        self.basis = rng.normal(size=(D, 6))
        self.rng = np.random.default_rng(seed + 100)

    def draw(self, n, shift=None, seed=None):
        rng = self.rng if seed is None else np.random.default_rng(seed)
        y = rng.integers(0, K, n)
        X = self.means[y] + rng.normal(size=(n, 6)) @ self.basis.T + 0.5 * rng.normal(size=(n, D))
        if shift is not None:
            X = shift(X, y)
        return X.astype(np.float32), y


@pytest.fixture(scope="module")
def world():
    m = Mixture()
    X, y = m.draw(400, seed=1)
    Xc, yc = m.draw(300, seed=2)
    return m, fit_drift_reference(X, y, X_cal=Xc, y_cal=yc, rank=8)


def test_arrays_are_exactly_the_documented_ones(world, tmp_path):
    _, ref = world
    path = save_drift_reference(ref, tmp_path / "drift.npz")
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == sorted(DRIFT_ARRAYS)
        shapes = {"k": K, "d": D, "r": 8, "m": 300}
        for name, (shape, dtype) in DRIFT_ARRAYS.items():
            assert z[name].dtype == np.dtype(dtype), name
            assert z[name].shape == tuple(shapes.get(s, s) for s in shape), name
    back = load_drift_reference(path)
    X = world[0].draw(20, seed=5)[0]
    np.testing.assert_array_equal(back.score(X).score, ref.score(X).score)


def test_corrupt_references_are_refused(world, tmp_path):
    _, ref = world
    bad = dict(ref.arrays)
    bad["components"] = bad["components"][:, :3]
    p = tmp_path / "bad.npz"
    np.savez(p, **bad)
    with pytest.raises(ValueError, match="shape"):
        load_drift_reference(p)
    missing = {k: v for k, v in ref.arrays.items() if k != "scale"}
    np.savez(p, **missing)
    with pytest.raises(ValueError, match="missing scale"):
        load_drift_reference(p)
    nan = dict(ref.arrays)
    nan["class_means"] = nan["class_means"].copy()
    nan["class_means"][0, 0] = np.nan
    np.savez(p, **nan)
    with pytest.raises(ValueError, match="finite"):
        load_drift_reference(p)
    with pytest.raises(ValueError, match="expects"):
        ref.score(np.zeros((2, D + 1), np.float32))


def test_image_false_alarms_are_at_the_nominal_level():
    """Conformal p-values: over fresh calibration sets, the ood rate on unshifted data is alpha."""
    m = Mixture(seed=1)
    rates = {0.01: [], 0.05: []}
    for rep in range(6):
        X, y = m.draw(300)
        Xc, yc = m.draw(200)
        ref = fit_drift_reference(X, y, X_cal=Xc, y_cal=yc, rank=8, seed=rep)
        Xt, _ = m.draw(2000)
        for a in rates:
            rates[a].append(ref.score(Xt, image_alpha=a).ood.mean())
    assert abs(np.mean(rates[0.01]) - 0.01) < 0.006
    assert abs(np.mean(rates[0.05]) - 0.05) < 0.015


def _redrawn(ref, X, y):
    """The same description with other reference images (what a fresh validation split would give)."""
    s, W = ref.coordinates(X)
    return DriftReference(
        dict(
            ref.arrays, ref_scores=s.astype(np.float32), ref_coords=W.astype(np.float32), ref_labels=y.astype(np.int32)
        )
    )


def test_folder_false_alarm_rate_near_nominal_and_power(world):
    m, ref = world
    # The permutation test's level holds over draws of reference and folder: re-draw both each time.
    p_clean = []
    for i in range(200):
        Xr, yr = m.draw(100, seed=5000 + i)
        p_clean.append(
            drift_summary(_redrawn(ref, Xr, yr), m.draw(20, seed=1000 + i)[0], permutations=100, seed=i).p_value
        )
    far = np.mean(np.array(p_clean) < 0.05)
    assert 0.02 <= far <= 0.09, far  # nominal 0.05; binomial sd over 200 folders is 0.015
    moved = lambda X, y: X + 1.5 * m.basis[:, 0]  # 1.5 sd along the strongest within-class direction
    outside = lambda X, y: X + 2.0 * np.random.default_rng(5).normal(size=X.shape)  # off the subspace
    p_moved = [
        drift_summary(ref, m.draw(20, moved, seed=2000 + i)[0], permutations=200, seed=i).p_value for i in range(20)
    ]
    assert np.mean(np.array(p_moved) < 0.05) >= 0.9
    s = drift_summary(ref, m.draw(30, outside, seed=3000)[0], permutations=200)
    assert s.verdict == "severe" and s.adapt_advisable and s.ood_fraction > 0.5
    clean = drift_summary(ref, m.draw(40, seed=3001)[0], permutations=200, seed=3)
    assert clean.verdict in ("none", "mild") and "\n" not in clean.message


def test_per_class_drift_names_the_class(world):
    m, ref = world
    shift0 = lambda X, y: X + (y == 0)[:, None] * 3.0 * np.random.default_rng(9).normal(size=X.shape)
    X, y = m.draw(150, shift0, seed=11)
    s = drift_summary(ref, X, y, permutations=300)
    by_class = {pc["class"]: pc for pc in s.per_class}
    assert by_class[0]["p_adjusted"] < 0.05
    assert by_class[1]["p_adjusted"] > 0.05 and by_class[2]["p_adjusted"] > 0.05
    assert "classes drifted: 0" in s.message


def test_fit_without_calibration_rows_and_unlabelled():
    m = Mixture(seed=2)
    X, y = m.draw(200)
    ref = fit_drift_reference(X, y)  # 30 % of each class held out for calibration
    assert 50 <= ref.n_reference <= 70 and set(np.unique(ref.arrays["ref_labels"])) <= {0, 1, 2}
    one = fit_drift_reference(X)  # no labels: one class
    assert one.n_classes == 1 and (one.arrays["ref_labels"] == -1).all()
    with pytest.raises(ValueError, match="no training rows"):
        fit_drift_reference(X, y, n_classes=4)


def test_scoring_a_frame_costs_what_the_shapes_say_not_the_training_set():
    """A frame's drift score is one (d, r) projection and k class means: its arithmetic is fixed by
    the stored shapes, whatever the number of training rows (the reference scores are only searched,
    log m). Counted, not timed: a wall-clock figure measures the machine's load as much as the code.
    EfficientNet-Lite0's forward pass is ~0.4 GMAC; a drift score must stay far below that."""
    rng = np.random.default_rng(0)
    for n in (400, 800):
        X = rng.random((n, 1280), dtype=np.float32)
        y = rng.integers(0, 10, n)
        ref = fit_drift_reference(X, y, rank=32)
        assert ref.arrays["components"].shape == (1280, 32) and ref.arrays["class_means"].shape == (10, 1280)
        macs = ref.dim * (ref.rank + ref.n_classes) + 3 * ref.n_classes * ref.rank
        assert macs < 0.4e9 / 1000, macs  # under a thousandth of the backbone
        # a frame alone scores as it does among others: nothing of a frame's score depends on the batch
        batch = ref.score(X[:64]).score
        alone = np.array([ref.score(X[i : i + 1]).score[0] for i in range(8)])
        np.testing.assert_allclose(alone, batch[:8], rtol=1e-4)


def test_no_torch_anywhere_in_the_package(no_torch_env, tmp_path, world):
    """drift and groups (device side) and rank / negative (fit side) all run where torch cannot import."""
    path = save_drift_reference(world[1], tmp_path / "drift.npz")
    code = (
        "import sys, numpy as np\n"
        "from edgetl.transfer.drift import load_drift_reference, drift_summary\n"
        "from edgetl.transfer.groups import group_accuracy\n"
        f"ref = load_drift_reference({str(path)!r})\n"
        f"s = drift_summary(ref, np.zeros((5, {D}), np.float32), permutations=50)\n"
        "g = group_accuracy([0, 0, 1, 1], [0, 1, 1, 1], ['a', 'a', 'b', 'b'])\n"
        "assert 'torch' not in sys.modules and 'scipy' not in sys.modules, sorted(sys.modules)\n"
        "from edgetl.transfer import rank_backbones, compare_to_baseline, pixel_baseline_features\n"
        "rng = np.random.default_rng(0); y = np.repeat([0, 1], 20); X = np.eye(2)[y] * 3 + rng.normal(size=(40, 2))\n"
        "r = rank_backbones({'a': X, 'b': X + 0.1}, y, latency_ms={'a': 1, 'b': 2}, bootstrap=5)\n"
        "c = compare_to_baseline(X[::2], X[1::2], X[::2] * 0, X[1::2] * 0, y[::2], y[1::2])\n"
        "pixel_baseline_features([np.zeros((8, 8, 3), np.uint8)])\n"
        "assert 'torch' not in sys.modules, 'rank / negative imported torch'\n"
        "print(s.verdict, g.worst, r.choice, c.verdict)\n"
    )
    import os

    env = dict(os.environ, **no_torch_env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["severe", "a", "a", "helps"]


def test_out_of_fold_reference_uses_every_item_and_stays_calibrated():
    """Every training item a reference image, scored by a description fitted without its fold:
    the p-value floor is 1 / (n + 1), and in-distribution inputs are flagged at about the level."""
    from edgetl.heads.crossfit import fold_plan

    mix = Mixture(seed=3)
    X, y = mix.draw(200, seed=1)
    ref = fit_drift_reference(X, y, n_classes=K, oof_folds=fold_plan(y, K).fold)
    assert ref.n_reference == 200
    X_new, _ = mix.draw(4000, seed=2)
    rate = ref.score(X_new, image_alpha=0.01).ood.mean()
    # 1 % expected; the reference's own 200 draws move the realised rate (Beta(2, 199)-like spread,
    # sd about 0.7 points): 4 sd of room, and the tail rule may add at most 1 / 201 on top
    assert rate < 0.01 + 4 * 0.007 + 1 / 201, rate


def test_far_inputs_are_flagged_even_with_few_references():
    """40 references: the conformal p-value alone stops at 1/41 (nothing could be flagged at 1 %);
    past the largest reference the fitted tail takes over."""
    from edgetl.heads.crossfit import fold_plan

    mix = Mixture(seed=4)
    X, y = mix.draw(40, seed=1)
    ref = fit_drift_reference(X, y, n_classes=K, oof_folds=fold_plan(y, K).fold)
    assert ref.n_reference == 40 and 1 / 41 > 0.01
    far = mix.draw(50, seed=5)[0] + 25.0 * np.random.default_rng(6).normal(size=(50, D)).astype(np.float32)
    assert ref.score(far, image_alpha=0.01).ood.mean() >= 0.9
