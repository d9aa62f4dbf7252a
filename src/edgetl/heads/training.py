"""Training the classification heads of :mod:`edgetl.heads.classification`, in plain numpy (the
device retrains with the same code: no torch, scipy or scikit-learn there).

Two ideas keep training fast on a Raspberry-Pi-class CPU:

* **Row-space basis.** With an L2 penalty the optimal first-layer weights lie in the span of the
  training rows: a component orthogonal to every row changes no training output and only adds
  penalty. One eigendecomposition of the n x n Gram matrix (or the d x d covariance when n >= d)
  gives orthogonal coordinates ``Z = X_std @ proj`` of width ``r <= min(n, d)``. The optimiser then
  works on ``r`` columns instead of ``d`` (500 instead of 1280 for a typical set), and the same
  basis serves every fold and every penalty of the automatic L2 search, because fold rows are a
  subset of all rows.
* **Preconditioned L-BFGS with warm starts.** In that basis the data term's curvature is nearly
  diagonal (the columns of ``Z`` are orthogonal), so scaling each coordinate by its curvature
  estimate makes the problem well conditioned and L-BFGS converges in tens of iterations; the L2
  path is walked from strong to weak penalty, each fit starting from the previous solution.
"""

from __future__ import annotations

import math

import numpy as np

from ..core.metrics import stratified_folds
from ..errors import ConfigError, DataError
from . import registry
from .classification import Head, HeadConfig, _kinds_hint, softmax
from .optimizers import fit_linear, fit_mlp
from .registry import NORM_EPS as _NORM_EPS

# One value per decade from "barely regularised" to "close to nearest-class-mean". The penalty is
# (l2 / 2) * ||W||^2 added to the *mean* (weighted) cross-entropy, so it does not scale with n;
# on standardised backbone features the useful optimum sits between 1e-3 and 1 in practice, and
# decade spacing is as fine as accuracy on a few hundred validation rows can resolve.
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
# The MLP's penalty acts on two stacked weight matrices, so it bites much harder than on a linear
# head: from l2 = 1 up, it flattens the network to chance. Its grid stops there, which also keeps
# the search (one Adam run per candidate and fold) affordable.
MLP_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
# Used when there are too few rows (or classes) for a 3-fold search to mean anything.
_DEFAULT_L2 = 1e-2
_CV_FOLDS = 3
_MIN_ROWS_FOR_CV = 2 * _CV_FOLDS

# A class with no training rows gets zero weights and a bias this far below the lowest training
# logit of any present class: "very unlikely", yet bounded so the number stays friendly to later
# float16 / int8 handling of the fused model.
_ABSENT_MARGIN = 30.0
# Eigen-directions of the training features weaker than this fraction of the strongest are
# dropped: their curvature is far below the smallest penalty in the grid, so their optimal weight
# is ~0, and dividing by their tiny singular values would only amplify rounding error.
_RANK_RTOL = 1e-6
# L-BFGS stops when every preconditioned gradient entry is below this. Candidates of the L2
# search only need the right *predictions*, so they stop early; the fit that ships is polished
# (warm-started from the search) to a tolerance where the weights agree with a tight reference
# solver to <1% even at the weakest penalty.
_SEARCH_GTOL = 1e-4
_FINAL_GTOL = 1e-6

# Bounds of the prototype temperature. Cosines live in [-1, 1], so logits live in [-s, s]: below 1
# every probability is near uniform, above ~30 float32 softmax saturates to one-hot and the
# probabilities stop carrying information. Inside the bounds s is fitted to leave-one-out cosines.
_PROTO_SCALE_MIN = 1.0
_PROTO_SCALE_MAX = 30.0
_PROTO_SCALE_DEFAULT = 10.0


# --------------------------------------------------------------------------------------------
# training: shared pieces
# --------------------------------------------------------------------------------------------


def _as_features(X, name: str) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise DataError(f"{name} must be a non-empty 2-D array (n, d), got shape {X.shape}")
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise DataError(f"{name} must hold numbers, got dtype {X.dtype}")
    X = X.astype(np.float32, copy=False)
    if not np.all(np.isfinite(X)):
        raise DataError(f"{name} holds NaN or infinity (a broken feature extraction?)")
    return X


