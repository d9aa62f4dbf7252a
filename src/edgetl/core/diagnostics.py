"""What a small dataset can hide from its own validation figure, measured on cached features.

:func:`near_duplicates` finds validation items whose nearest training item is a near-copy: the
same part filmed twice, consecutive frames, a re-saved file. A random split of such data puts one
copy on each side, and validation accuracy then measures memorisation (a materials set scored
97-100 % on its random validation split and 35-43 % on textures it had not seen).

Similarity is the cosine of *centred* features (the training mean subtracted): a frozen ImageNet
backbone's pooled ReLU features are all positive, so raw cosines of unrelated images are already
0.7-0.98 (upscaled handwritten digits: 0.98 between different writers), while centring removes
what every image of the dataset shares. Measured with EfficientNet-Lite0 (fraction of validation
items at or above each centred cosine): frames of the same image shifted 2-8 px and re-lit +-8 %
85 % >= 0.88, 80 % >= 0.90; disjoint regions of one photograph (the built-in example) 2 % / 1 %;
different writers of one digit 8 % / 5 %. Hence :data:`NEAR_COPY_COSINE` = 0.90, and a warning
when a quarter of the validation items or more are near-copies.

numpy only.
"""

from __future__ import annotations

import numpy as np

NEAR_COPY_COSINE = 0.90
# Warn when at least this share of validation items has a near-copy in training.
LEAK_WARN_FRACTION = 0.25


def _unit(X: np.ndarray) -> np.ndarray:
    return X / (np.linalg.norm(X, axis=1, keepdims=True) + 1e-12)


def near_duplicates(
    X_train: np.ndarray,
    X_val: np.ndarray,
    *,
    names_train=None,
    names_val=None,
    threshold: float = NEAR_COPY_COSINE,
    examples: int = 3,
) -> dict:
    """How many validation rows have a near-copy among the training rows.

    Returns:
        ``{"checked", "near_copies", "fraction", "threshold", "warn", "examples": [{"val", "train",
        "cosine"}...]}`` (examples are the closest pairs, named when names are given).

    Example:
        >>> rng = np.random.default_rng(0); T = rng.random((50, 8))
        >>> near_duplicates(T, T[:10] + 1e-3)["fraction"]
        1.0
    """
    X_train = np.asarray(X_train, np.float32)
    X_val = np.asarray(X_val, np.float32)
    if not len(X_train) or not len(X_val):
        return {
            "checked": int(len(X_val)),
            "near_copies": 0,
            "fraction": 0.0,
            "threshold": threshold,
            "warn": False,
            "examples": [],
        }
    mu = X_train.mean(axis=0, keepdims=True)
    T, V = _unit(X_train - mu), _unit(X_val - mu)
    nn_sim = np.empty(len(V), np.float32)
    nn_idx = np.empty(len(V), np.int64)
    for start in range(0, len(V), 512):  # bounded memory for large validation sets
        S = V[start : start + 512] @ T.T
        nn_idx[start : start + 512] = S.argmax(axis=1)
        nn_sim[start : start + 512] = S.max(axis=1)
    hits = nn_sim >= threshold
    order = np.argsort(-nn_sim)[: min(examples, int(hits.sum()))]
    name = lambda names, i: str(names[i]) if names is not None else int(i)  # noqa: E731
    return {
        "checked": int(len(V)),
        "near_copies": int(hits.sum()),
        "fraction": round(float(hits.mean()), 4),
        "threshold": threshold,
        "warn": bool(hits.mean() >= LEAK_WARN_FRACTION),
        "examples": [
            {"val": name(names_val, i), "train": name(names_train, nn_idx[i]), "cosine": round(float(nn_sim[i]), 4)}
            for i in order
        ],
    }


def near_duplicates_across_folds(
    X: np.ndarray, fold: np.ndarray, *, names=None, threshold: float = NEAR_COPY_COSINE, examples: int = 3
) -> dict:
    """:func:`near_duplicates` for out-of-fold scoring: how many held-out rows (``fold >= 0``)
    have a near-copy among the rows their fold's head trained on (every other fold, and the rows
    never held out, ``fold == -1``). Same keys, plus ``"folds": True``."""
    X = np.asarray(X, np.float32)
    fold = np.asarray(fold)
    held = np.flatnonzero(fold >= 0)
    if not len(held) or len(X) < 2:
        return {
            "checked": int(len(held)),
            "near_copies": 0,
            "fraction": 0.0,
            "threshold": threshold,
            "warn": False,
            "examples": [],
            "folds": True,
        }
    U = _unit(X - X.mean(axis=0, keepdims=True))
    nn_sim = np.full(len(held), -np.inf, np.float32)
    nn_idx = np.zeros(len(held), np.int64)
    for start in range(0, len(held), 512):
        rows = held[start : start + 512]
        S = U[rows] @ U.T
        S[fold[rows][:, None] == fold[None, :]] = -np.inf  # the same fold (itself included) is not trained on
        nn_idx[start : start + 512] = S.argmax(axis=1)
        nn_sim[start : start + 512] = S.max(axis=1)
    hits = nn_sim >= threshold
    order = np.argsort(-nn_sim)[: min(examples, int(hits.sum()))]
    name = lambda i: str(names[i]) if names is not None else int(i)  # noqa: E731
    return {
        "checked": int(len(held)),
        "near_copies": int(hits.sum()),
        "fraction": round(float(hits.mean()), 4),
        "threshold": threshold,
        "warn": bool(hits.mean() >= LEAK_WARN_FRACTION),
        "folds": True,
        "examples": [
            {"val": name(held[i]), "train": name(nn_idx[i]), "cosine": round(float(nn_sim[i]), 4)} for i in order
        ],
    }


def leakage_message(leak: dict, *, grouped: bool, items: str = "images") -> str:
    """The one-line warning for a split whose validation items have near-copies in training."""
    what = "out-of-fold" if leak.get("folds") else "validation"
    head = (
        f"{leak['near_copies']} of {leak['checked']} {what} {items} have a near-copy in training "
        f"(centred feature cosine >= {leak['threshold']:.2f}), so the {what} figure may measure memorisation"
    )
    if grouped:
        return head + " even with the grouped split; check that each group holds one part / session / source"
    return head + (
        "; split by group: put each part or session in its own folder DATA/<class>/<group>/, "
        "add a group column to the CSV, or pass --group-by"
    )
