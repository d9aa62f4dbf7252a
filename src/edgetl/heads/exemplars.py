"""The replay memory: a few feature vectors per class kept in the bundle, so the device can retrain
a head on new images without forgetting the old classes (it never has their images).

Per class at most ``per_class`` vectors (50 by default), chosen by herding over the previous
exemplars plus the new training rows, so the memory stays bounded however many updates run.
Stored as ``.npz`` of plain arrays (features, integer labels, label names as JSON bytes): it loads
with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..core.bundle import write_npz_durably
from ..errors import BundleError

# Exemplars kept per class for on-device replay. With 20, adapting on 100 drifted images cost 3.9
# points on the original (clean) validation images; 50 keeps more of each class's spread and is
# still small: 50 x 1280 float32 = 256 KB per class.
EXEMPLARS_PER_CLASS = 50


def herding(X: np.ndarray, y: np.ndarray, n_classes: int, *, per_class: int) -> np.ndarray:
    """Indices of up to ``per_class`` rows per class chosen by herding (iCaRL).

    Herding greedily adds the row that brings the running mean of the chosen set closest to the
    class mean, so a few exemplars reproduce the class's centre better than a random few.
    """
    chosen: list[int] = []
    for c in range(n_classes):
        rows = np.flatnonzero(y == c)
        if len(rows) <= per_class:
            chosen += rows.tolist()
            continue
        F = X[rows] / (np.linalg.norm(X[rows], axis=1, keepdims=True) + 1e-12)
        mu = F.mean(axis=0)
        acc = np.zeros_like(mu)
        free = np.ones(len(rows), dtype=bool)
        for k in range(1, per_class + 1):
            dist = np.linalg.norm(mu[None, :] - (acc[None, :] + F) / k, axis=1)
            dist[~free] = np.inf
            j = int(np.argmin(dist))
            free[j] = False
            acc += F[j]
            chosen.append(int(rows[j]))
    return np.array(chosen, dtype=np.int64)


def save_exemplars(path: Path, X: np.ndarray, y: np.ndarray, labels: list[str]) -> None:
    """features, integer labels, and label names as JSON bytes (no object arrays, no pickles)."""
    names = np.frombuffer(json.dumps(labels).encode(), dtype=np.uint8)
    write_npz_durably(path, features=X.astype(np.float32), labels=y.astype(np.int64), label_names=names)


def load_exemplars(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """exemplars.npz -> (features, label indices, label names).

    Raises:
        BundleError: missing or unreadable.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            names = json.loads(bytes(z["label_names"]).decode())
            return z["features"].astype(np.float32), z["labels"].astype(np.int64), names
    except (OSError, KeyError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable exemplar memory ({exc}); re-export the bundle") from None
