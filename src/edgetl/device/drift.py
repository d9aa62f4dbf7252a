"""``edgetl drift``: are recent inputs still like the training data? (device side, numpy only)

The bundle's drift reference (:mod:`edgetl.transfer.drift`, written by ``fit`` and by every
``adapt``) describes the training features; a folder of recent images (or a file of texts) is
compared with its held-out reference items by a permutation test, per class where the inputs are
labelled (``DATA/<class>/...`` with classes the bundle knows), and the verdict says whether
``adapt`` is advisable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.bundle import Bundle, load_bundle
from ..errors import BundleError, ConfigError, DataError
from .predict import load_predictor


def drift(
    bundle: str | Path | Bundle, data: str | Path, *, alpha: float = 0.05, seed: int = 0, quiet: bool = True
) -> dict:
    """Folder-level drift of ``data`` against the bundle's training distribution.

    Returns :class:`edgetl.transfer.drift.DriftSummary` as a dict (``verdict`` none / mild /
    drift / severe, ``adapt_advisable``, ``p_value``, ``ood_fraction``, ``per_class``, ``message``)
    plus the number of inputs and whether they were labelled.

    Raises:
        BundleError: a bundle without a drift reference (made by another task, or an older edgetl).
        DataError: fewer than 2 readable inputs.
    """
    from ..transfer.drift import drift_summary

    if not 0 < alpha < 1:
        raise ConfigError(f"--alpha {alpha!r}: a significance level between 0 and 1, such as 0.05")
    p = load_predictor(bundle if isinstance(bundle, Bundle) else load_bundle(bundle))
    if getattr(p, "drift", None) is None:
        raise BundleError(
            f"{p.bundle.path}: this bundle has no drift reference (classification bundles made by "
            "this edgetl have one; refit or export it)"
        )
    items, labelled = _inputs(p, data)
    skipped: list = []
    X = p.task.features(p.extractor, items, quiet=quiet, desc="drift", skipped=skipped)
    if len(X) < 2:
        raise DataError(
            f"{data}: need at least 2 readable {p.task.items} to compare with the training data "
            f"({len(skipped)} skipped)"
        )
    y = None
    if labelled:
        gone = {str(s) for s, _ in skipped}
        index = {l: i for i, l in enumerate(p.labels)}
        y = np.array([index.get(s.label, -1) for s in items if str(getattr(s, "path", s)) not in gone])
    summary = drift_summary(p.drift, X, y, alpha=alpha, seed=seed).to_dict()
    for c in summary.get("per_class", []):
        c["label"] = p.labels[c["class"]]
    return {
        **summary,
        "bundle": str(p.bundle.path),
        "data": str(data),
        "inputs": int(len(X)),
        "labelled": labelled,
        "head_version": p.version,
        "skipped": [{"path": str(s), "reason": r} for s, r in skipped],
    }


def _inputs(p, data) -> tuple[list, bool]:
    """Labelled items when ``data`` is laid out by class names the bundle knows, else plain inputs
    (image files and folders; a text file's lines)."""
    try:
        items, _ = p.task.scan(data, bundle=p.bundle)
        if items:
            return items, {s.label for s in items} <= set(p.labels)
    except DataError:
        pass
    if p.task.items == "images":
        return p.task.predict_items([data]), False
    return p.task.gather_inputs([], file=data), False
