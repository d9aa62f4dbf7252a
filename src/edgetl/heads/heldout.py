"""Held-out scores of good items: each item scored by a head that saw neither it nor any item of
its group.

One-class heads are fitted on good items only, so the spread of good scores (what a threshold and a
defect head's part scaling are set from) must come from items the scoring head never saw: a head
scores its own training items too well. Where items come in groups of near-copies (the overlapping
tiles of one frame), a head that saw one item of a group has seen the others, so a group is held out
whole; scoring a tile with a head that saw its neighbour tile is as optimistic as scoring it with a
head that saw the tile itself.

Two ways, by kind (:mod:`.registry`): heads with a memory of rows (patchcore, knn) score each item
on the full memory with its group's rows masked out (:func:`same_group`); the others (padim,
gaussian) are refitted on ``folds`` folds of whole groups (:func:`fold_of`, :func:`refit_scores`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

FOLDS = 5


def group_index(groups, n: int) -> np.ndarray:
    """(n,) int64 group numbers 0..G-1 (``groups`` None: every item a group of its own).

    Raises:
        ValueError: ``groups`` does not have one entry per item.
    """
    if groups is None:
        return np.arange(n, dtype=np.int64)
    g = np.asarray(groups).reshape(-1)
    if len(g) != n:
        raise ValueError(f"groups need one entry per item: {len(g)} for {n} items")
    return np.unique(g, return_inverse=True)[1].reshape(-1).astype(np.int64)


def fold_of(n: int, folds: int, seed: int | np.random.Generator, groups=None) -> np.ndarray:
    """(n,) fold of each item, every group whole in one fold: groups in a seeded random order
    dealt round-robin (folds as even as the groups allow). ``seed``: an int or a generator (drawn
    from once)."""
    g = group_index(groups, n)
    count = int(g.max()) + 1 if n else 0
    order = np.random.default_rng(seed).permutation(count)
    fold_of_group = np.empty(count, np.int64)
    fold_of_group[order] = np.arange(count) % folds
    return fold_of_group[g]


def refit_scores(
    fit_score: Callable[[np.ndarray, np.ndarray], np.ndarray],
    n: int,
    *,
    folds: int = FOLDS,
    seed: int | np.random.Generator = 0,
    groups=None,
) -> np.ndarray:
    """(n,) float32 held-out scores by ``folds``-fold refits over whole groups:
    ``fit_score(rest, held)`` fits on the items ``rest`` (indices) and returns the scores of
    ``held``. A fold with nothing left to fit on keeps 0 (one group only)."""
    fold = fold_of(n, folds, seed, groups)
    out = np.zeros(n, np.float32)
    for f in range(min(folds, n)):
        held, rest = np.nonzero(fold == f)[0], np.nonzero(fold != f)[0]
        if len(held) and len(rest):
            out[held] = fit_score(rest, held)
    return out


def same_group(groups, rows, columns) -> np.ndarray:
    """(len(rows), len(columns)) bool: item ``rows[i]`` and item ``columns[j]`` are of one group
    (``groups`` None: the same item). What a memory head masks to score an item held out."""
    rows, columns = np.asarray(rows).reshape(-1), np.asarray(columns).reshape(-1)
    if groups is None:
        return rows[:, None] == columns[None, :]
    g = np.asarray(groups).reshape(-1)
    return g[rows][:, None] == g[columns][None, :]


def group_max(scores: np.ndarray, groups, rows: np.ndarray | None = None) -> np.ndarray:
    """Per group, the maximum of its items' ``scores`` (``rows``: the items ``scores`` belong to,
    default all), groups in the order of their numbers; groups without a scored item are left out."""
    s = np.asarray(scores, np.float32).reshape(-1)
    rows = np.arange(len(s)) if rows is None else np.asarray(rows).reshape(-1)
    g = np.asarray(groups).reshape(-1)[rows]
    names, inverse = np.unique(g, return_inverse=True)
    out = np.full(len(names), -np.inf, np.float32)
    np.maximum.at(out, inverse.reshape(-1), s)
    return out