def _as_targets(y, n: int, k: int, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{name} must be a 1-D array of {n} class indices, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= k):
        raise DataError(f"{name} holds class indices outside [0, {k}) (labels has {k} entries)")
    return y


def _class_weights(y: np.ndarray, k: int, balance: bool, sample_weight: np.ndarray | None) -> np.ndarray:
    """Per-row weights: ``n / (k_present * n_c)`` when balancing, times any sample weights."""
    n = y.shape[0]
    w = np.ones(n, dtype=np.float64)
    if balance:
        counts = np.bincount(y, minlength=k).astype(np.float64)
        present = counts > 0
        per_class = np.zeros(k)
        # k counts only classes that have rows, so the weights still average to 1.
        per_class[present] = n / (present.sum() * counts[present])
        w = per_class[y]
    if sample_weight is not None:
        w = w * sample_weight
    return w


def _weighted_score(y_true: np.ndarray, y_pred: np.ndarray, k: int, balance: bool, sample_weight) -> float:
    """Accuracy, class-balanced (mean per-class recall) when training is balanced.

    Scoring the L2 candidates the way the objective weighs rows keeps the search from preferring a
    penalty that simply favours the big classes.
    """
    w = _class_weights(y_true, k, balance, sample_weight)
    total = w.sum()
    if total <= 0:
        return 0.0
    return float(np.sum(w * (y_true == y_pred)) / total)


class _Basis:
    """Orthogonal coordinates of the row space of the standardised training features.

    ``Z = Xs @ proj`` has orthogonal columns with squared norms ``lam`` (the eigenvalues of the
    Gram / covariance matrix); weights ``Wz`` on ``Z`` become ``proj @ Wz`` on ``Xs``.
    """

    def __init__(self, Xs: np.ndarray):
        n, d = Xs.shape
        X64 = Xs.astype(np.float64)
        # Decompose whichever of the Gram (n x n) or covariance (d x d) matrix is smaller.
        gram = X64 @ X64.T if n < d else X64.T @ X64
        lam, vec = np.linalg.eigh(gram)
        if not lam[-1] > 0:  # every feature constant over the training rows: nothing to learn from
            self.Z = np.zeros((n, 1), dtype=np.float32)
            self.proj = np.zeros((d, 1), dtype=np.float32)
            self.lam = np.zeros(1)
            return
        keep = lam > _RANK_RTOL * lam[-1]
        lam, vec = lam[keep], vec[:, keep]
        if n < d:
            root = np.sqrt(lam)
            self.Z = (vec * root).astype(np.float32)
            self.proj = (X64.T @ (vec / root)).astype(np.float32)
        else:
            self.proj = vec.astype(np.float32)
            self.Z = Xs @ self.proj
        self.lam = lam

    @property
    def rank(self) -> int:
        return int(self.lam.shape[0])


def _absent_bias(train_logits: np.ndarray) -> float:
    low = float(np.min(train_logits)) if train_logits.size else 0.0
    return math.floor(low) - _ABSENT_MARGIN


# --------------------------------------------------------------------------------------------
# training: entry point
# --------------------------------------------------------------------------------------------


