"""Choose a backbone by measurement: LogME and cross-validated head accuracy on your own labels.

Two scores per candidate backbone, both from features already extracted (the FP32 or INT8 features
of the training images, one matrix per backbone, rows in the same order):

* **LogME** (:func:`edgetl.transfer.evidence.logme`): no training at all, one eigen-decomposition.
  Its spread is a *paired* bootstrap over images (the same resampled rows for every backbone).
* **Cross-validated accuracy** of edgetl's own head (:func:`cv_accuracy`): stratified k-fold, or
  grouped folds (every group whole in one fold) when groups are given, so near-copies of one part
  never sit on both sides. Every image gets one out-of-fold prediction; the accuracy's interval is
  Wilson's on those items, and two backbones are compared *paired* on the same items (Newcombe's
  interval, the one edgetl's conversion gate uses).

:func:`choose_backbone` then decides, without picking on noise:

1. candidates are the backbones within ``budget_ms`` (all when no budget; the fastest when none fits);
2. the *leader* is the candidate with the best primary score (``by="cv"`` or ``by="logme"``);
3. the choice is the **cheapest candidate the leader is not shown to beat**: for ``cv``, the lower
   one-sided ``confidence`` bound of the paired accuracy difference is <= 0; for ``logme``, the
   leader wins fewer than ``confidence`` of the paired bootstrap replicates. A cheaper backbone
   is worth its saved milliseconds unless the data show the dearer one is better.

What it is worth (``benchmarks/transfer.py``: EfficientNet-Lite0/1/2, 8 datasets x 5 draws of 40-200
training images, held-out accuracy on unseen images as the truth): both scores rank these three
close backbones weakly — mean Kendall tau 0.18 for cross-validated accuracy (grouped folds where
the data have groups: on crops of shared photographs ungrouped folds gave tau -0.53, grouped +0.63)
and 0.10 for LogME — and the chosen backbone was more than 1 point below the best held-out one in
22 of 40 runs (16 of 40 under a budget excluding Lite2). The held-out gaps between these backbones
are mostly 1-4 points, at or under what 40-200 training images resolve; treat the table as
"which backbones are clearly worse", not as a precise order. Scoring three backbones takes about
a second on cached features.

numpy only (head training is edgetl's numpy trainer).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..core.gate import paired_difference_interval as paired_difference
from ..core.gate import wilson_interval as wilson
from ..core.metrics import stratified_folds
from ._stats import grouped_folds, kendall_tau_b, train_linear_head
from .evidence import logme

__all__ = [
    "CVResult",
    "BackboneScore",
    "RankResult",
    "cv_accuracy",
    "score_backbones",
    "choose_backbone",
    "rank_backbones",
]

CONFIDENCE = 0.95
# What the choice can be decided by: cross-validated head accuracy, or LogME (no training).
SCORES = ("cv", "logme")


@dataclass
class CVResult:
    """Out-of-fold accuracy of a head on frozen features.

    Attributes:
        accuracy: pooled out-of-fold accuracy; ``lower`` / ``upper`` its Wilson bounds (each
            one-sided at ``(1 + confidence) / 2``, i.e. a two-sided ``confidence`` interval). The
            interval treats images as independent and ignores fold-to-fold training variance.
        correct: per row, whether its out-of-fold prediction was right (rows in input order).
        fold_accuracy: accuracy of each fold; ``grouped`` whether folds kept groups whole.
    """

    accuracy: float
    lower: float
    upper: float
    n: int
    correct: np.ndarray
    fold_accuracy: list[float]
    folds: int
    grouped: bool
    confidence: float = CONFIDENCE


def _labels(y) -> tuple[np.ndarray, int]:
    y = np.asarray(y)
    classes, idx = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError("need at least 2 classes")
    return idx.astype(np.int64), len(classes)


def cv_accuracy(
    features,
    y,
    groups=None,
    *,
    folds: int = 5,
    seed: int = 0,
    head_kind: str = "linear",
    l2: float | None = None,
    confidence: float = CONFIDENCE,
) -> CVResult:
    """k-fold cross-validated accuracy of edgetl's head on ``features`` (n, d).

    ``groups`` (n,) keeps each group whole in one fold (folds = number of groups if fewer). The head
    is :func:`edgetl.heads.train_head` with its automatic L2 (chosen inside each training fold).

    Raises:
        ValueError: fewer than 2 classes, shapes that do not match, or fewer than 2 groups.
    """
    X = np.asarray(features, np.float32)
    yi, k = _labels(y)
    if X.ndim != 2 or X.shape[0] != len(yi):
        raise ValueError(f"features {X.shape} do not match {len(yi)} labels")
    grouped = groups is not None
    if grouped:
        groups = np.asarray(groups)
        if groups.shape != yi.shape:
            raise ValueError("groups must have one entry per row")
        n_groups = len(np.unique(groups.astype(str)))
        if n_groups < 2:
            raise ValueError("grouped folds need at least 2 groups")
        folds = min(folds, n_groups)
        fold = grouped_folds(yi, groups, folds, seed)
    else:
        folds = max(2, min(folds, int(np.bincount(yi).max())))
        fold = stratified_folds(yi, folds, seed)
    pred = np.empty(len(yi), np.int64)
    fold_acc = []
    for f in range(folds):
        test = fold == f
        if not test.any() or test.all():
            continue
        tr = ~test
        if len(np.unique(yi[tr])) < 2:  # a fold whose training part holds one class: predict it
            pred[test] = yi[tr][0]
        else:
            head = train_linear_head(X[tr], yi[tr], k, kind=head_kind, seed=seed, l2=l2)
            pred[test] = head.predict(X[test])
        fold_acc.append(float(np.mean(pred[test] == yi[test])))
    correct = pred == yi
    lo, hi = wilson(int(correct.sum()), len(correct), confidence=(1 + confidence) / 2)
    return CVResult(float(correct.mean()), lo, hi, len(correct), correct, fold_acc, folds, grouped, confidence)


@dataclass
class BackboneScore:
    """What was measured for one backbone (see :func:`score_backbones`)."""

    name: str
    logme: float | None = None
    logme_sd: float | None = None
    cv: CVResult | None = None
    latency_ms: float | None = None
    bootstrap: np.ndarray | None = field(default=None, repr=False)

    def row(self) -> dict:
        cv = self.cv
        return {
            "backbone": self.name,
            "logme": None if self.logme is None else round(self.logme, 4),
            "logme_sd": None if self.logme_sd is None else round(self.logme_sd, 4),
            "cv_accuracy": None if cv is None else round(cv.accuracy, 4),
            "cv_lower": None if cv is None else round(cv.lower, 4),
            "cv_upper": None if cv is None else round(cv.upper, 4),
            "n": None if cv is None else cv.n,
            "latency_ms": self.latency_ms,
        }


def score_backbones(
    features_by_backbone: dict,
    y,
    groups=None,
    *,
    latency_ms: dict | None = None,
    use_logme: bool = True,
    use_cv: bool = True,
    folds: int = 5,
    seed: int = 0,
    bootstrap: int = 30,
    head_kind: str = "linear",
    confidence: float = CONFIDENCE,
) -> list[BackboneScore]:
    """LogME (with a paired bootstrap) and cross-validated accuracy for each backbone's features.

    All matrices must have the same rows (the same images in the same order); their widths may differ.
    ``bootstrap`` replicates resample rows once, shared by every backbone (0 skips the bootstrap).
    """
    yi, _ = _labels(y)
    names = list(features_by_backbone)
    if not names:
        raise ValueError("no backbones to score")
    rng = np.random.default_rng(seed)
    boots = [rng.integers(0, len(yi), len(yi)) for _ in range(bootstrap if use_logme else 0)]
    out = []
    for name in names:
        X = np.asarray(features_by_backbone[name], np.float32)
        if X.ndim != 2 or X.shape[0] != len(yi):
            raise ValueError(f"{name}: features {X.shape} do not match {len(yi)} labels")
        s = BackboneScore(name, latency_ms=None if latency_ms is None else latency_ms.get(name))
        if use_logme:
            s.logme = logme(X, yi).score
            if boots:
                s.bootstrap = np.array([logme(X[b], yi[b]).score for b in boots])
                s.logme_sd = float(s.bootstrap.std(ddof=1))
        if use_cv:
            s.cv = cv_accuracy(X, yi, groups, folds=folds, seed=seed, head_kind=head_kind, confidence=confidence)
        out.append(s)
    return out


@dataclass
class RankResult:
    """A ranking table, the chosen backbone and why.

    Attributes:
        table: one dict per backbone (``backbone, logme, logme_sd, cv_accuracy, cv_lower, cv_upper,
            n, latency_ms, within_budget, rank``), best primary score first.
        choice: the backbone to use; ``leader`` the best-scoring candidate; ``by`` the primary score.
        comparisons: for each candidate cheaper than the leader, the evidence that the leader is
            better (``cv``: paired difference and bounds in points; ``logme``: the share of
            bootstrap replicates the leader wins).
        reason: one line saying why ``choice`` was made.
        tau_logme_cv: Kendall's tau-b between the two scores' rankings (NaN with fewer than 2 of either).
    """

    table: list[dict]
    choice: str
    leader: str
    by: str
    comparisons: list[dict]
    reason: str
    tau_logme_cv: float
    budget_ms: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """A plain-text table plus the reason line."""
        lines = [f"{'backbone':<24} {'LogME':>14} {'CV accuracy (95% CI)':>26} {'ms':>7}  rank"]
        for r in self.table:
            lm = (
                "-"
                if r["logme"] is None
                else (f"{r['logme']:.3f}" + (f" +-{r['logme_sd']:.3f}" if r["logme_sd"] is not None else ""))
            )
            cv = (
                "-"
                if r["cv_accuracy"] is None
                else (f"{100 * r['cv_accuracy']:.1f}% [{100 * r['cv_lower']:.1f}, {100 * r['cv_upper']:.1f}]")
            )
            ms = "-" if r["latency_ms"] is None else f"{r['latency_ms']:.1f}"
            mark = " *" if r["backbone"] == self.choice else ""
            lines.append(
                f"{r['backbone']:<24} {lm:>14} {cv:>26} {ms:>7}  {r['rank']}{mark}"
                + ("" if r["within_budget"] else "  (over budget)")
            )
        return "\n".join(lines + [self.reason])


def _primary(s: BackboneScore, by: str) -> float:
    if by == "cv":
        if s.cv is None:
            raise ValueError("by='cv' needs cross-validated accuracy (use_cv=True)")
        return s.cv.accuracy
    if s.logme is None:
        raise ValueError("by='logme' needs LogME (use_logme=True)")
    return s.logme


def choose_backbone(
    scores: list[BackboneScore], *, by: str = "cv", budget_ms: float | None = None, confidence: float = CONFIDENCE
) -> RankResult:
    """Pick a backbone from measured scores (the rule is in the module docstring).

    Latencies come from ``BackboneScore.latency_ms``; without them "cheaper" is undefined and the
    leader is chosen. A backbone without a latency is never over budget.
    """
    if by not in SCORES:
        raise ValueError(f"by must be 'cv' or 'logme', got {by!r}")
    within = {s.name: budget_ms is None or s.latency_ms is None or s.latency_ms <= budget_ms for s in scores}
    cands = [s for s in scores if within[s.name]]
    note = ""
    if not cands:
        fastest = min(scores, key=lambda s: s.latency_ms)
        cands = [fastest]
        note = f"; no backbone meets the {budget_ms:g} ms budget, so the fastest"
    order = sorted(scores, key=lambda s: -_primary(s, by))
    leader = max(cands, key=lambda s: _primary(s, by))
    comparisons = []
    choice = leader
    cheaper = [
        s
        for s in cands
        if s is not leader
        and s.latency_ms is not None
        and leader.latency_ms is not None
        and s.latency_ms < leader.latency_ms
    ]
    for s in sorted(cheaper, key=lambda s: s.latency_ms):
        if by == "cv":
            d, lo, hi = paired_difference(leader.cv.correct, s.cv.correct, confidence=confidence)
            shown = lo > 0
            comparisons.append(
                {
                    "backbone": s.name,
                    "leader_minus_pp": round(100 * d, 2),
                    "lower_pp": round(100 * lo, 2),
                    "upper_pp": round(100 * hi, 2),
                    "leader_shown_better": bool(shown),
                }
            )
        else:
            if leader.bootstrap is None or s.bootstrap is None:
                wins, shown = float("nan"), True  # no spread measured: trust the point estimate
            else:
                wins = float(np.mean(leader.bootstrap > s.bootstrap))
                shown = wins >= confidence
            comparisons.append(
                {
                    "backbone": s.name,
                    "leader_minus": round(leader.logme - s.logme, 4),
                    "leader_wins_bootstrap": None if math.isnan(wins) else round(wins, 3),
                    "leader_shown_better": bool(shown),
                }
            )
        if not shown and choice is leader:
            choice = s  # the cheapest one the leader is not shown to beat
    if choice is leader:
        reason = f"{leader.name}: best {by} among {'the backbones within budget' if budget_ms else 'all'}" + note
        if comparisons:
            reason += f", shown better than every cheaper one at {confidence:.0%}"
    else:
        c = next(c for c in comparisons if c["backbone"] == choice.name)
        ev = (
            f"difference {c['leader_minus_pp']:+.1f} pp, one-sided {confidence:.0%} lower bound {c['lower_pp']:+.1f} pp"
            if by == "cv"
            else f"LogME difference {c['leader_minus']:+.4f}, leader wins {c['leader_wins_bootstrap']} of "
            "bootstrap replicates"
        )
        reason = (
            f"{choice.name}: cheaper ({choice.latency_ms:.1f} vs {leader.latency_ms:.1f} ms) and not shown "
            f"worse than the best-scoring {leader.name} ({ev}){note}"
        )
    table = []
    for rank, s in enumerate(order, start=1):
        row = s.row()
        row.update(within_budget=within[s.name], rank=rank)
        table.append(row)
    with_both = [s for s in scores if s.logme is not None and s.cv is not None]
    tau = (
        kendall_tau_b([s.logme for s in with_both], [s.cv.accuracy for s in with_both])
        if len(with_both) >= 2
        else float("nan")
    )
    return RankResult(table, choice.name, leader.name, by, comparisons, reason, tau, budget_ms)


def rank_backbones(
    features_by_backbone: dict,
    y,
    groups=None,
    latency_ms: dict | None = None,
    budget_ms: float | None = None,
    *,
    by: str = "cv",
    folds: int = 5,
    seed: int = 0,
    bootstrap: int = 30,
    confidence: float = CONFIDENCE,
) -> RankResult:
    """Score every backbone (LogME and cross-validated accuracy) and choose one.

    Args:
        features_by_backbone: ``{name: features (n, d)}``, the same n labelled images for each.
        y: class labels (n,), any hashable values.
        groups: optional (n,) group per image (part, session, camera): folds keep groups whole.
        latency_ms: optional ``{name: milliseconds per image}`` on the target device.
        budget_ms: optional latency budget; backbones above it are not chosen.
        by: ``"cv"`` or ``"logme"``: the primary score. ``cv`` is the default: it ranked backbones
            somewhat better than LogME here (module docstring) and its noise rule is a paired test
            on the same images; LogME costs one eigen-decomposition instead of k head trainings.

    Example:
        >>> rng = np.random.default_rng(0); y = np.repeat([0, 1, 2], 30)
        >>> good = np.eye(3)[y] * 2 + rng.normal(size=(90, 3))
        >>> r = rank_backbones({"small": good, "big": good + 0.01}, y, latency_ms={"small": 5, "big": 9})
        >>> r.choice
        'small'
    """
    scores = score_backbones(
        features_by_backbone,
        y,
        groups,
        latency_ms=latency_ms,
        folds=folds,
        seed=seed,
        bootstrap=bootstrap,
        confidence=confidence,
    )
    return choose_backbone(scores, by=by, budget_ms=budget_ms, confidence=confidence)
