"""The conversion gate: does the converted model lose more than the target allows? One decision
for every task, taken on paired evidence and with its uncertainty stated.

The FP32 reference and the converted model are scored on the *same* validation items, so the
comparison is paired: for accuracy, only the items on which the two disagree carry information;
for AUROC, DeLong's covariance of the two curves on the same images. From that the gate computes a
one-sided 95 % confidence bound on the true drop (a two-sided 90 % interval, ``[lower, upper]``):

* ``upper <= tolerance``: the drop is shown to be within tolerance -> **passed**;
* ``lower > tolerance``: the drop is shown to exceed it -> **refused** (the only outcome that
  fails ``fit``, exit code 3, and the only one that sends a profile to accuracy control);
* otherwise the validation set is too small to tell -> **inconclusive**: ``fit`` succeeds, says
  so in one warning line with about how many validation items would settle it, and records it.

Why these methods. Accuracy: Newcombe's hybrid score interval for a difference of paired
proportions (Newcombe 1998, method 10) combines the two Wilson intervals with the observed
correlation; it keeps its coverage at the sample sizes edgetl sees (tens of images) where the
Wald interval does not, and needs no iteration. AUROC: DeLong, DeLong & Clarke-Pearson (1988),
computed from mid-ranks (Sun & Xu 2014), the standard paired test for two ROC curves. A point
estimate compared with the tolerance (what each task did before) refuses good models for noise:
on 40 validation images one image is 2.5 points.

numpy only: the device's ``adapt`` could use it too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

# One-sided 95 % bounds: the gate is a one-sided question ("is the drop above the tolerance?").
CONFIDENCE = 0.95


def _z(confidence: float) -> float:
    """The standard normal quantile for a one-sided ``confidence`` (0.95 -> 1.645)."""
    return NormalDist().inv_cdf(confidence)


def wilson_interval(k: int, n: int, *, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n, with one-sided ``confidence`` at each end.

    Example:
        >>> lo, hi = wilson_interval(38, 40)
        >>> round(lo, 3), round(hi, 3)
        (0.86, 0.983)
    """
    if n <= 0:
        return 0.0, 1.0
    return _wilson(float(k), float(n), _z(confidence))


def paired_difference_interval(
    ref_correct, new_correct, *, confidence: float = CONFIDENCE
) -> tuple[float, float, float]:
    """(drop, lower, upper) of ``mean(ref) - mean(new)`` for paired 0/1 outcomes (Newcombe's method 10).

    Example:
        >>> ref = [1] * 40; new = [1] * 39 + [0]
        >>> d, lo, hi = paired_difference_interval(ref, new)
        >>> round(d, 3), lo < 0 < hi
        (0.025, True)
    """
    r = np.asarray(ref_correct, bool)
    s = np.asarray(new_correct, bool)
    return _newcombe(*_cells(r, s), confidence=confidence)


def _cells(r: np.ndarray, s: np.ndarray) -> tuple[float, float, float, float]:
    """(both right, only the reference right, only the converted model right, both wrong)."""
    a, b, c = float(np.sum(r & s)), float(np.sum(r & ~s)), float(np.sum(~r & s))
    return a, b, c, float(len(r)) - a - b - c


def _wilson(k: float, n: float, z: float) -> tuple[float, float]:
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(max(0.0, p * (1 - p) / n + z * z / (4 * n * n))) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def _newcombe(a: float, b: float, c: float, d: float, *, confidence: float) -> tuple[float, float, float]:
    """Newcombe's hybrid score interval from the four paired cells (which may be fractional: the
    gate rescales them to ask how many items would settle a question)."""
    n = a + b + c + d
    if n <= 0:
        return 0.0, -1.0, 1.0
    z = _z(confidence)
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = _wilson(a + b, n, z)
    l2, u2 = _wilson(a + c, n, z)
    den = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(den) if den > 0 else 0.0
    drop = p1 - p2
    lower = drop - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = drop + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return drop, lower, upper


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), np.float64)
    i = 0
    while i < len(x):
        j = i
        while j < len(x) and xs[j] == xs[i]:
            j += 1
        ranks[order[i:j]] = 0.5 * (i + j - 1) + 1
        i = j
    return ranks