class _Trainer:
    """Fits one kind (linear / mlp) in the shared basis; used by the L2 search and the final fit."""

    def __init__(
        self,
        cfg: HeadConfig,
        basis: _Basis,
        y: np.ndarray,
        w: np.ndarray,
        k: int,
        d: int,
        sample_weight: np.ndarray | None = None,
    ):
        self.cfg, self.basis, self.y, self.w, self.k, self.d = cfg, basis, y, w, k, d
        self.sample_weight = sample_weight

    def fit(self, rows: np.ndarray | None, l2: float, init=None, gtol: float = _FINAL_GTOL) -> dict:
        """Fit on ``rows`` (None: all); returns a dict with basis-space params and class map."""
        Z = self.basis.Z if rows is None else self.basis.Z[rows]
        y = self.y if rows is None else self.y[rows]
        # Balancing weighs a fold's rows by the fold's own class counts: with the counts of all
        # rows a class missing its held-out row would weigh less than the others, which biases
        # every held-out prediction against its own class (leave-one-out falls below chance).
        w = (
            self.w
            if rows is None
            else _class_weights(
                y, self.k, self.cfg.balance, self.sample_weight[rows] if self.sample_weight is not None else None
            )
        )
        present = np.flatnonzero(np.bincount(y, minlength=self.k) > 0)
        remap = np.full(self.k, -1, dtype=np.int64)
        remap[present] = np.arange(present.shape[0])
        yp = remap[y]
        total = w.sum()
        wn = w / total if total > 0 else np.full(w.shape, 1.0 / max(1, w.shape[0]))
        fit = {"present": present, "iterations": 0, "converged": True}
        kp = present.shape[0]
        if kp < 2:  # one class: nothing to separate; a constant model is exact
            fit["const"] = True
            return fit
        if _convex(self.cfg):
            if init is not None:  # warm starts come over all k classes; keep this fit's ones
                init = (init[0][:, present], init[1][present])
            Wz, b, iters, conv = fit_linear(Z, yp, wn, kp, l2, self.cfg.epochs, gtol, init=init)
            fit.update(Wz=Wz, b=b, iterations=iters, converged=conv)
        else:
            fit["mlp"] = fit_mlp(Z, yp, wn, kp, l2, self.cfg, self.d)
        return fit

    def present_logits(self, fit: dict, Z: np.ndarray) -> np.ndarray:
        if fit.get("const"):
            return np.zeros((Z.shape[0], fit["present"].shape[0]), dtype=np.float64)
        if "Wz" in fit:
            return (Z @ fit["Wz"].astype(np.float32)).astype(np.float64) + fit["b"]
        W1, b1, W2, b2 = fit["mlp"]
        return (np.maximum(Z @ W1 + b1, 0) @ W2 + b2).astype(np.float64)

    def predict(self, fit: dict, Z: np.ndarray) -> np.ndarray:
        return fit["present"][np.argmax(self.present_logits(fit, Z), axis=1)]

    def full_logits(self, fit: dict, Z: np.ndarray) -> np.ndarray:
        """Logits over all ``k`` classes; a class this fit never saw sits far below the others
        (it cannot be predicted, as in the shipped head)."""
        present = self.present_logits(fit, Z)
        out = np.empty((Z.shape[0], self.k))
        out[:] = (present.min() if present.size else 0.0) - _ABSENT_MARGIN
        out[:, fit["present"]] = present
        return out

    def out_of_fold(self, fold: np.ndarray, l2: float, gtol: float = _SEARCH_GTOL) -> np.ndarray:
        """Logits of every held-out row from a fit without its fold (NaN where never held out)."""
        oof = np.full((self.y.shape[0], self.k), np.nan)
        for f in np.unique(fold[fold >= 0]):
            val_rows = np.flatnonzero(fold == f)
            fit = self.fit(np.flatnonzero(fold != f), l2, gtol=gtol)
            oof[val_rows] = self.full_logits(fit, self.basis.Z[val_rows])
        return oof


