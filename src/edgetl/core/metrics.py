"""Metrics every task reports, and their plain-text rendering (numpy only: used on the device too):
classification accuracy with its interval, per-class recall and precision, the confusion matrix;
AUROC and the best-F1 cut of a detector; the gate's decision as lines of a fit summary."""

from __future__ import annotations

import numpy as np


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict:
    """Accuracy, per-class recall and precision, and the confusion matrix (rows = true class).

    Example:
        >>> m = classification_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]), ["a", "b"])
        >>> m["accuracy"], m["per_class_recall"]["b"]
        (0.6667, 0.5)
    """
    k = len(labels)
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    cm = np.zeros((k, k), dtype=np.int64)
    if len(y_true):
        np.add.at(cm, (y_true, y_pred), 1)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    diag = np.diag(cm)
    recall = {labels[i]: (round(float(diag[i] / support[i]), 4) if support[i] else None) for i in range(k)}
    precision = {labels[i]: (round(float(diag[i] / predicted[i]), 4) if predicted[i] else None) for i in range(k)}
    n = int(support.sum())
    present = [r for r in recall.values() if r is not None]
    from .gate import wilson_interval

    # Two-sided 95 %: what a figure on this many items could be (40 items: about +-8 points).
    lo, hi = wilson_interval(int(diag.sum()), n, confidence=0.975) if n else (None, None)
    return {
        "n": n,
        "accuracy": round(float(diag.sum() / n), 4) if n else None,
        "accuracy_interval": [round(lo, 4), round(hi, 4)] if lo is not None and hi is not None else None,
        # over the classes with at least one item: a class absent from the data cannot count
        "balanced_accuracy": round(float(np.mean(present)), 4) if present else None,
        "classes_present": len(present),
        "classes_missing": [labels[i] for i in range(k) if not support[i]],
        "per_class_recall": recall,
        "per_class_precision": precision,
        "support": {labels[i]: int(support[i]) for i in range(k)},
        "confusion_matrix": cm.tolist(),
        "labels": list(labels),
    }


def format_metrics(m: dict, *, title: str = "", items: str = "images") -> str:
    """A human-readable block: accuracy (with its interval), per-class recall, confusion matrix."""
    labels = m["labels"]
    lines = []
    if title:
        lines.append(title)
    acc = m["accuracy"]
    ci = m.get("accuracy_interval")
    interval = f"; 95% interval {ci[0] * 100:.1f}-{ci[1] * 100:.1f}%" if ci else ""
    lines.append(
        f"accuracy  {acc * 100:.2f}%  ({m['n']} {items}{interval})"
        if acc is not None
        else f"accuracy  n/a (no {items})"
    )
    if m.get("balanced_accuracy") is not None:
        missing = m.get("classes_missing") or []
        note = (
            (
                f"  (over {len(labels) - len(missing)} of {len(labels)} classes; no {items} of "
                f"{', '.join(map(repr, missing[:3]))}{' ...' if len(missing) > 3 else ''})"
            )
            if missing
            else ""
        )
        lines.append(f"balanced  {m['balanced_accuracy'] * 100:.2f}%{note}")
    width = max(8, *(len(l) for l in labels))
    lines.append("")
    lines.append(f"{'class':<{width}}  recall   support")
    for lbl in labels:
        r = m["per_class_recall"][lbl]
        lines.append(f"{lbl:<{width}}  {'  n/a ' if r is None else f'{r * 100:5.1f}%'}   {m['support'][lbl]:>7}")
    lines.append("")
    lines.append("confusion matrix (rows: true, columns: predicted)")
    cw = max(5, *(len(str(v)) for row in m["confusion_matrix"] for v in row))
    short = [l[:cw] for l in labels]
    lines.append(" " * (width + 2) + " ".join(f"{s:>{cw}}" for s in short))
    for lbl, row in zip(labels, m["confusion_matrix"]):
        lines.append(f"{lbl:<{width}}  " + " ".join(f"{v:>{cw}}" for v in row))
    lines += _unknown_lines(m, items)
    return "\n".join(lines)


