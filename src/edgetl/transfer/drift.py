"""Input drift on the device: is this image, this folder, still like the training data?

Device side: numpy only (no torch, no scipy; threadpoolctl, a base dependency, when present), cheap
enough for every frame: 20-60 us per image at batch 1, 3-7 us at batch 32 (0.3-0.5 % of predict).

**The stored description** (``drift.npz``, plain arrays, ``np.load(..., allow_pickle=False)``), for
``d``-dimensional features, ``k`` classes, ``r`` principal directions and ``m`` reference images:

===============  =========  =========  =====================================================
array            shape      dtype      meaning
===============  =========  =========  =====================================================
``version``      ()         int32      format version (1)
``class_means``  (k, d)     float32    mean training feature of each class
``components``   (d, r)     float32    orthonormal top directions of the *within-class* scatter
``eigenvalues``  (r,)       float32    within-class variance along each direction
``scale``        (2,)       float32    normalisers of the two score terms (see below)
``ref_scores``   (m,)       float32    drift scores of held-out reference images
``ref_coords``   (m, r)     float32    their whitened coordinates (nearest class subtracted)
``ref_labels``   (m,)       int32      their class, -1 where unknown
===============  =========  =========  =====================================================

With EfficientNet-Lite features (d = 1280), k = 8, r = 32 and m = 128 that is 219 KB.

**Per image**, for each class c: ``a_c = sum_j (P_j . (x - mu_c))^2 / lambda_j`` (Mahalanobis distance
inside the r-dimensional subspace) and ``b_c = ||x - mu_c||^2 - ||P^T (x - mu_c)||^2`` (the squared
residual outside it). The drift score is ``min_c (a_c / scale[0] + b_c / scale[1])``: the two
normalisers are the mean of each term on training images *held out* from the fit (5-fold
cross-fitting), so both terms weigh about 1 on data like the training data. Cost: one (d x (r + k))
matrix product per image.

**Calibration.** The reference images are training-distribution images the description was *not*
fitted on: ``fit`` scores every training image out of fold (a description fitted without its
fold), or a validation set / held-out part when given. An image's ``p_value`` is its conformal
p-value, ``(1 + #{reference scores >= its score}) / (m + 1)``: on images from the training
distribution it is uniform, so ``ood = p_value < image_alpha`` flags ``image_alpha`` of them in
expectation (1 % by default). That p-value cannot go under ``1 / (m + 1)``: past the largest
reference score, a log-normal fitted to the reference scores extrapolates the tail (capped by
the conformal value), so a far-off input is flagged even with m = 30; there the level is
approximate (the fit's), and an in-distribution input reaches that region with probability
``1 / (m + 1)`` only. The score is the distance to the nearest class in units of the
within-class spread, so "far from every class" is what it measures. ``ood`` is about the *input*; the
head's confidence-based "unknown" is about the *answer*: a blurred image of a known class can be
confidently classified and still ood, and an ambiguous in-distribution image can be unknown yet not ood.

**A folder** (:func:`drift_summary`) is compared with the reference images by one permutation test
that combines two statistics: the maximum mean discrepancy (Gaussian kernel, median-distance
bandwidth) of the whitened coordinates, and the difference of mean log drift scores. Each
permutation of "reference" / "folder" labels recomputes both; the p-value of the smaller of the two
per-statistic p-values is itself calibrated over the permutations (min-p), so the test has its
nominal level exactly (permutations are exchangeable under no drift) and catches both a move
inside the training subspace (brightness, contrast) and a move out of it (a new texture). Where
labels exist the same test runs per class (Bonferroni across classes). The verdict:

* ``none``: p >= alpha — adapt is not needed;
* ``mild``: p < alpha but the shift is small: its size, the MMD^2 in excess of its permutation
  mean, is under :data:`DRIFT_EFFECT` (0.1), and fewer than :data:`OOD_MATERIAL` (10 %) of the images
  are ood — adapt only if ``eval`` on labelled images shows a drop;
* ``drift``: p < alpha and a material shift — adapt with labelled images from these conditions is advisable;
* ``severe``: as ``drift`` and half the images or more are ood — a new condition or kind of input:
  label some, adapt (new classes if they are new) or refit.

The 0.1 is a measured rule of thumb, not a guarantee (``benchmarks/drift.py``, two datasets: shifts
measuring up to 0.062 cost the head at most 5 points, 0.092 cost 5.6, from 0.13 up 9 to 70); what a
drift costs in accuracy can only be measured with labels (``edgetl eval``).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "DriftReference",
    "DriftScores",
    "DriftSummary",
    "fit_drift_reference",
    "drift_summary",
    "save_drift_reference",
    "load_drift_reference",
    "DRIFT_ARRAYS",
    "DRIFT_VERSION",
]

DRIFT_VERSION = 1
# name -> (shape in symbols, dtype): the exact contents of drift.npz
DRIFT_ARRAYS = {
    "version": ((), "int32"),
    "class_means": (("k", "d"), "float32"),
    "components": (("d", "r"), "float32"),
    "eigenvalues": (("r",), "float32"),
    "scale": ((2,), "float32"),
    "ref_scores": (("m",), "float32"),
    "ref_coords": (("m", "r"), "float32"),
    "ref_labels": (("m",), "int32"),
}
_MAX_NPZ_BYTES = 64 << 20
_EIG_FLOOR = 1e-12
SEVERE_OOD_FRACTION = 0.5
# Shift size (excess MMD^2 of the whitened coordinates) from which a detected drift counts as material.
# Set on benchmarks/drift.py (folders of 50): shifts measuring <= 0.062 cost the head <= 5 points (all
# photometric shifts of the built-in example), 0.092 cost 5.6 (digits x0.7 darker), >= 0.13 cost 9-70.
DRIFT_EFFECT = 0.1
# ... or when at least this share of the images is ood (10x the 1 % expected): a new kind of input
# mixed into the folder moves the MMD little but shows here.
OOD_MATERIAL = 0.10
_BLAS: Any = None  # a threadpoolctl controller once made; False where it cannot be


def _one_blas_thread():
    """Single-threaded BLAS for the small products of scoring: OpenBLAS threads spinning for busy cores
    made a batch of 32 cost 30x more on a shared 2-core machine (threadpoolctl is a base dependency;
    without it, BLAS keeps its default)."""
    global _BLAS
    if _BLAS is None:
        try:
            from threadpoolctl import ThreadpoolController

            _BLAS = ThreadpoolController()
        except Exception:  # pragma: no cover - threadpoolctl missing or unusable
            _BLAS = False
    return _BLAS.limit(limits=1, user_api="blas") if _BLAS else contextlib.nullcontext()


@dataclass
class DriftScores:
    """Per-image drift: ``score`` (higher = less like training), conformal ``p_value``,
    ``percentile`` among the reference scores, ``nearest`` class index, and ``ood`` (p < image_alpha)."""

    score: np.ndarray
    p_value: np.ndarray
    percentile: np.ndarray
    nearest: np.ndarray
    ood: np.ndarray
    image_alpha: float


class DriftReference:
    """The stored description of the training features, ready to score (see the module docstring)."""

    def __init__(self, arrays: dict):
        a = {name: np.asarray(arrays[name]) for name in DRIFT_ARRAYS}
        _check_arrays(a)
        self.arrays = {name: a[name].astype(DRIFT_ARRAYS[name][1], copy=False) for name in DRIFT_ARRAYS}
        P = self.arrays["components"]
        M = self.arrays["class_means"]
        self._P = P
        self._M = M
        self._MP = M @ P  # (k, r)
        self._Msq = np.einsum("kd,kd->k", M, M, dtype=np.float64).astype(np.float32)
        self._isl = (1.0 / np.sqrt(np.maximum(self.arrays["eigenvalues"], _EIG_FLOOR))).astype(np.float32)
        self._inv_scale = (1.0 / self.arrays["scale"]).astype(np.float32)
        self._sorted = np.sort(self.arrays["ref_scores"].astype(np.float64))
        logs = np.log(self._sorted[self._sorted > 0])
        # the log-normal tail beyond the largest reference score (see _scores); a few references
        # cannot describe a spread
        self._tail = (float(logs.mean()), float(logs.std(ddof=1))) if len(logs) >= 5 and logs.std() > 0 else None

    # ----- shape facts
    @property
    def dim(self) -> int:
        return int(self._P.shape[0])

    @property
    def rank(self) -> int:
        return int(self._P.shape[1])

    @property
    def n_classes(self) -> int:
        return int(self._M.shape[0])

    @property
    def n_reference(self) -> int:
        return int(self._sorted.shape[0])

    def _terms(self, X: np.ndarray):
        """(score (n,), nearest class (n,), whitened coordinates for that class (n, r))."""
        X = np.asarray(X, np.float32)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise ValueError(f"features have shape {X.shape}; this drift reference expects (n, {self.dim})")
        if X.shape[0] > 1:
            with _one_blas_thread():
                T = X @ self._P  # (n, r)
                G = X @ self._M.T  # (n, k)
        else:
            T = X @ self._P
            G = X @ self._M.T
        xx = np.einsum("nd,nd->n", X, X)
        Tc = T[:, None, :] - self._MP[None, :, :]  # (n, k, r)
        inside = np.einsum("nkr,nkr->nk", Tc, Tc)
        W = Tc * self._isl
        a = np.einsum("nkr,nkr->nk", W, W)
        b = np.maximum(xx[:, None] - 2.0 * G + self._Msq[None, :] - inside, 0.0)
        s = a * self._inv_scale[0] + b * self._inv_scale[1]
        c = np.argmin(s, axis=1)
        rows = np.arange(len(c))
        return s[rows, c].astype(np.float64), c, W[rows, c]

    def score(self, X, *, image_alpha: float = 0.01) -> DriftScores:
        """Drift score, conformal p-value, percentile and ood flag of each row of ``X`` (n, d)."""
        s, c, _ = self._terms(X)
        return self._scores(s, c, image_alpha)

    def _scores(self, s: np.ndarray, c: np.ndarray, image_alpha: float) -> DriftScores:
        m = self.n_reference
        below = np.searchsorted(self._sorted, s, side="left")  # reference scores < s
        p = (1.0 + (m - below)) / (m + 1.0)
        beyond = below >= m
        if beyond.any() and self._tail is not None:
            # Past every reference score the conformal p-value stops at 1 / (m + 1) (0.024 with
            # 40 references: nothing could ever be flagged at 1 %). There the log-normal fitted
            # to the reference scores extrapolates the tail, capped by the conformal value: an
            # in-distribution input gets here with probability 1 / (m + 1) and is then flagged
            # only where that fit puts it beyond the 1 - image_alpha quantile.
            mu, sigma = self._tail
            z = (np.log(np.maximum(s[beyond], 1e-300)) - mu) / (sigma * math.sqrt(2.0))
            p[beyond] = np.minimum(p[beyond], [0.5 * math.erfc(v) for v in z])
        return DriftScores(s, p, 100.0 * below / max(m, 1), c, p < image_alpha, image_alpha)

    def coordinates(self, X) -> tuple[np.ndarray, np.ndarray]:
        """(drift scores, whitened coordinates relative to the nearest class) of ``X``."""
        s, _, W = self._terms(X)
        return s, W


def _check_arrays(a: dict) -> None:
    for name, (shape, _dtype) in DRIFT_ARRAYS.items():
        v = a[name]
        if len(shape) != v.ndim:
            raise ValueError(f"drift array {name!r} has {v.ndim} dimensions, expected {len(shape)} {shape}")
        if v.dtype.kind not in "fiu" or (v.dtype.kind == "f" and not np.all(np.isfinite(v))):
            raise ValueError(f"drift array {name!r} must hold finite numbers")
    k, d = a["class_means"].shape
    d2, r = a["components"].shape
    m = a["ref_scores"].shape[0]
    if int(a["version"]) != DRIFT_VERSION:
        raise ValueError(f"drift reference version {int(a['version'])} is not {DRIFT_VERSION}; refit it")
    if d2 != d or a["eigenvalues"].shape != (r,) or a["ref_coords"].shape != (m, r) or a["ref_labels"].shape != (m,):
        raise ValueError(
            f"drift arrays disagree in shape: class_means {a['class_means'].shape}, components "
            f"{a['components'].shape}, eigenvalues {a['eigenvalues'].shape}, ref_coords "
            f"{a['ref_coords'].shape}, ref_labels {a['ref_labels'].shape}"
        )
    if a["scale"].shape != (2,) or not np.all(a["scale"] > 0):
        raise ValueError("drift array 'scale' must be two positive numbers")
    if k < 1 or r < 1 or m < 1:
        raise ValueError("drift reference needs at least one class, one direction and one reference image")


# ----- fitting (at fit time; numpy only as well) ---------------------------------------------------


def _class_index(y, n: int, n_classes: int | None) -> tuple[np.ndarray, int]:
    if y is None:
        return np.zeros(n, np.int64), 1
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or (n and y.min() < 0):
        raise ValueError(f"labels must be {n} class indices >= 0")
    k = int(n_classes if n_classes is not None else y.max() + 1)
    missing = sorted(set(range(k)) - set(np.unique(y).tolist()))
    if missing:
        raise ValueError(f"class(es) {missing[:5]} have no training rows; a drift reference needs every class")
    return y.astype(np.int64), k


def _fit_subspace(X: np.ndarray, y: np.ndarray, k: int, rank: int):
    """(class means (k, d), components (d, r), within-class variances (r,)) from rows X, labels y."""
    X = X.astype(np.float64)
    means = np.stack([X[y == c].mean(axis=0) for c in range(k)])
    R = X - means[y]
    _, s, vt = np.linalg.svd(R, full_matrices=False)
    dof = max(1, X.shape[0] - k)
    lam = s**2 / dof
    keep = int(min(rank, np.sum(lam > 1e-9 * max(float(lam.max(initial=0.0)), 1e-300))))
    keep = max(keep, 1)
    return means, vt[:keep].T, lam[:keep]


def _raw_terms(X: np.ndarray, y: np.ndarray, means, P, lam) -> tuple[np.ndarray, np.ndarray]:
    """(Mahalanobis-in-subspace, squared residual) of each row relative to its own class mean."""
    R = X.astype(np.float64) - means[y]
    T = R @ P
    a = np.sum(T**2 / np.maximum(lam, _EIG_FLOOR), axis=1)
    b = np.maximum(np.sum(R**2, axis=1) - np.sum(T**2, axis=1), 0.0)
    return a, b


def _split(y: np.ndarray, fraction: float, rng) -> np.ndarray:
    """Boolean mask of a stratified held-out part (at least one row stays in each class's fit part)."""
    hold = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        take = min(len(idx) - 1, int(round(fraction * len(idx))))
        if take > 0:
            hold[rng.choice(idx, take, replace=False)] = True
    return hold


def fit_drift_reference(
    X,
    y=None,
    *,
    X_cal=None,
    y_cal=None,
    n_classes: int | None = None,
    rank: int = 32,
    cal_fraction: float = 0.3,
    max_reference: int = 500,
    folds: int = 5,
    seed: int = 0,
    oof_folds=None,
) -> DriftReference:
    """Describe training features for drift scoring on the device.

    Args:
        X: training features (n, d) — the rows the head is trained on (INT8 features on an INT8 bundle).
        y: their class indices (n,), or None for one class.
        X_cal / y_cal: held-out features of the same distribution (``fit``'s validation split), the
            reference images. Without them, ``cal_fraction`` of each class is held out of the fit.
        n_classes: number of classes (default ``max(y) + 1``); every class needs rows.
        rank: principal directions kept (fewer when the data have fewer).
        max_reference: at most this many reference images are stored (a seeded subsample).
        folds: cross-fitting folds for the two normalisers.
        oof_folds: fold index per row of ``X`` (-1: never held out), used when there is no
            ``X_cal``: the description is fitted on every row, and every held-out row is a
            reference image scored by a description fitted without its fold (out of fold), so
            the p-value floor is ``1 / (n + 1)`` over all n rows instead of a held-out part.

    Raises:
        ValueError: malformed arrays, a class without rows, or too few rows.
    """
    rng = np.random.default_rng(seed)
    X = np.asarray(X, np.float32)
    if X.ndim != 2 or X.shape[0] < 4:
        raise ValueError(f"need at least 4 training rows (n, d), got {X.shape}")
    labelled = y is not None
    y, k = _class_index(y, X.shape[0], n_classes)
    oof = None
    if X_cal is None and oof_folds is not None:
        oof = np.asarray(oof_folds, np.int64)
        if oof.shape != (X.shape[0],) or not np.any(oof >= 0):
            oof = None
    if oof is not None:
        pass
    elif X_cal is None:
        hold = _split(y, cal_fraction, rng)
        if not hold.any():
            raise ValueError("too few rows to hold any out for calibration; pass X_cal")
        X_cal, y_cal = X[hold], (y[hold] if labelled else None)
        X, y = X[~hold], y[~hold]
    else:
        X_cal = np.asarray(X_cal, np.float32)
        if X_cal.ndim != 2 or X_cal.shape[1] != X.shape[1] or X_cal.shape[0] < 1:
            raise ValueError(f"X_cal {X_cal.shape} does not match the training features {X.shape}")
        y_cal = None if y_cal is None else np.asarray(y_cal, np.int64)
    # Normalisers from rows held out of the fit (cross-fitting): both terms ~1 on unseen typical data.
    fold = np.empty(len(y), np.int64)
    for c in range(k):
        idx = np.flatnonzero(y == c)
        fold[idx[rng.permutation(len(idx))]] = np.arange(len(idx)) % folds
    a_all, b_all = [], []
    for f in range(folds):
        test = fold == f
        train = ~test
        present = np.unique(y[train])
        if len(present) < k or not test.any():
            continue  # a class would have no mean in this fold's fit
        means, P, lam = _fit_subspace(X[train], y[train], k, rank)
        a, b = _raw_terms(X[test], y[test], means, P, lam)
        a_all.append(a)
        b_all.append(b)
    means, P, lam = _fit_subspace(X, y, k, rank)
    if a_all:
        a, b = np.concatenate(a_all), np.concatenate(b_all)
    else:  # too few rows per class to cross-fit: the fit rows themselves (optimistic, but only a weighting)
        a, b = _raw_terms(X, y, means, P, lam)
    scale = np.array([max(float(a.mean()), 1e-12), max(float(b.mean()), 1e-12)], np.float32)
    partial = {
        "version": np.int32(DRIFT_VERSION),
        "class_means": means.astype(np.float32),
        "components": P.astype(np.float32),
        "eigenvalues": lam.astype(np.float32),
        "scale": scale,
        "ref_scores": np.zeros(1, np.float32),
        "ref_coords": np.zeros((1, P.shape[1]), np.float32),
        "ref_labels": np.full(1, -1, np.int32),
    }
    model = DriftReference(partial)
    if oof is not None:
        refs = _out_of_fold_references(model, X, y, k, rank, oof)
        if refs is not None:
            s, W, yr = refs
            if len(s) > max_reference:
                keep = np.sort(rng.choice(len(s), max_reference, replace=False))
                s, W, yr = s[keep], W[keep], yr[keep]
            partial.update(
                ref_scores=s.astype(np.float32),
                ref_coords=W.astype(np.float32),
                ref_labels=(yr if labelled else np.full(len(s), -1)).astype(np.int32),
            )
            return DriftReference(partial)
        X_cal, y_cal = X, (y if labelled else None)  # no fold could be fitted: in-sample (optimistic)
    if X_cal.shape[0] > max_reference:
        keep = np.sort(rng.choice(X_cal.shape[0], max_reference, replace=False))
        X_cal = X_cal[keep]
        y_cal = None if y_cal is None else y_cal[keep]
    s, W = model.coordinates(X_cal)
    partial.update(
        ref_scores=s.astype(np.float32),
        ref_coords=W.astype(np.float32),
        ref_labels=(np.full(len(s), -1) if y_cal is None else y_cal).astype(np.int32),
    )
    return DriftReference(partial)


def _out_of_fold_references(model: DriftReference, X, y, k: int, rank: int, fold: np.ndarray):
    """(scores, whitened coordinates, labels) of every held-out row, each scored by a description
    fitted without its fold (with the final normalisers); the coordinates are its residual from
    that fold's nearest class mean in the final description's whitened subspace, so the folder
    test compares like with like. None when no fold leaves every class a row."""
    S, W, Y = [], [], []
    for f in np.unique(fold[fold >= 0]):
        tr, te = fold != f, fold == f
        if len(np.unique(y[tr])) < k:
            continue
        means, P, lam = _fit_subspace(X[tr], y[tr], k, rank)
        arrays = dict(
            model.arrays,
            class_means=means.astype(np.float32),
            components=P.astype(np.float32),
            eigenvalues=lam.astype(np.float32),
            ref_scores=np.zeros(1, np.float32),
            ref_coords=np.zeros((1, P.shape[1]), np.float32),
            ref_labels=np.full(1, -1, np.int32),
        )
        s, c, _ = DriftReference(arrays)._terms(X[te])
        R = X[te] - means[c].astype(np.float32)
        S.append(s)
        W.append((R @ model._P) * model._isl)
        Y.append(y[te])
    if not S:
        return None
    return np.concatenate(S), np.concatenate(W), np.concatenate(Y)


# ----- storage -------------------------------------------------------------------------------------


def save_drift_reference(ref: DriftReference, path: str | Path) -> Path:
    """Write ``drift.npz`` (atomically: a temporary file renamed over the target)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **ref.arrays)  # type: ignore[arg-type]  # numpy's stub lets ** fill allow_pickle
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_drift_reference(path: str | Path | IO[bytes]) -> DriftReference:
    """Read a ``drift.npz`` written by :func:`save_drift_reference` (no pickles; every array checked).

    Raises:
        ValueError: not a drift reference, an array missing or of the wrong shape, or too large.
    """
    if not isinstance(path, (str, Path)):  # a bundle's verified bytes
        size = path.seek(0, 2)
        path.seek(0)
    else:
        path = Path(path)
        size = path.stat().st_size
    if size > _MAX_NPZ_BYTES:
        raise ValueError(f"{path}: {size} bytes is too large for a drift reference")
    with np.load(path, allow_pickle=False) as z:
        missing = [n for n in DRIFT_ARRAYS if n not in z.files]
        if missing:
            raise ValueError(f"{path}: not a drift reference (missing {', '.join(missing)})")
        return DriftReference({n: z[n] for n in DRIFT_ARRAYS})


# ----- folder-level test ---------------------------------------------------------------------------


def _perm_test(Zr: np.ndarray, Sr: np.ndarray, Zf: np.ndarray, Sf: np.ndarray, permutations: int, rng) -> dict:
    """Min-p permutation test of (MMD of coordinates, mean log-score difference)."""
    Z = np.concatenate([Zr, Zf]).astype(np.float64)
    S = np.log(np.concatenate([Sr, Sf]).astype(np.float64) + 1e-12)
    m, n = len(Zr), len(Zf)
    N = m + n
    sq = np.sum(Z * Z, axis=1)
    D2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * Z @ Z.T, 0.0)
    off = D2[np.triu_indices(N, 1)]
    h2 = float(np.median(off)) if off.size else 1.0
    K = np.exp(-D2 / max(h2, 1e-12))
    labels = np.zeros((N, permutations + 1))
    base = np.concatenate([np.full(m, -1.0 / m), np.full(n, 1.0 / n)])
    labels[:, 0] = base
    for j in range(1, permutations + 1):
        labels[:, j] = base[rng.permutation(N)]
    mmd = np.einsum("nj,nj->j", labels, K @ labels)
    diff = S @ labels
    stats = np.stack([mmd, diff])
    total = permutations + 1
    pvals = np.empty_like(stats)
    for i in range(2):
        srt = np.sort(stats[i])
        pvals[i] = (total - np.searchsorted(srt, stats[i] - 1e-12 * (1 + np.abs(stats[i])), side="left")) / total
    minp = pvals.min(axis=0)
    p = float(np.sum(minp <= minp[0] + 1e-15) / total)
    null_mmd = float(mmd[1:].mean()) if permutations else 0.0
    return {
        "p_value": p,
        "p_mmd": float(pvals[0, 0]),
        "p_score": float(pvals[1, 0]),
        "mmd2": float(mmd[0]),
        "mmd2_excess": float(mmd[0]) - null_mmd,
        "log_score_shift": float(diff[0]),
    }


@dataclass
class DriftSummary:
    """Folder-level drift (see the module docstring for the test and the verdict)."""

    n: int
    p_value: float
    p_mmd: float
    p_score: float
    mmd2: float
    mmd2_excess: float
    log_score_shift: float
    ood_fraction: float
    image_alpha: float
    above_p95_fraction: float
    verdict: str
    adapt_advisable: bool
    message: str
    alpha: float
    per_class: list[dict] = field(default_factory=list)
    tested_rows: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def drift_summary(
    ref: DriftReference,
    X,
    y=None,
    *,
    alpha: float = 0.05,
    image_alpha: float = 0.01,
    permutations: int = 500,
    max_rows: int = 1000,
    min_per_class: int = 5,
    seed: int = 0,
) -> DriftSummary:
    """Compare a folder's features ``X`` (n, d) with the reference images; ``y`` (n,) class indices
    (or -1 for unknown) adds per-class tests. Deterministic for a given ``seed``.

    ``max_rows`` bounds the test's memory: a larger folder is tested on a seeded subsample of that
    size (the per-image figures always use every row).
    """
    X = np.asarray(X, np.float32)
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"a folder needs at least 2 images' features, got {X.shape}")
    rng = np.random.default_rng(seed)
    raw, nearest, W = ref._terms(X)
    sc = ref._scores(raw, nearest, image_alpha)
    p95 = float(np.quantile(ref._sorted, 0.95)) if ref.n_reference > 1 else float(ref._sorted[0])
    rows = np.arange(len(X))
    if len(rows) > max_rows:
        rows = np.sort(rng.choice(len(X), max_rows, replace=False))
    Zr, Sr = ref.arrays["ref_coords"], ref.arrays["ref_scores"]
    test = _perm_test(Zr, Sr, W[rows], sc.score[rows], permutations, rng)
    per_class = []
    if y is not None:
        y = np.asarray(y)
        if y.shape != (len(X),):
            raise ValueError(f"labels must have one entry per row ({len(X)})")
        rl = ref.arrays["ref_labels"]
        tested = [
            c for c in range(ref.n_classes) if np.sum(rl == c) >= min_per_class and np.sum(y == c) >= min_per_class
        ]
        for c in tested:
            rc, fc = rl == c, y == c
            t = _perm_test(Zr[rc], Sr[rc], W[fc], sc.score[fc], permutations, rng)
            per_class.append(
                {
                    "class": int(c),
                    "n": int(fc.sum()),
                    "p_value": t["p_value"],
                    "p_adjusted": min(1.0, t["p_value"] * len(tested)),
                    "ood_fraction": round(float(sc.ood[fc].mean()), 4),
                }
            )
    ood = float(sc.ood.mean())
    above = float(np.mean(sc.score > p95))
    p = test["p_value"]
    drifted = [pc["class"] for pc in per_class if pc["p_adjusted"] < alpha]
    where = f"; classes drifted: {', '.join(map(str, drifted))}" if drifted else ""
    effect = test["mmd2_excess"]
    evidence = (
        f"p = {p:.3g} on {len(X)} images, shift size {effect:.3f} (excess MMD^2; {DRIFT_EFFECT:g} = material), "
        f"{ood:.0%} ood at {image_alpha:g} ({image_alpha:.0%} expected)"
    )
    if p >= alpha:
        verdict = "none"
        msg = f"no drift detected ({evidence}): adapt is not needed"
    elif ood >= SEVERE_OOD_FRACTION:
        verdict = "severe"
        msg = (
            f"severe drift ({evidence}{where}): these images are unlike the training data, a new condition or "
            "kind of input; label some and run edgetl adapt (as new classes if they are new), or refit with them"
        )
    elif effect < DRIFT_EFFECT and ood < OOD_MATERIAL:
        verdict = "mild"
        msg = (
            f"mild drift ({evidence}{where}): detectable but small; adapt only if edgetl eval on labelled "
            "images from these conditions shows a drop"
        )
    else:
        verdict = "drift"
        msg = (
            f"inputs have drifted ({evidence}{where}): adapt is advisable; label some images from these "
            "conditions, run edgetl adapt, and check with edgetl eval"
        )
    return DriftSummary(
        len(X),
        p,
        test["p_mmd"],
        test["p_score"],
        test["mmd2"],
        round(effect, 5),
        test["log_score_shift"],
        round(ood, 4),
        image_alpha,
        round(above, 4),
        verdict,
        verdict in ("drift", "severe"),
        msg,
        alpha,
        per_class,
        len(rows),
    )