def _search_l2(trainer: _Trainer, *, y, k, cfg, sample_weight, Z_val=None, y_val=None, fold=None):
    """Pick the L2 from the grid and fit the final head with it; returns ``(l2, record, fit)``.

    With validation rows each candidate is trained on all training rows and scored on them.
    Without, a seeded stratified 3-fold cross-validation scores out-of-fold predictions, then the
    head is refitted on all rows. Ties go to the larger penalty: the simpler model is the safer
    bet when accuracy cannot tell candidates apart.

    For the linear head the candidates are walked from strong to weak penalty, each warm-started
    from the previous one with a loose tolerance; the shipped fit is then polished to the final
    tolerance starting from the winner (validation) or from the mean of the winner's fold
    solutions (cross-validation) -- the folds share the basis, so their weights are comparable.

    ``fold`` (fold index per row, -1: never held out) replaces the 3-fold plan; the returned
    fourth value is then the winner's out-of-fold logits (n, k), else None.
    """
    grid = _grid(cfg)
    metric = "balanced_accuracy" if cfg.balance else "accuracy"
    order = sorted(grid, reverse=True)
    loose = _SEARCH_GTOL if _convex(cfg) else _FINAL_GTOL
    scores: dict[float, float] = {}
    fits: dict[float, list[dict]] = {l2: [] for l2 in order}
    oof_logits = None
    if Z_val is not None:
        prev = None
        for l2 in order:
            prev = trainer.fit(None, l2, init=_warm(prev, cfg, k), gtol=loose)
            scores[l2] = _weighted_score(y_val, trainer.predict(prev, Z_val), k, cfg.balance, None)
            fits[l2].append(prev)
        method = "validation"
    else:
        n = y.shape[0]
        usable = fold is not None and np.count_nonzero(np.unique(fold) >= 0) >= 2
        if not usable and (
            fold is not None or n < _MIN_ROWS_FOR_CV or np.count_nonzero(np.bincount(y, minlength=k)) < 2
        ):
            record = {
                "method": "default",
                "reason": f"fewer than {_MIN_ROWS_FOR_CV} rows or 2 classes: no {_CV_FOLDS}-fold search",
                "metric": None,
                "grid": list(grid),
                "scores": None,
                "chosen": _DEFAULT_L2,
            }
            if fold is not None:
                record["reason"] = "no fold to hold out"
            return _DEFAULT_L2, record, trainer.fit(None, _DEFAULT_L2), None
        external = fold is not None
        if not external:
            fold = stratified_folds(y, _CV_FOLDS, cfg.seed)
        logits = {l2: np.full((n, k), np.nan) for l2 in order}
        for f in np.unique(fold[fold >= 0]):
            train_rows, val_rows = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
            Z_fold_val = trainer.basis.Z[val_rows]
            prev = None
            for l2 in order:
                prev = trainer.fit(train_rows, l2, init=_warm(prev, cfg, k), gtol=loose)
                logits[l2][val_rows] = trainer.full_logits(prev, Z_fold_val)
                fits[l2].append(prev)
        scored = ~np.isnan(logits[order[0]][:, 0])
        sw = None if sample_weight is None else sample_weight[scored]
        for l2 in order:
            scores[l2] = _weighted_score(y[scored], np.argmax(logits[l2][scored], axis=1), k, cfg.balance, sw)
        method = "out-of-fold" if external else f"{_CV_FOLDS}-fold"
    best = max(scores.values())
    chosen = max(l2 for l2, s in scores.items() if s >= best - 1e-12)
    record = {
        "method": method,
        "metric": metric,
        "grid": list(grid),
        "scores": [scores[l2] for l2 in grid],
        "chosen": chosen,
    }
    if method != "validation":
        oof_logits = logits[chosen]
    if not _convex(cfg):
        # An MLP fit depends only on (rows, l2, seed): the validation winner *is* the final fit.
        final = fits[chosen][0] if method == "validation" else trainer.fit(None, chosen)
    else:
        final = trainer.fit(None, chosen, init=_mean_start(fits[chosen], trainer.k))
    return chosen, record, final, oof_logits


def _grid(cfg: HeadConfig) -> tuple[float, ...]:
    return L2_GRID if _convex(cfg) else MLP_L2_GRID


def _convex(cfg: HeadConfig) -> bool:
    """The built-in trainer's two weight fits: L-BFGS for a convex kind, Adam otherwise."""
    return registry.get(cfg.kind, "classify").convex


def _mean_start(candidates: list[dict], k: int):
    """Average the basis-space weights of fits over all classes, as a warm start (None if unusable)."""
    usable = [c for c in candidates if "Wz" in c]
    if not usable:
        return None
    r = usable[0]["Wz"].shape[0]
    Wz, b, seen = np.zeros((r, k)), np.zeros(k), np.zeros(k)
    for c in usable:
        Wz[:, c["present"]] += c["Wz"]
        b[c["present"]] += c["b"]
        seen[c["present"]] += 1
    seen = np.maximum(seen, 1)
    return Wz / seen, b / seen


def _warm(prev: dict | None, cfg: HeadConfig, k: int):
    if prev is None or not _convex(cfg):
        return None
    return _mean_start([prev], k)


def train_head(X, y, labels, *, cfg: HeadConfig = HeadConfig(), X_val=None, y_val=None, sample_weight=None) -> Head:
    """Train a classification head on frozen-backbone features: the registered kind's own fit
    (:meth:`edgetl.heads.kinds.ClassifyKind.fit`; the built-in kinds' is
    :func:`edgetl.heads.crossfit.train_builtin`)."""
    if not isinstance(cfg, HeadConfig):
        raise ConfigError(f"cfg must be a HeadConfig, got {type(cfg).__name__}; {_kinds_hint()}")
    kind = registry.get(cfg.kind, "classify")
    return kind.fit(X, y, labels, cfg=cfg, X_val=X_val, y_val=y_val, sample_weight=sample_weight)


