"""Held-out scores of good items with a group left out together (:mod:`edgetl.heads.heldout`): an item
is never scored by a head that saw an item of its group, and the tiled defect fit normalises on them."""

from __future__ import annotations

import numpy as np
import pytest

from edgetl.heads.defect import DefectConfig, fit_defect_head, held_out_patch_scores
from edgetl.heads.heldout import fold_of, group_max, refit_scores, same_group
from edgetl.heads.oneclass import ImageConfig, held_out_scores
from edgetl.heads.patch import AnomalyConfig

SHAPE = (6, 8, 8)  # patch part of a feature row: (C, H, W)
D = 24  # pooled part
SIZE = 32
TILES = 4


def _near_copies(groups: int, per: int, width: int, seed: int, jitter: float = 1e-3) -> np.ndarray:
    """``groups`` groups of ``per`` near-identical rows (as the overlapping tiles of one frame)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((groups, width)).astype(np.float32)
    return (np.repeat(base, per, axis=0) + jitter * rng.standard_normal((groups * per, width))).astype(np.float32)


def _frames(n: int, seed: int) -> np.ndarray:
    """Feature rows of ``n`` frames of :data:`TILES` tiles each, a frame's tiles near copies."""
    return _near_copies(n, TILES, int(np.prod(SHAPE)) + D, seed, jitter=0.05)


def test_folds_keep_groups_whole_and_refits_never_see_the_held_group():
    groups = np.repeat(np.arange(13), 3)[np.random.default_rng(1).permutation(39)]
    fold = fold_of(len(groups), 5, 0, groups)
    for g in np.unique(groups):
        assert len(set(fold[groups == g])) == 1
    assert sorted(np.bincount(fold).tolist()) == [6, 6, 9, 9, 9]  # groups dealt evenly
    seen = []

    def fit_score(rest, held):
        assert not set(groups[rest]) & set(groups[held])
        seen.extend(held.tolist())
        return np.ones(len(held), np.float32)

    assert np.all(refit_scores(fit_score, len(groups), folds=5, seed=0, groups=groups) == 1)
    assert sorted(seen) == list(range(len(groups)))
    # without groups each item is a group of its own: the folds are the old ones (a seeded deal)
    order = np.random.default_rng(3).permutation(10)
    expected = np.empty(10, np.int64)
    expected[order] = np.arange(10) % 5
    np.testing.assert_array_equal(fold_of(10, 5, 3), expected)


def test_same_group_and_group_max():
    g = np.array([0, 0, 1, 2, 2])
    np.testing.assert_array_equal(same_group(g, [0, 2], np.arange(5)), [[1, 1, 0, 0, 0], [0, 0, 1, 0, 0]])
    np.testing.assert_array_equal(same_group(None, [1], np.arange(3)), [[0, 1, 0]])
    np.testing.assert_array_equal(group_max([1, 5, 2, 3, 0], g), [5, 2, 3])
    np.testing.assert_array_equal(group_max([4, 7], g, rows=[0, 3]), [4, 7])


@pytest.mark.parametrize("kind", ["knn", "gaussian"])
def test_grouped_image_scores_are_far_above_the_leaky_ungrouped_ones(kind):
    # near-copies: a head that saw a sibling scores an item as if it had seen the item itself
    Z = _near_copies(12, 4, 16, seed=0)
    groups = np.repeat(np.arange(12), 4)
    loose = held_out_scores(Z, ImageConfig(kind), seed=0)
    grouped = held_out_scores(Z, ImageConfig(kind), seed=0, groups=groups)
    assert np.all(grouped > loose)
    # knn's nearest row is a sibling; gaussian's mean and covariance are pulled towards the item
    factor = 5 if kind == "knn" else 1.5
    assert float(np.median(grouped)) > factor * float(np.median(loose)), (np.median(grouped), np.median(loose))
    if kind == "knn":  # leave one group out on the full memory: the nearest rows of other groups
        d = np.sqrt(((Z[:, None] - Z[None]) ** 2).sum(-1))
        d[groups[:, None] == groups[None, :]] = np.inf
        np.testing.assert_allclose(grouped, np.sort(d, axis=1)[:, :2].mean(1), rtol=1e-4)
        assert np.all(grouped > 10 * loose.max())


