"""Small statistics helpers shared by the transfer modules (numpy and the standard library only)."""

from __future__ import annotations

import math

import numpy as np


def kendall_tau_b(a, b) -> float:
    """Kendall's tau-b between two score vectors (ties handled); NaN when either is constant.

    Example:
        >>> kendall_tau_b([1, 2, 3], [10, 20, 30]), kendall_tau_b([1, 2, 3], [3, 2, 1])
        (1.0, -1.0)
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("kendall_tau_b needs two 1-D vectors of equal length")
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    iu = np.triu_indices(len(a), 1)
    da, db = da[iu], db[iu]
    concordant_minus_discordant = float(np.sum(da * db))
    na, nb = float(np.sum(da != 0)), float(np.sum(db != 0))
    if na == 0 or nb == 0:
        return float("nan")
    return concordant_minus_discordant / math.sqrt(na * nb)


def unpaired_difference(k1: int, n1: int, k2: int, n2: int, wilson, *, confidence: float) -> tuple[float, float, float]:
    """(p1 - p2, lower, upper) for two independent proportions: Newcombe's hybrid score interval
    (the paired version without the correlation term), built from ``wilson(k, n, confidence=...)``
    bounds, each one-sided at ``confidence``."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, confidence=confidence)
    l2, u2 = wilson(k2, n2, confidence=confidence)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def grouped_folds(y: np.ndarray, groups: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index per row with every group whole in one fold, class counts balanced greedily.

    Groups go largest first (ties in a seeded order) to the fold that holds the fewest rows of the
    group's majority class, then the fewest rows overall.
    """
    rng = np.random.default_rng(seed)
    names, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    if len(names) < folds:
        raise ValueError(f"{len(names)} groups cannot fill {folds} folds")
    classes = np.unique(y)
    cidx = np.searchsorted(classes, y)
    sizes = np.bincount(inverse, minlength=len(names))
    majority = np.array([np.bincount(cidx[inverse == g], minlength=len(classes)).argmax() for g in range(len(names))])
    order = rng.permutation(len(names))
    order = order[np.argsort(-sizes[order], kind="stable")]
    per_class = np.zeros((folds, len(classes)), np.int64)
    total = np.zeros(folds, np.int64)
    fold_of_group = np.empty(len(names), np.int64)
    for g in order:
        f = min(range(folds), key=lambda j: (per_class[j, majority[g]], total[j], j))
        fold_of_group[g] = f
        per_class[f] += np.bincount(cidx[inverse == g], minlength=len(classes))
        total[f] += sizes[g]
    return fold_of_group[inverse]


def train_linear_head(
    X: np.ndarray, y: np.ndarray, n_classes: int, *, kind: str = "linear", seed: int = 0, l2: float | None = None
):
    """edgetl's own head trainer on integer labels 0..n_classes-1 (automatic L2 unless given)."""
    from ..heads.classification import HeadConfig
    from ..heads.training import train_head

    return train_head(
        np.asarray(X, np.float32),
        np.asarray(y, np.int64),
        [f"c{i}" for i in range(n_classes)],
        cfg=HeadConfig(kind=kind, seed=seed, l2=l2),
    )