def _train_head(X, y, labels, *, cfg: HeadConfig = HeadConfig(), X_val=None, y_val=None, sample_weight=None) -> Head:
    """Train a classification head on frozen-backbone features.

    Args:
        X: float32 features ``(n, d)``.
        y: int64 class indices into ``labels``, shape ``(n,)``. A label may have no rows: it is
            never predicted (zero weights, a very low bias).
        labels: Class names, ``k`` unique strings.
        cfg: Head kind and hyper-parameters.
        X_val: Optional validation features; with ``y_val`` they choose the automatic L2 (and
            ``meta["val_accuracy"]`` is recorded). They are never trained on.
        y_val: Class indices of ``X_val``.
        sample_weight: Optional non-negative per-row weights, multiplied with the class balancing
            (e.g. to down-weight replayed exemplars).

    Returns:
        The trained :class:`Head`; identical inputs and seed give bit-identical arrays.

    Raises:
        DataError: on malformed features, labels, targets or weights.
        ConfigError: if ``cfg`` is not a :class:`HeadConfig`.
    """
    return _fit(X, y, labels, cfg=cfg, X_val=X_val, y_val=y_val, sample_weight=sample_weight)[0]


def _fit(X, y, labels, *, cfg: HeadConfig, X_val=None, y_val=None, sample_weight=None, fold=None):
    """:func:`_train_head`, and with ``fold`` (fold index per row, -1: never held out) also the
    out-of-fold logits (n, k) of the chosen settings (NaN rows: never held out) -> (head, logits)."""
    X, y, labels, X_val, y_val, sample_weight = _checked(X, y, labels, cfg, X_val, y_val, sample_weight)
    k, (n, d) = len(labels), X.shape
    counts = np.bincount(y, minlength=k)
    w = _class_weights(y, k, cfg.balance, sample_weight)
    meta: dict = {
        "kind": cfg.kind,
        "config": cfg.to_dict(),
        "n_features": d,
        "n_classes": k,
        "n_train": n,
        "class_counts": counts.tolist(),
        "absent_classes": [labels[c] for c in np.flatnonzero(counts == 0)],
    }
    mean64 = X.mean(axis=0, dtype=np.float64)
    mean = mean64.astype(np.float32)
    oof = None
    if not registry.get(cfg.kind, "classify").uses_l2:
        arrays = _train_prototype(X, y, w, sample_weight, k, mean, meta)
        if fold is not None:
            oof = _prototype_out_of_fold(X, y, sample_weight, k, fold, cfg.balance)
    else:
        arrays, oof = _train_weights(X, y, w, cfg, mean64, meta, X_val, y_val, sample_weight, fold)
    head = Head(kind=cfg.kind, labels=labels, arrays=arrays, meta=meta)
    meta["train_accuracy"] = float(np.mean(head.predict(X) == y))
    if X_val is not None:
        meta["val_accuracy"] = float(np.mean(head.predict(X_val) == y_val))
    return head, oof


def _prototype_out_of_fold(X, y, sample_weight, k, fold, balance: bool) -> np.ndarray:
    """Prototype logits of each held-out row from class means (and temperature) without its fold."""
    from .classification import prototype_logits as _prototype_logits

    oof = np.full((X.shape[0], k), np.nan)
    for f in np.unique(fold[fold >= 0]):
        tr, va = fold != f, fold == f
        if np.count_nonzero(np.bincount(y[tr], minlength=k)) < 2:
            continue
        sw = None if sample_weight is None else sample_weight[tr]
        a = _train_prototype(X[tr], y[tr], _class_weights(y[tr], k, balance, sw), sw, k, X[tr].mean(axis=0), {})
        oof[va] = _prototype_logits(X[va], a["mean"], a["prototypes"], a["logit_scale"], a["b"])
    return oof