@pytest.mark.parametrize("kind", ["patchcore", "padim"])
def test_grouped_patch_scores_are_far_above_the_leaky_ungrouped_ones(kind):
    F = _near_copies(12, 4, int(np.prod(SHAPE)), seed=1).reshape(-1, *SHAPE)
    groups = np.repeat(np.arange(12), 4)
    cfg = AnomalyConfig(kind=kind, coreset_ratio=1.0) if kind == "patchcore" else AnomalyConfig(kind=kind)
    rows = np.arange(len(F))
    _, picked, loose = held_out_patch_scores(F, cfg, size=SIZE, rows=rows)
    _, picked_g, grouped = held_out_patch_scores(F, cfg, size=SIZE, groups=groups, rows=rows)
    np.testing.assert_array_equal(picked, picked_g)
    assert np.all(grouped > loose)
    factor = 3 if kind == "patchcore" else 1.1  # a bank's nearest patch vs a Gaussian pulled towards the item
    assert float(np.median(grouped)) > factor * float(np.median(loose)), (np.median(grouped), np.median(loose))


def test_tiled_fit_normalises_on_held_out_frames():
    # a frame's tiles nearly repeat each other; fitted without the frames, every good tile has a
    # near copy in the memory and the held-out spread says nothing about a new frame
    X, fresh = _frames(30, seed=2), _frames(40, seed=3)
    groups = np.repeat(np.arange(30), TILES)
    cfg = DefectConfig(patch=AnomalyConfig(coreset_ratio=1.0))
    head = fit_defect_head(X, cfg, patch_shape=SHAPE, size=SIZE, groups=groups)
    leaky = fit_defect_head(X, cfg, patch_shape=SHAPE, size=SIZE)
    assert head.meta == {"images": 120, "frames": 30} and "frames" not in leaky.meta
    parts = head.part_scores(fresh)
    for part in ("patch", "image"):
        frame = parts[part].reshape(-1, TILES).max(axis=1)  # the device's frame score: the max over tiles
        mu, sd = head.norm[part]
        z = (frame - mu) / sd
        assert abs(float(np.mean(z))) < 1.0 and 0.3 < float(np.std(z)) < 3.0, (part, z.mean(), z.std())
        mu_l, sd_l = leaky.norm[part]
        assert float(np.mean((frame - mu_l) / sd_l)) > 5, part  # what the leak did
    # the combined score of new good frames sits where untiled good images do: about c + 0.7
    c = max(m / s for m, s in head.norm.values())
    frames = head.maps(fresh)[1].reshape(-1, TILES).max(axis=1)
    assert abs(float(np.median(frames)) - c - 0.7) < 1.0
    with pytest.raises(Exception, match="one entry per feature row"):
        fit_defect_head(X, cfg, patch_shape=SHAPE, size=SIZE, groups=groups[:-1])


def test_tiled_patch_normalisation_scores_whole_frames_within_a_tile_budget():
    from edgetl.heads.defect import MAX_NORM_IMAGES, MAX_NORM_TILES, MIN_NORM_FRAMES, norm_rows

    few = np.repeat(np.arange(30), 4)
    np.testing.assert_array_equal(norm_rows(few, 0), np.arange(120))  # every frame, every tile
    many = np.repeat(np.arange(200), 16)
    rows = norm_rows(many, 0)
    frames, counts = np.unique(many[rows], return_counts=True)
    assert np.all(counts == 16) and len(frames) == max(MAX_NORM_TILES // 16, MIN_NORM_FRAMES)
    assert len(np.unique(norm_rows(np.repeat(np.arange(200), 2), 0) // 2)) == MAX_NORM_IMAGES
