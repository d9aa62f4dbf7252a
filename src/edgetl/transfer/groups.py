"""Accuracy per group of inputs (camera, shift, supplier): which group does worst, and is it noise?

A backbone pre-trained on ImageNet carries ImageNet's habits: it may do well on the bright camera
and badly on the dim one, well on one supplier's parts and badly on another's. The overall accuracy
hides that. :func:`group_accuracy` takes per-image truth, prediction and group (a CSV column, a
folder level, the drift verdict of each folder...) and gives:

* each group's accuracy with its Wilson interval (two-sided ``confidence``);
* the **worst group** and its **gap** to the rest of the images (rest minus worst, in points), with
  Newcombe's hybrid score interval for two independent proportions;
* a **flag** when the gap is beyond noise. The worst group is picked *after* looking at all ``G``
  groups, so its bounds are Bonferroni-adjusted: each is one-sided at ``1 - (1 - confidence) / G``,
  and the flag needs the lower bound above ``min_gap_pp``. With equal true accuracies the flag fires
  in at most ``1 - confidence`` of datasets.

numpy only; runs on the device after ``eval``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..core.gate import wilson_interval as wilson
from ._stats import unpaired_difference

__all__ = ["GroupReport", "group_accuracy"]

CONFIDENCE = 0.95


@dataclass
class GroupReport:
    """Per-group accuracy and the worst group's gap (points = percentage points).

    Attributes:
        groups: one dict per group, worst first: ``group, n, correct, accuracy, lower, upper``.
        worst: the group with the lowest accuracy (ties: the larger group, then the name).
        gap_pp: accuracy of all other images minus the worst group's; ``lower_pp`` / ``upper_pp``
            its Bonferroni-adjusted bounds (each one-sided at ``adjusted_confidence``).
        flagged: the lower bound exceeds ``min_gap_pp``; ``message`` says so in one line.
    """

    groups: list[dict]
    worst: str | None
    gap_pp: float | None
    lower_pp: float | None
    upper_pp: float | None
    flagged: bool
    message: str
    confidence: float
    adjusted_confidence: float
    min_gap_pp: float
    overall_accuracy: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def group_accuracy(
    y_true, y_pred, groups, *, confidence: float = CONFIDENCE, min_gap_pp: float = 0.0, min_group_size: int = 1
) -> GroupReport:
    """Accuracy per group, the worst group, its gap to the rest with an interval, and a flag.

    Args:
        y_true / y_pred: labels (any comparable values), one per image.
        groups: one group name per image (e.g. a CSV column: camera, shift, supplier).
        min_gap_pp: the flag needs the gap's lower bound above this many points (0: any real gap).
        min_group_size: groups with fewer images are listed but never chosen as the worst.

    Example:
        >>> y = [0] * 200; pred = [0] * 100 + [0] * 60 + [1] * 40
        >>> r = group_accuracy(y, pred, ["day"] * 100 + ["night"] * 100)
        >>> r.worst, r.gap_pp, r.flagged
        ('night', 40.0, True)
    """
    t = np.asarray(y_true)
    p = np.asarray(y_pred)
    g = np.asarray(groups).astype(str)
    if not (t.shape == p.shape == g.shape) or t.ndim != 1:
        raise ValueError(f"y_true, y_pred and groups need one entry per image; got {t.shape}, {p.shape}, {g.shape}")
    n = len(t)
    if n == 0:
        raise ValueError("no images")
    correct = t == p
    names = sorted(set(g.tolist()))
    G = len(names)
    adj = 1.0 - (1.0 - confidence) / max(G, 1)
    rows = []
    for name in names:
        sel = g == name
        k, m = int(correct[sel].sum()), int(sel.sum())
        lo, hi = wilson(k, m, confidence=(1 + confidence) / 2)
        rows.append(
            {
                "group": name,
                "n": m,
                "correct": k,
                "accuracy": round(k / m, 4),
                "lower": round(lo, 4),
                "upper": round(hi, 4),
            }
        )
    rows.sort(key=lambda r: (r["accuracy"], -r["n"], r["group"]))
    overall = float(correct.mean())
    eligible = [r for r in rows if r["n"] >= min_group_size]
    if G < 2 or not eligible:
        return GroupReport(
            rows,
            None,
            None,
            None,
            None,
            False,
            "one group only: nothing to compare" if G < 2 else "no group is large enough to compare",
            confidence,
            adj,
            float(min_gap_pp),
            round(overall, 4),
            n,
        )
    worst = eligible[0]
    rest_k, rest_n = int(correct.sum()) - worst["correct"], n - worst["n"]
    d, lo, hi = unpaired_difference(rest_k, rest_n, worst["correct"], worst["n"], wilson, confidence=adj)
    flagged = 100 * lo > min_gap_pp
    evidence = (
        f"group {worst['group']!r}: {worst['accuracy']:.1%} on {worst['n']} images vs {rest_k / rest_n:.1%} "
        f"on the other {rest_n} (gap {100 * d:.1f} pp, bounds [{100 * lo:.1f}, {100 * hi:.1f}] at "
        f"{adj:.2%} one-sided, Bonferroni over {G} groups)"
    )
    if flagged:
        msg = (
            f"{evidence}: beyond noise; collect and label more images like this group and run edgetl adapt, "
            "or check what differs there (lighting, camera, supplier)"
        )
    else:
        msg = f"{evidence}: within noise"
    return GroupReport(
        rows,
        worst["group"],
        round(100 * d, 2),
        round(100 * lo, 2),
        round(100 * hi, 2),
        flagged,
        msg,
        confidence,
        adj,
        float(min_gap_pp),
        round(overall, 4),
        n,
    )