def _checked(X, y, labels, cfg, X_val, y_val, sample_weight):
    """The training inputs as arrays of the right shapes and types, or a DataError naming the bad one."""
    if not isinstance(cfg, HeadConfig):
        raise ConfigError(f"cfg must be a HeadConfig, got {type(cfg).__name__}; {_kinds_hint()}")
    labels = [] if isinstance(labels, str) else list(labels)
    names_ok = all(isinstance(s, str) and s for s in labels) and len(set(labels)) == len(labels)
    if len(labels) < 2 or not names_ok:
        raise DataError(f"labels must be a list of at least 2 unique non-empty strings, got {labels[:5]!r}")
    X = _as_features(X, "X")
    n, d = X.shape
    y = _as_targets(y, n, len(labels), "y")
    if sample_weight is not None:
        sample_weight = np.asarray(sample_weight, dtype=np.float64)
        if sample_weight.shape != (n,) or not np.all(np.isfinite(sample_weight)) or np.any(sample_weight < 0):
            raise DataError(f"sample_weight must be {n} finite non-negative numbers, got shape {sample_weight.shape}")
        if not np.any(sample_weight > 0):
            raise DataError("sample_weight is zero for every row; nothing to train on")
    if (X_val is None) != (y_val is None):
        raise DataError("X_val and y_val must be given together")
    if X_val is not None:
        X_val = _as_features(X_val, "X_val")
        if X_val.shape[1] != d:
            raise DataError(f"X_val has {X_val.shape[1]} features but X has {d}")
        y_val = _as_targets(y_val, X_val.shape[0], len(labels), "y_val")
    return X, y, labels, X_val, y_val, sample_weight


def _train_weights(X, y, w, cfg: HeadConfig, mean64, meta: dict, X_val, y_val, sample_weight, fold=None):
    """A linear or MLP head's arrays: standardise, fit in the row-space basis (choosing L2 unless
    it is given), expand back to feature space."""
    k, d = meta["n_classes"], meta["n_features"]
    mean = mean64.astype(np.float32)
    std = X.std(axis=0, dtype=np.float64)
    # A constant feature (std 0, or a few float32 ulps of wobble around its value) keeps scale 1
    # so it centres to ~0 instead of being blown up into unit-variance rounding noise.
    varies = (std > 1e-6 * np.abs(mean64)) & (std > 1e-12)
    scale = np.where(varies, std, 1.0).astype(np.float32)
    if cfg.scaling == "global":
        # one scale for every feature (their root-mean-square spread): the backbone's own geometry,
        # where a weak feature is not blown up to the weight of a strong one (on frozen ImageNet
        # features this often generalises better than per-feature standardisation)
        rms = float(np.sqrt(np.mean(std[varies] ** 2))) if varies.any() else 1.0
        scale = np.full(d, rms if rms > 0 else 1.0, dtype=np.float32)
    basis = _Basis((X - mean) / scale)
    meta["basis_rank"] = basis.rank
    trainer = _Trainer(cfg, basis, y, w, k, d, sample_weight)
    fit = oof = None
    if cfg.l2 is None:
        Z_val = None if X_val is None else ((X_val - mean) / scale) @ basis.proj
        l2, meta["l2_search"], fit, oof = _search_l2(
            trainer, y=y, k=k, cfg=cfg, sample_weight=sample_weight, Z_val=Z_val, y_val=y_val, fold=fold
        )
    else:
        l2 = cfg.l2
        meta["l2_search"] = {"method": "fixed", "metric": None, "grid": None, "scores": None, "chosen": l2}
        if fold is not None:
            oof = trainer.out_of_fold(fold, l2)
    if fit is None:
        fit = trainer.fit(None, l2)
    meta["l2"] = l2
    meta["optimizer"] = (
        {"name": "lbfgs", "iterations": fit["iterations"], "converged": fit["converged"]}
        if _convex(cfg)
        else {"name": "adam", "steps": cfg.epochs, "lr": cfg.lr}
    )
    return _expand(_convex(cfg), fit, trainer, basis, k, mean, scale, cfg.hidden), oof


