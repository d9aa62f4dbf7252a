"""Negative-transfer check: the paired decision, the pixel baseline, and (slow) the real backbone on
spectrograms (warning) and edgetl's built-in example (silent)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgetl.datasets.synthetic import noise_textures, pixel_noise, spectrograms
from edgetl.transfer.negative import compare_to_baseline, pixel_baseline_features, transfer_check


def test_verdicts_on_paired_outcomes():
    helps = transfer_check([1] * 95 + [0] * 5, [1] * 60 + [0] * 40)
    assert helps.verdict == "helps" and not helps.warn and helps.message == ""
    neg = transfer_check([1] * 40 + [0] * 60, [1] * 90 + [0] * 10, backbone="lite0")
    assert neg.verdict == "negative" and neg.warn and neg.upper_pp < 0
    assert "\n" not in neg.message and "lite0" in neg.message and "edgetl rank" in neg.message
    tie = transfer_check([1] * 50 + [0] * 50, [1] * 48 + [0] * 52)
    assert tie.verdict == "no clear gain" and tie.warn and tie.lower_pp <= 0 <= tie.upper_pp
    # a margin turns a small but real gain into "no clear gain"
    small = transfer_check([1] * 400 + [0] * 100, [1] * 370 + [0] * 130)
    assert small.verdict == "helps"
    assert transfer_check([1] * 400 + [0] * 100, [1] * 370 + [0] * 130, margin_pp=10).verdict == "no clear gain"
    with pytest.raises(ValueError):
        transfer_check([1, 0], [1])


def test_pixel_baseline_features_shapes_and_inputs():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    rgba = np.dstack([rgb, np.full((50, 70), 255, np.uint8)])
    floats = rgb / 255.0
    F = pixel_baseline_features([rgb, grey, rgba, floats, Image.fromarray(rgb)])
    assert F.shape == (5, 3 * 16 * 16 + 16 + 24) and F.dtype == np.float32 and np.all(np.isfinite(F))
    np.testing.assert_array_equal(F[0], F[2])  # alpha dropped
    np.testing.assert_allclose(F[0], F[3], atol=1e-6)  # [0, 1] floats scaled
    np.testing.assert_array_equal(F[0], F[4])  # PIL image
    assert pixel_baseline_features([]).shape == (0, 808)


def _split(y, per_class, seed=0):
    rng = np.random.default_rng(seed)
    tr = np.zeros(len(y), bool)
    for c in np.unique(y):
        tr[rng.choice(np.flatnonzero(y == c), per_class, replace=False)] = True
    return tr


def test_warning_fires_when_the_features_know_nothing():
    imgs, y = spectrograms(30, seed=0)
    B = pixel_baseline_features(imgs)
    useless = np.random.default_rng(1).normal(size=(len(y), 64)).astype(np.float32)
    tr = _split(y, 15)
    chk = compare_to_baseline(useless[tr], useless[~tr], B[tr], B[~tr], y[tr], y[~tr], backbone="random features")
    assert chk.verdict == "negative" and chk.baseline_accuracy > 0.8
    # and stays silent when the features carry the labels
    good = np.eye(8)[y] * 4 + np.random.default_rng(2).normal(size=(len(y), 8))
    ok = compare_to_baseline(good[tr], good[~tr], useless[tr], useless[~tr], y[tr], y[~tr])
    assert ok.verdict == "helps"


def test_synthetic_generators_are_deterministic():
    for fn in (spectrograms, noise_textures, pixel_noise):
        a, ya = fn(2, seed=3)
        b, yb = fn(2, seed=3)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ya, yb)
        assert a.dtype == np.uint8 and a.shape[1:] == (64, 64, 3)


@pytest.mark.slow
def test_real_backbone_warns_on_spectrograms_and_not_on_the_example(tmp_path, cache_dir):
    """EfficientNet-Lite0 (FP32 ONNX Runtime): negative transfer on spectrograms, none on `surfaces`."""
    import benchmarks._shared as F
    from edgetl.datasets.images import make_surfaces

    imgs, y = spectrograms(24, seed=0)
    paths = []
    for i, (a, c) in enumerate(zip(imgs, y)):
        p = tmp_path / "spectro" / f"{c}_{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(p)
        paths.append(p)
    X = F.backbone_features(paths, "efficientnet_lite0", cache_dir=cache_dir)
    B = pixel_baseline_features(imgs)
    tr = _split(y, 12)
    chk = compare_to_baseline(X[tr], X[~tr], B[tr], B[~tr], y[tr], y[~tr], backbone="efficientnet_lite0")
    assert chk.warn and chk.verdict == "negative", chk

    root = tmp_path / "surfaces"
    make_surfaces(root, seed=0, per_class=24, val_per_class=12)
    ds = F.image_folder(root)
    Xtr = F.backbone_features(ds["train_paths"], "efficientnet_lite0", cache_dir=cache_dir)
    Xva = F.backbone_features(ds["val_paths"], "efficientnet_lite0", cache_dir=cache_dir)
    Btr = pixel_baseline_features(F.read_rgb(p) for p in ds["train_paths"])
    Bva = pixel_baseline_features(F.read_rgb(p) for p in ds["val_paths"])
    ok = compare_to_baseline(Xtr, Xva, Btr, Bva, ds["y_train"], ds["y_val"], backbone="efficientnet_lite0")
    assert not ok.warn, ok.message