def _unknown_lines(m: dict, items: str) -> list[str]:
    """What the "unknown" threshold costs and buys on these items (eval's ``unknown`` and
    ``coverage``), so a user can choose one; and how many items were wrong."""
    u, rows = m.get("unknown"), m.get("coverage") or []
    lines = []
    if u:
        pct = lambda v: "   n/a" if v is None else f"{v * 100:5.1f}%"  # noqa: E731
        lines += ["", "unknown threshold  answered  accuracy on the answered  (below the threshold: 'unknown')"]
        shown = [dict(u, current=True)] + [r for r in rows if r["threshold"] != u["threshold"]]
        for r in sorted(shown, key=lambda r: r["threshold"]):
            now = "  (this bundle's)" if r.get("current") else ""
            lines.append(f"  {r['threshold']:>5.3f}            {pct(r['coverage'])}    {pct(r['accuracy'])}{now}")
        lines.append("  set one with: edgetl threshold BUNDLE VALUE")
    if m.get("misclassified") is not None:
        lines.append(f"misclassified  {len(m['misclassified'])} {items} (eval --json lists them, most confident first)")
    return lines


def gate_lines(report: dict, cosine_name: str, cosine) -> list[str]:
    """The FP32 comparison and the gate's decision (drop, interval, verdict), for every task's fit."""
    from .gate import GateDecision

    g = GateDecision.from_dict(report["gate"])
    if g.drop_pp is None or g.reference is None or g.value is None:
        return [f"gate      {g.describe()}"]
    cos = f", {cosine_name} {cosine:.4f}" if cosine is not None else ""
    return [
        f"fp32      {g.reference * 100:.2f}% {g.metric.replace('_', ' ')} (converted {g.value * 100:.2f}%){cos}",
        f"gate      {g.describe()}",
    ]


def auroc(y: np.ndarray, s: np.ndarray) -> float | None:
    """Area under the ROC curve, rank-based (Mann-Whitney U, ties counted half). None with one class.

    Example:
        >>> auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
        0.75
    """
    y = np.asarray(y).astype(bool).ravel()
    s = np.asarray(s, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    rank_sum = float(avg_rank[inverse][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def best_f1_threshold(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """The cut ``score >= t -> positive`` with the best F1 on labelled scores; t is placed halfway
    between the lowest score called positive and the highest score below it. Returns (t, F1)."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    ys, ss = y[order], s[order]
    tp = np.cumsum(ys)
    fp = np.cumsum(~ys)
    last = np.r_[ss[1:] != ss[:-1], True]  # only cut between distinct scores
    f1 = np.where(last, 2 * tp / (tp + fp + y.sum()), -1.0)
    k = int(np.argmax(f1))
    t = ss[k] if k + 1 >= len(ss) else 0.5 * (ss[k] + ss[k + 1])
    return float(t), float(f1[k])


def out_of_fold_f1(y: np.ndarray, s: np.ndarray, *, folds: int = 5, seed: int = 0) -> float | None:
    """F1 of the best-F1 cut as it does on images it was not chosen on: each stratified fold is
    called with the cut :func:`best_f1_threshold` picks on the other folds, and the calls are
    pooled. The best-F1 cut's F1 on the images that chose it is optimistic; this is the figure to
    expect on new images. None with fewer than two images of either kind."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    k = min(folds, int(y.sum()), int((~y).sum()))
    if k < 2:
        return None
    fold = stratified_folds(y, k, seed)
    called = np.zeros(len(y), bool)
    for f in range(k):
        held = fold == f
        t, _ = best_f1_threshold(y[~held], s[~held])
        called[held] = s[held] >= t
    tp, fp, fn = int(np.sum(called & y)), int(np.sum(called & ~y)), int(np.sum(~called & y))
    return round(2 * tp / (2 * tp + fp + fn), 4) if tp + fp + fn else None


def feature_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two feature matrices (the quantization quality measure)."""
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return num / den


def stratified_folds(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index per row: every class shuffled (seeded) and dealt round-robin, continuing where the
    previous class stopped so fold sizes differ by at most one row."""
    rng = np.random.default_rng(seed)
    out = np.empty(len(y), np.int64)
    offset = 0
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        out[idx] = (np.arange(len(idx)) + offset) % folds
        offset = (offset + len(idx)) % folds
    return out


def softmax(z: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis; keeps a floating input's dtype.

    Args:
        z: Logits of any shape, classes on the last axis.

    Returns:
        Probabilities of the same shape; each row sums to 1.
    """
    z = np.asarray(z)
    if not np.issubdtype(z.dtype, np.floating):
        z = z.astype(np.float64)
    e = np.exp(z - np.max(z, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)
