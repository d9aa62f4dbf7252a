"""Out-of-fold evidence for a classification head: every labelled item scored by a head that did
not see it, while the head that ships trains on all of them.

On a few hundred labelled items (or a handful) a held-out fifth both costs the shipped head a fifth
of its data and leaves every decision resting on a few dozen items. Features are cached, so K head
trainings cost a fraction of a second; :func:`cross_fit` uses them to

* choose the head kind (when not given) and its L2 by out-of-fold (OOF) accuracy over all items,
* give the per-item OOF logits the gate, the transfer check and the drift reference rest on,
* fit a temperature on those logits, folded into the shipped head's last layer, so predict, the
  fused model and the service all return the same calibrated probabilities.

Folds (:func:`fold_plan`): items of one group stay in one fold; tiny data (at most
:data:`LOO_MAX_ITEMS` items) is scored leave-one-out; otherwise 5 stratified folds. An item whose
class has one item (or one group) is never held out: without it its class would not exist.

numpy only: the device recalibrates with the same code when it adapts a head.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from . import registry
from .classification import Head, HeadConfig, softmax
from .training import _fit, _train_head, _weighted_score

# At or under this many items every item is its own fold: K fits of a few dozen rows are cheap,
# and a fifth of 40 items is too few to train on.
LOO_MAX_ITEMS = 60
FOLDS = 5
# The temperature's search bounds (as a multiplier of the logits): far wider than any head needs.
_SCALE_MIN, _SCALE_MAX = 1e-2, 1e2
# Fewer OOF items than this cannot tell one temperature from another; the head stays as trained.
MIN_CALIBRATION_ITEMS = 10
ECE_BINS = 10


@dataclass
class FoldPlan:
    """Fold index per row (-1: always trained on, never scored) and how it was made."""

    fold: np.ndarray
    method: str
    folds: int

    def to_dict(self) -> dict:
        return {"method": self.method, "folds": self.folds, "scored": int(np.count_nonzero(self.fold >= 0))}


def fold_plan(y: np.ndarray, k: int, *, groups=None, seed: int = 0) -> FoldPlan:
    """Folds for :func:`cross_fit` over items with class indices ``y``.

    Args:
        y: class index per item.
        k: number of classes.
        groups: group name per item ("" for an item of its own), or None.
        seed: seeds the deal.
    """
    y = np.asarray(y, np.int64)
    n = y.shape[0]
    rng = np.random.default_rng(seed)
    fold = np.full(n, -1, np.int64)
    if groups is not None and any(groups):
        names = [g if g else f"\0{i}" for i, g in enumerate(groups)]
        uniq, gid = np.unique(names, return_inverse=True)
        if len(uniq) < n:
            # a group's class: its first item's (groups do not cross classes in these layouts)
            gclass = np.zeros(len(uniq), np.int64)
            gclass[gid[::-1]] = y[::-1]
            per_class = np.bincount(gclass, minlength=k)
            folds = int(min(FOLDS, per_class[per_class >= 2].max())) if np.any(per_class >= 2) else 0
            if folds < 2:
                return FoldPlan(fold, "none (every class is one group)", 0)
            gfold = np.full(len(uniq), -1, np.int64)
            offset = 0
            for c in range(k):
                idx = np.flatnonzero(gclass == c)
                if len(idx) < 2:
                    continue  # held out, its class would vanish from training
                idx = idx[rng.permutation(len(idx))]
                gfold[idx] = (np.arange(len(idx)) + offset) % folds
                offset = (offset + len(idx)) % folds
            fold = gfold[gid]
            return FoldPlan(fold, f"grouped {folds}-fold", folds)
    counts = np.bincount(y, minlength=k)
    eligible = counts[y] >= 2
    m = int(np.count_nonzero(eligible))
    if m == 0 or int(np.count_nonzero(counts)) < 2:
        return FoldPlan(fold, "none (one item per class)", 0)
    if m <= LOO_MAX_ITEMS:
        fold[eligible] = np.arange(m)
        return FoldPlan(fold, "leave-one-out", m)
    offset = 0
    for c in (int(v) for v in np.flatnonzero(counts >= 2)):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        fold[idx] = (np.arange(len(idx)) + offset) % FOLDS
        offset = (offset + len(idx)) % FOLDS
    return FoldPlan(fold, f"stratified {FOLDS}-fold", FOLDS)


def expected_calibration_error(P: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Top-label ECE: the item-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    P = np.asarray(P, np.float64)
    if not len(P):
        return float("nan")
    conf, pred = P.max(axis=1), P.argmax(axis=1)
    right = pred == np.asarray(y)
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.sum() * abs(right[sel].mean() - conf[sel].mean())
    return float(total / len(P))


def _nll(L: np.ndarray, y: np.ndarray) -> float:
    P = softmax(L)
    return float(-np.mean(np.log(np.maximum(P[np.arange(len(y)), y], 1e-12))))


def fit_temperature(L: np.ndarray, y: np.ndarray) -> float:
    """The multiplier ``s`` of the logits minimising the mean cross-entropy of ``softmax(s * L)``
    (temperature ``1 / s``): one convex parameter, so fitting it on OOF logits cannot overfit
    the way a per-bin calibration would on a few hundred items.

    The targets are smoothed by ``1 / (n + 2)`` (the rule of succession): n items never all right
    or all wrong cannot support a confidence beyond ``(n + 1) / (n + 2)``, and without it OOF
    logits that happen to be all right would push ``s`` to its bound and every answer to 1.0.
    Bisection on the derivative (increasing: the loss is convex in ``s``), so it is deterministic.
    """
    L = np.asarray(L, np.float64)
    L = L - L.max(axis=1, keepdims=True)
    y = np.asarray(y, np.int64)
    n, k = L.shape
    eps = 1.0 / (n + 2)
    T = np.full((n, k), eps / k)
    T[np.arange(n), y] += 1.0 - eps
    target = np.sum(T * L, axis=1)

    def slope(s: float) -> float:
        return float(np.mean(np.sum(softmax(s * L) * L, axis=1) - target))

    lo, hi = _SCALE_MIN, _SCALE_MAX
    if slope(lo) >= 0:
        return lo
    if slope(hi) <= 0:
        return hi
    for _ in range(60):  # geometric bisection: 1e4 range to ~1e-14 relative
        mid = float(np.sqrt(lo * hi))
        if slope(mid) < 0:
            lo = mid
        else:
            hi = mid
    return float(np.sqrt(lo * hi))


def scale_logits(head: Head, s: float) -> Head:
    """The same head with every logit multiplied by ``s`` (its last layer scaled): the argmax is
    unchanged, and the ONNX graph needs no extra node."""
    a = registry.get(head.kind, "classify").scale_logits(dict(head.arrays), np.float32(s))
    return Head(head.kind, list(head.labels), a, dict(head.meta))


def _choose(tries: list, y: np.ndarray) -> tuple[int, list]:
    """The candidate that ships: the preferred one (listed first) unless another's OOF score leads
    it by more than one standard error of the paired per-item difference (the one-standard-error
    rule: a lead of an item or two among 200 is noise, and acting on it trades a known-good
    default for a coin flip); among those that lead by more, the best score. Returns (index,
    each candidate's lead over the preferred in standard errors, None where not scored)."""
    ref = tries[0][1]
    if tries[0][2] is None:
        return 0, [None] * len(tries)
    ok = ~np.isnan(ref[:, 0])
    base = np.argmax(ref[ok], axis=1) == y[ok]
    best, best_score = 0, tries[0][2]
    leads: list[float | None] = [0.0]
    for i, (_, oof, score) in enumerate(tries[1:], start=1):
        if score is None:
            leads.append(None)
            continue
        diff = (np.argmax(oof[ok], axis=1) == y[ok]).astype(float) - base
        se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("inf")
        lead = score - tries[0][2]
        leads.append(round(lead / se, 3) if se > 0 else (0.0 if lead == 0 else float("inf")))
        if lead > 0 and lead > se and score > best_score:
            best, best_score = i, score
    return best, leads


@dataclass
class CrossFit:
    """A head trained on all items and the out-of-fold evidence behind it.

    Attributes:
        head: the shipped head (chosen kind and L2, temperature folded in).
        logits: OOF logits (n, k), calibrated; rows never held out are NaN.
        plan: the folds.
        candidates: every (kind, l2) tried with its OOF accuracy, and which won.
        calibration: the temperature and what it did to the OOF cross-entropy and ECE.
    """

    head: Head
    logits: np.ndarray
    plan: FoldPlan
    candidates: list = field(default_factory=list)
    calibration: dict = field(default_factory=dict)

    @property
    def scored(self) -> np.ndarray:
        return ~np.isnan(self.logits[:, 0])

    def summary(self) -> dict:
        return {**self.plan.to_dict(), "candidates": self.candidates, "calibration": self.calibration}


def cross_fit(
    X,
    y,
    labels,
    *,
    cfg: HeadConfig,
    kinds=None,
    plan: FoldPlan | None = None,
    groups=None,
    scored=None,
    sample_weight=None,
    calibrate: bool = True,
) -> CrossFit:
    """Train a head on all rows and score every row out of fold (see the module docstring).

    Args:
        X, y, labels: features, class indices, class names (as :func:`train_head`).
        cfg: the head settings; ``l2`` None searches it on the OOF predictions.
        kinds: the candidates to choose from by OOF accuracy, each a kind name or a dict of
            :class:`HeadConfig` settings, the preferred first: another replaces it only with a
            lead beyond one standard error (:func:`_choose`); default ``cfg`` alone.
        plan: the folds (default: :func:`fold_plan` of ``y`` and ``groups``); pass the shipped
            model's plan to the reference so the two are paired item by item.
        scored: rows whose OOF logits count (augmented views are trained on, never scored);
            their folds must follow their item's.
        sample_weight: per-row weights (as :func:`train_head`).
        calibrate: fit the temperature on the OOF logits.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a base dependency
        return _cross_fit(
            X,
            y,
            labels,
            cfg=cfg,
            kinds=kinds,
            plan=plan,
            groups=groups,
            scored=scored,
            sample_weight=sample_weight,
            calibrate=calibrate,
        )
    # single-threaded BLAS, as train_head: small matrices, and spinning threads on busy cores cost 5x
    with threadpool_limits(limits=1, user_api="blas"):
        return _cross_fit(
            X,
            y,
            labels,
            cfg=cfg,
            kinds=kinds,
            plan=plan,
            groups=groups,
            scored=scored,
            sample_weight=sample_weight,
            calibrate=calibrate,
        )


def _cross_fit(X, y, labels, *, cfg, kinds, plan, groups, scored, sample_weight, calibrate) -> CrossFit:

    y = np.asarray(y, np.int64)
    k = len(labels)
    if plan is None:
        plan = fold_plan(y, k, groups=groups, seed=cfg.seed)
    tries = []
    for cand in kinds or (cfg.kind,):
        kcfg = dataclasses.replace(cfg, **(cand if isinstance(cand, dict) else {"kind": cand}))
        if not registry.get(kcfg.kind, "classify").uses_l2:
            kcfg = dataclasses.replace(kcfg, l2=None)
        # a plan without folds still goes in: the L2 then takes its default (nothing to choose on)
        head, oof = _fit(X, y, labels, cfg=kcfg, sample_weight=sample_weight, fold=plan.fold)
        if oof is None or not plan.folds:
            oof = np.full((len(y), k), np.nan)
        if scored is not None:
            oof[~np.asarray(scored, bool)] = np.nan
        ok = ~np.isnan(oof[:, 0])
        score = _weighted_score(y[ok], np.argmax(oof[ok], axis=1), k, cfg.balance, None) if ok.any() else None
        tries.append((head, oof, score))
    best, lead_se = _choose(tries, y)
    head, oof, _ = tries[best]
    ok = ~np.isnan(oof[:, 0])
    candidates = [
        {
            "kind": t[0].kind,
            "l2": t[0].meta.get("l2"),
            "oof_score": t[2],
            "chosen": i == best,
            "lead_se": lead_se[i],
            **{key: t[0].meta["config"][key] for key in registry.get(t[0].kind, "classify").calibration_keys},
        }
        for i, t in enumerate(tries)
    ]
    calibration: dict = {"method": "none", "items": int(ok.sum())}
    if calibrate and ok.sum() >= MIN_CALIBRATION_ITEMS and len(np.unique(y[ok])) >= 2:
        s = fit_temperature(oof[ok], y[ok])
        calibration = {
            "method": "temperature",
            "fitted_on": "out-of-fold logits",
            "items": int(ok.sum()),
            "temperature": round(1.0 / s, 6),
            "nll_before": round(_nll(oof[ok], y[ok]), 5),
            "nll_after": round(_nll(s * oof[ok], y[ok]), 5),
            "ece_before": round(expected_calibration_error(softmax(oof[ok]), y[ok]), 5),
            "ece_after": round(expected_calibration_error(softmax(s * oof[ok]), y[ok]), 5),
        }
        head = scale_logits(head, s)
        oof = oof * s
    elif calibrate:
        calibration["reason"] = (
            f"{int(ok.sum())} out-of-fold items (fewer than {MIN_CALIBRATION_ITEMS}): "
            "the probabilities are the head's own"
        )
    head.meta.update(
        calibration=calibration,
        temperature=calibration.get("temperature", 1.0),
        oof={**plan.to_dict(), "candidates": candidates},
    )
    return CrossFit(head, oof, plan, candidates, calibration)


def train_builtin(X, y, labels, *, cfg: HeadConfig, X_val=None, y_val=None, sample_weight=None) -> Head:
    """Train a linear, mlp or prototype head (see :func:`_train_head`).

    BLAS runs single-threaded here: the matrices are small (a few hundred rows), and OpenBLAS
    threads spinning for busy cores made training 5-10x slower on 2-core machines (measured:
    0.5 s vs 2.5-5 s for 500 x 1280 x 10 with automatic L2).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a base dependency
        return _train_calibrated(X, y, labels, cfg=cfg, X_val=X_val, y_val=y_val, sample_weight=sample_weight)
    with threadpool_limits(limits=1, user_api="blas"):
        return _train_calibrated(X, y, labels, cfg=cfg, X_val=X_val, y_val=y_val, sample_weight=sample_weight)


def _train_calibrated(X, y, labels, *, cfg: HeadConfig, X_val=None, y_val=None, sample_weight=None) -> Head:
    """A ``calibrate`` head (without validation rows) is cross-fitted: L2 and temperature from
    out-of-fold logits (:func:`edgetl.heads.crossfit.cross_fit`)."""
    if cfg.calibrate and X_val is None:
        return cross_fit(X, y, labels, cfg=cfg, sample_weight=sample_weight).head
    return _train_head(X, y, labels, cfg=cfg, X_val=X_val, y_val=y_val, sample_weight=sample_weight)
