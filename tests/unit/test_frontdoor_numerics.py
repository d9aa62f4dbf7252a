"""The one copy of each small numeric job: folds, softmax, the out-of-fold F1 of a best-F1 cut."""

from __future__ import annotations

import numpy as np

from edgetl.core.metrics import best_f1_threshold, out_of_fold_f1, softmax, stratified_folds


def test_out_of_fold_f1_is_not_the_optimistic_in_sample_figure():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(30, bool), np.ones(20, bool)]
    noise = rng.normal(size=50)  # scores that know nothing about y
    _, in_sample = best_f1_threshold(y, noise)
    assert out_of_fold_f1(y, noise) < in_sample
    separated = np.where(y, 2.0, 0.0) + 0.1 * rng.normal(size=50)
    assert out_of_fold_f1(y, separated) == 1.0
    assert out_of_fold_f1(np.array([0, 0, 1], bool), np.array([0.1, 0.2, 0.9])) is None  # one defect


def test_stratified_folds_balance_each_class_and_softmax_rows_sum_to_one():
    y = np.array([0] * 7 + [1] * 5)
    f = stratified_folds(y, 3, seed=1)
    assert all(abs(np.sum((f == k) & (y == c)) - np.sum(y == c) / 3) < 1 for k in range(3) for c in (0, 1))
    p = softmax(np.array([[1000.0, 0.0], [1.0, 1.0]]))
    assert np.allclose(p.sum(axis=1), 1) and np.allclose(p[1], 0.5) and p[0, 0] == 1.0


def test_preprocess_config_and_manifest_check_share_one_bounds_table():
    import pytest

    from edgetl.core.manifest import INTERPOLATIONS, MIN_CROP_PCT, STD_RANGE
    from edgetl.core.preprocess import _INTERPOLATION, PreprocessConfig

    assert tuple(_INTERPOLATION) == INTERPOLATIONS
    PreprocessConfig(input_size=224, crop_pct=MIN_CROP_PCT)
    for bad in ({"crop_pct": MIN_CROP_PCT / 2}, {"std": (STD_RANGE[0] / 2,) * 3}, {"input_size": 4097}):
        with pytest.raises(ValueError, match="preprocessing out of range"):
            PreprocessConfig(**{"input_size": 224, **bad})