def _expand(convex: bool, fit, trainer: _Trainer, basis: _Basis, k, mean, scale, hidden) -> dict:
    """Map a basis-space fit back to float32 feature-space arrays over all ``k`` classes."""
    present = fit["present"]
    absent = np.setdiff1d(np.arange(k), present)
    low = _absent_bias(trainer.present_logits(fit, basis.Z))
    d = mean.shape[0]
    if convex:
        W = np.zeros((d, k), dtype=np.float32)
        b = np.zeros(k, dtype=np.float32)
        if not fit.get("const"):
            W[:, present] = (basis.proj.astype(np.float64) @ fit["Wz"]).astype(np.float32)
            b[present] = fit["b"]
        b[absent] = low
        return {"mean": mean, "scale": scale, "W": W, "b": b}
    W2 = np.zeros((hidden, k), dtype=np.float32)
    b2 = np.zeros(k, dtype=np.float32)
    if fit.get("const"):
        W1 = np.zeros((d, hidden), dtype=np.float32)
        b1 = np.zeros(hidden, dtype=np.float32)
    else:
        W1z, b1, W2p, b2p = fit["mlp"]
        W1 = basis.proj @ W1z
        W2[:, present], b2[present] = W2p, b2p
    b2[absent] = low
    return {"mean": mean, "scale": scale, "W1": W1, "b1": b1, "W2": W2, "b2": b2}


def _train_prototype(X, y, w, sample_weight, k, mean, meta) -> dict:
    """Cosine nearest-class-mean with a leave-one-out fitted temperature."""
    n, d = X.shape
    centred = X - mean
    sq = np.sum(centred * centred, axis=1, keepdims=True)
    unit = (centred / np.sqrt(np.maximum(sq, np.float32(_NORM_EPS**2)))).astype(np.float64)
    sw = np.ones(n) if sample_weight is None else sample_weight
    onehot = np.zeros((n, k))
    onehot[np.arange(n), y] = sw
    sums = unit.T @ onehot  # (d, k) weighted sums of unit rows per class
    norms = np.linalg.norm(sums, axis=0)
    present = norms > _NORM_EPS
    protos = np.zeros((d, k))
    protos[:, present] = sums[:, present] / norms[present]

    # Temperature: a similarity scale fitted on training cosines would grow without bound (the
    # prototypes were built from those very rows), so each row is scored against its own class
    # mean *without itself* -- a leave-one-out estimate that costs no refit -- and the scale
    # minimising weighted cross-entropy there is kept, within [_PROTO_SCALE_MIN, _PROTO_SCALE_MAX].
    rows = np.arange(n)
    cos = unit @ protos
    own_dot = (unit @ sums)[rows, y]
    unit_sq = np.sum(unit * unit, axis=1)
    loo_sq = norms[y] ** 2 - 2 * sw * own_dot + sw**2 * unit_sq
    usable = (loo_sq > _NORM_EPS) & (w > 0)
    s = _PROTO_SCALE_DEFAULT
    cols = np.flatnonzero(present)
    if usable.any() and cols.shape[0] >= 2:
        loo = cos.copy()
        u = rows[usable]
        loo[u, y[u]] = (own_dot[u] - sw[u] * unit_sq[u]) / np.sqrt(loo_sq[u])
        C = loo[usable][:, cols]
        target = np.searchsorted(cols, y[usable])
        wu = w[usable] / w[usable].sum()
        s = _fit_temperature(C, target, wu)
    meta["logit_scale"] = s
    meta["l2"] = None
    meta["l2_search"] = {"method": "none", "grid": None, "scores": None, "metric": None, "chosen": None}
    b = np.zeros(k, dtype=np.float32)
    b[~present] = -(s + _ABSENT_MARGIN)
    return {
        "mean": mean,
        "prototypes": protos.astype(np.float32),
        "logit_scale": np.array(s, dtype=np.float32),
        "b": b,
    }


def _fit_temperature(
    C: np.ndarray, target: np.ndarray, w: np.ndarray, lo: float = _PROTO_SCALE_MIN, hi: float = _PROTO_SCALE_MAX
) -> float:
    """Scale ``s`` minimising ``sum w_i CE(s * C_i, target_i)``, by bisection on the derivative.

    The loss is convex in ``s`` (cross-entropy of logits linear in ``s``), so its derivative
    ``E_p[C] - C_target`` is increasing and bisection is exact and deterministic.
    """
    rows = np.arange(C.shape[0])

    def slope(s: float) -> float:
        p = softmax(s * C)
        return float(w @ (np.sum(p * C, axis=1) - C[rows, target]))

    if slope(lo) >= 0:
        return lo
    if slope(hi) <= 0:
        return hi
    for _ in range(40):  # (hi - lo) / 2^40: far below float32 resolution
        mid = 0.5 * (lo + hi)
        if slope(mid) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