def delong(y, scores_a, scores_b) -> tuple[float, float, float]:
    """(AUROC of a, AUROC of b, variance of their difference) on the same labelled items.

    Raises:
        ValueError: ``y`` lacks positives or negatives.
    """
    y = np.asarray(y).astype(bool)
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        raise ValueError("AUROC needs both positive and negative items")
    v10, v01, aucs = [], [], []
    for s in (np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)):
        pos, neg = s[y], s[~y]
        tz = _midranks(np.concatenate([pos, neg]))
        tx, ty = _midranks(pos), _midranks(neg)
        aucs.append((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
        v10.append((tz[:m] - tx) / n)  # per positive: share of negatives it outscores
        v01.append(1.0 - (tz[m:] - ty) / m)  # per negative: share of positives that outscore it
    s10 = np.cov(np.stack(v10)) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(np.stack(v01)) if n > 1 else np.zeros((2, 2))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    return float(aucs[0]), float(aucs[1]), max(0.0, float(var))


# The verdict of a "gate" with no conversion to judge (FP32 shipped, FP32 reference).
NOT_APPLICABLE = "not applicable"


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided and on which evidence. Points (pp) are percentage points of the metric.

    Attributes:
        metric: ``accuracy`` or ``image_auroc``.
        reference / value: the FP32 and the converted model's figure (0..1).
        drop_pp: reference minus value, in points; ``lower_pp`` / ``upper_pp`` its one-sided
            ``confidence`` bounds.
        verdict: ``passed``, ``inconclusive``, ``refused``, ``not measured`` or ``not applicable``
            (nothing was quantized: an FP32 model against the FP32 reference).
        needed_items: for an inconclusive verdict, about how many validation items (at the rates
            observed) would settle it.
    """

    metric: str
    tolerance_pp: float
    n: int
    reference: float | None = None
    value: float | None = None
    drop_pp: float | None = None
    lower_pp: float | None = None
    upper_pp: float | None = None
    verdict: str = "not measured"
    needed_items: int | None = None
    method: str = ""
    confidence: float = CONFIDENCE

    @property
    def passed(self) -> bool:
        """Everything but a shown excess passes: the gate never refuses for noise."""
        return self.verdict != "refused"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GateDecision:
        """The decision recorded in a report (extra keys, e.g. accuracy control's, are ignored)."""
        import dataclasses

        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def describe(self) -> str:
        """One line for people: the drop, its interval, the tolerance and what was decided."""
        if self.verdict == NOT_APPLICABLE:
            return f"{self.metric.replace('_', ' ')}: {NOT_APPLICABLE} ({self.method})"
        if self.drop_pp is None:
            return f"{self.metric}: not measured ({self.method or 'no reference'})"
        pp = lambda v: f"{v + 0.0:.2f}".replace("-0.00", "0.00")  # noqa: E731 - no "-0.00" for people
        text = (
            f"{self.metric.replace('_', ' ')} drop {pp(self.drop_pp)} pp vs FP32 on {self.n} items, "
            f"{self.confidence:.0%} bounds [{pp(self.lower_pp)}, {pp(self.upper_pp)}] pp, "
            f"tolerance {self.tolerance_pp:g} pp: {self.verdict}"
        )
        if self.verdict == "inconclusive":
            more = f"about {self.needed_items}" if self.needed_items else "many more"
            text += f" (too few validation items to tell; {more} would settle it)"
        return text


def _needed(n: int, interval_at, tol: float) -> int | None:
    """The smallest item count at which the interval, with the rates observed so far, would no
    longer straddle the tolerance. ``interval_at(m)`` gives (drop, lower, upper) at ``m`` items."""

    def settled(m: float) -> bool:
        _, lo, hi = interval_at(m)
        return hi <= tol or lo > tol

    hi = float(n)
    while not settled(hi):
        hi *= 2
        if hi > 1e7:  # the observed drop sits on the tolerance: no sample size settles it
            return None
    lo = float(n)
    while hi - lo > max(1.0, 0.01 * lo):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if settled(mid) else (mid, hi)
    return int(math.ceil(hi))


def _decide(
    metric: str, n: int, ref: float, value: float, tolerance_pp: float, method: str, confidence: float, interval_at
) -> GateDecision:
    tol = tolerance_pp / 100.0
    drop, lower, upper = interval_at(float(n))
    if upper <= tol:
        verdict = "passed"
    elif lower > tol:
        verdict = "refused"
    else:
        verdict = "inconclusive"
    needed = _needed(n, interval_at, tol) if verdict == "inconclusive" else None
    r = lambda v: round(100.0 * float(v), 3)  # noqa: E731
    return GateDecision(
        metric,
        float(tolerance_pp),
        n,
        round(ref, 6),
        round(value, 6),
        r(drop),
        r(lower),
        r(upper),
        verdict,
        needed,
        method,
        confidence,
    )


def accuracy_gate(ref_correct, new_correct, *, tolerance_pp: float, confidence: float = CONFIDENCE) -> GateDecision:
    """Gate a converted classifier on paired per-item correctness (1 = right) against FP32.

    Example:
        >>> g = accuracy_gate([1] * 40, [1] * 39 + [0], tolerance_pp=1.0)
        >>> g.verdict, g.passed
        ('inconclusive', True)
    """
    r = np.asarray(ref_correct, bool)
    s = np.asarray(new_correct, bool)
    if len(r) != len(s):
        raise ValueError(f"paired outcomes differ in length: {len(r)} vs {len(s)}")
    if len(r) == 0:
        return GateDecision("accuracy", float(tolerance_pp), 0, method="no validation items")
    cells = np.array(_cells(r, s))

    def interval_at(m: float):
        return _newcombe(*(cells * (m / len(r))), confidence=confidence)

    return _decide(
        "accuracy",
        len(r),
        float(r.mean()),
        float(s.mean()),
        tolerance_pp,
        "paired, Newcombe hybrid score interval",
        confidence,
        interval_at,
    )


def auroc_gate(y, ref_scores, new_scores, *, tolerance_pp: float, confidence: float = CONFIDENCE) -> GateDecision:
    """Gate a converted one-class detector on paired image scores against FP32 (DeLong).

    With no labelled anomalies there is no AUROC to compare; the decision is ``not measured``.
    """
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return GateDecision(
            "image_auroc", float(tolerance_pp), int(len(y)), method="no labelled anomalies to compare on"
        )
    a_ref, a_new, var = delong(y, ref_scores, new_scores)
    drop, z, n = a_ref - a_new, _z(confidence), len(y)

    def interval_at(m: float):  # DeLong's variance falls as 1 / items at fixed class balance
        half = z * math.sqrt(var * n / m)
        return drop, drop - half, drop + half

    return _decide("image_auroc", int(n), a_ref, a_new, tolerance_pp, "paired, DeLong", confidence, interval_at)


def enforce(
    decision: GateDecision,
    *,
    model: str,
    target: str,
    items: str = "images",
    allow: bool = False,
    hint: str = "try --calibration-size, another --target or --precision",
    after: str = "",
) -> None:
    """Act on a decision the same way for every task: a refusal raises (unless ``allow``), an
    inconclusive one warns once on stderr; both messages give the drop and its interval.

    Args:
        model: what was converted, e.g. ``"int8 model"`` or ``"int8 encoder"``.
        target: the profile's name.
        items: what the validation items are (``images``, ``texts``).
        after: extra words for the refusal (what accuracy control tried).

    Raises:
        GateError: the drop is shown to exceed the tolerance and ``allow`` is not set.
    """
    import logging

    from ..errors import GateError

    d = decision
    if d.drop_pp is None:
        return
    bounds = f"{d.confidence:.0%} bounds [{d.lower_pp:.2f}, {d.upper_pp:.2f}] on {d.n} {items}"
    if d.verdict == "refused" and not allow:
        raise GateError(
            f"{model} loses {d.drop_pp:.2f} points of {d.metric.replace('_', ' ')} vs FP32 ({bounds}; "
            f"target {target} allows {d.tolerance_pp:g}){after}; {hint}, or accept it with --allow-drop"
        )
    if d.verdict == "inconclusive":
        more = f"about {d.needed_items}" if d.needed_items else "many more"
        logging.getLogger("edgetl").warning(
            "%d validation %s are too few to tell whether the %s stays within %g pp of FP32 (%s drop %.2f pp, %s); "
            "%s %s would settle it",
            d.n,
            items,
            model,
            d.tolerance_pp,
            d.metric.replace("_", " "),
            d.drop_pp,
            bounds,
            more,
            items,
        )


# ------------------------------------------------------------------------ on-device update gates
# The share of truly good images a deployed defect threshold may call defects, at most: a cut
# that flags more than one good image in ten would be unusable on a line, so it bounds what an
# honest batch of new "good" images can show.
GOOD_FALSE_ALARM_MAX = 0.10
# A batch whose defect count is this improbable under that rate is not a batch of good images.
NEW_GOOD_ALPHA = 0.01


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exactly (n is a batch of images: small)."""
    if k <= 0:
        return 1.0
    return float(min(1.0, sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))))


def new_good_gate(
    scores, threshold: float, names=None, *, false_alarm: float = GOOD_FALSE_ALARM_MAX, alpha: float = NEW_GOOD_ALPHA
) -> dict:
    """Are images offered as *good* for a defect detector's update really this product's good images?

    The current model scores them before they are learned. Good images score as defects at most
    ``false_alarm`` of the time, so ``k`` of ``n`` over the threshold is evidence against the batch
    when P(X >= k | n, false_alarm) < ``alpha``: twelve images of another product that all score as
    defects have p ~ 1e-12, while one or two honest false alarms in a dozen pass. Learning such a
    batch would teach the detector that those parts are good (image AUROC 0.96 -> 0.73 in the case
    that motivated this). Returns ``reasons`` (empty when the batch passes) and the figures.
    """
    s = np.asarray(scores, dtype=np.float64)
    n, over = int(len(s)), np.flatnonzero(s >= threshold)
    p = binomial_tail(len(over), n, false_alarm)
    shown = [str(names[i]) for i in over[:3]] if names is not None else []
    reasons = []
    if n and p < alpha:
        reasons.append(
            f"{len(over)} of {n} new 'good' images score as defects under the current model (a good image "
            f"does at most {false_alarm:.0%} of the time: p = {p:.1g}), e.g. {', '.join(shown)}; are they "
            "this product? Pass --force to learn them anyway"
        )
    return {
        "images": n,
        "over_threshold": int(len(over)),
        "p_value": p,
        "false_alarm_bound": false_alarm,
        "alpha": alpha,
        "max_normalised": round(float(s.max() / threshold), 4) if n and threshold > 0 else None,
        "reasons": reasons,
    }


# Fewer images than this of a new class cannot show the class is learnable (a held-out split of
# them is 1 image) nor that it differs from the known ones.
MIN_NEW_CLASS_IMAGES = 5


def new_class_gate(predicted, new_labels, known: list[str], *, min_images: int = MIN_NEW_CLASS_IMAGES) -> dict:
    """A classifier update's evidence for each class it adds.

    ``predicted`` are the current head's predictions (label names) for the new images. A new class
    with fewer than ``min_images`` images is refused (``reasons``); one whose images the current
    head sends mostly to one known class (one-sided 95 % Wilson bound above one half) is warned
    about (``warnings``): the same parts under a new name become a duplicate class that splits
    that class's answers.
    """
    predicted, lab = np.asarray(predicted, dtype=object), np.asarray(new_labels, dtype=object)
    reasons: list[str] = []
    warnings: list[str] = []
    per: dict[str, dict[str, Any]] = {}
    for name in sorted(set(new_labels) - set(known)):
        rows = np.flatnonzero(lab == name)
        per[name] = {"images": int(len(rows))}
        if len(rows) < min_images:
            reasons.append(f"new class {name!r} has {len(rows)} image(s); give at least {min_images} to add a class")
            continue
        values, counts = np.unique(predicted[rows], return_counts=True)
        top = int(np.argmax(counts))
        if wilson_interval(int(counts[top]), len(rows))[0] > 0.5:
            per[name]["looks_like"] = str(values[top])
            warnings.append(
                f"new class {name!r}: {int(counts[top])} of {len(rows)} of its images look like the known "
                f"class {values[top]!r} to the current head; the same parts under a new name?"
            )
    return {"classes": per, "reasons": reasons, "warnings": warnings}
