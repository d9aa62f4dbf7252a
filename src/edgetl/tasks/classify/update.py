"""The on-device update of a classification head: replay, gate, new version.

How an update happens (and why it cannot lose the working model):

1. The caller holds the bundle's writer lock and has the bundle as it is now.
2. New items went through the bundle's own backbone (the exact model the device runs).
3. Each class's new items are split: most train, a stratified part is held out. The replay
   exemplars (features of earlier training items, per class) are split the same way.
4. The head is retrained with the same numpy trainer ``fit`` uses, on new + replayed features
   (``replace``: new only), with the current head's settings (kind, L2).
5. The gate compares heads on the held-out data: accuracy on previously known classes may not
   fall by more than the tolerance; the new data must be learnable (held-out accuracy well above
   chance: shuffled labels fail); and the labels must not contradict the current head
   consistently (swapped folders fail). A refused update changes nothing.
6. :func:`edgetl.core.versions.add_version` writes the new files beside the old ones and switches
   the manifest in one atomic rename.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ...core.gate import new_class_gate
from ...core.versions import add_version, next_version
from ...errors import GateError
from ...heads import registry
from ...heads.classification import Head
from ...heads.crossfit import fold_plan
from ...heads.exemplars import herding, load_exemplars, save_exemplars
from ...heads.training import train_head
from ...transfer.drift import save_drift_reference
from ..base import AdaptResult


def drift_reference(X: np.ndarray, y: np.ndarray, k: int, *, X_cal=None, y_cal=None, folds=None):
    """What the device compares new inputs with (:mod:`edgetl.transfer.drift`): the training
    features' class means and within-class subspace, calibrated on held-out items: the validation
    set when given, else every training item scored out of fold (``folds``, or the head's own
    plan :func:`edgetl.heads.crossfit.fold_plan`). None when there are too few items to describe
    (a note in the log says so)."""
    from ...transfer.drift import fit_drift_reference

    if X_cal is None and folds is None:
        folds = fold_plan(y, k).fold
    try:
        return fit_drift_reference(X, y, X_cal=X_cal, y_cal=y_cal, n_classes=k, oof_folds=folds)
    except ValueError as exc:
        import logging

        logging.getLogger("edgetl").info("no drift reference: %s", exc)
        return None


def holdout_mask(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Stratified held-out mask: ~fraction per class, none from a class with a single row."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        rows = np.flatnonzero(y == c)
        if len(rows) < 2:
            continue
        n = min(len(rows) - 1, max(1, int(round(len(rows) * fraction))))
        mask[rng.choice(rows, size=n, replace=False)] = True
    return mask


def _accuracy(head: Head, X: np.ndarray, y: np.ndarray) -> float | None:
    return float(np.mean(head.predict(X) == y)) if len(y) else None


def update_head(
    task,
    b,
    old_head: Head,
    X_new: np.ndarray,
    new_labels: list[str],
    *,
    data,
    skipped: list,
    replace: bool = False,
    force: bool = False,
    tolerance_pp: float = 5.0,
    holdout: float = 0.25,
    seed: int = 0,
    dry_run: bool = False,
    timings: dict | None = None,
    t0: float | None = None,
    signer=None,
    source: str = "adapt",
) -> AdaptResult:
    """Replay + gate + new head version from already extracted features (any modality).

    Raises:
        GateError: the update would hurt known classes, the new labels are not learnable, or
            they contradict the current head consistently (unless ``force``).
    """
    timings = {} if timings is None else timings
    t0 = time.perf_counter() if t0 is None else t0
    old_labels = list(old_head.labels)
    new_classes = sorted(set(new_labels) - set(old_labels))
    labels = sorted(set(new_labels)) if replace else old_labels + new_classes
    index = {l: i for i, l in enumerate(labels)}
    y_new = np.array([index[l] for l in new_labels], dtype=np.int64)
    t1 = time.perf_counter()
    X_ex, y_ex = _replay_memory(b, labels, index)
    if replace:
        X_ex, y_ex = X_ex[:0], y_ex[:0]
    hold_new, hold_ex = holdout_mask(y_new, holdout, seed), holdout_mask(y_ex, holdout, seed + 1)
    # the kind's own on-device retrain (its settings, the L2 it chose fixed: no search on the device)
    kind = registry.get(old_head.kind, "classify")
    cfg = kind.device_config(old_head)
    head = kind.update(
        old_head,
        np.concatenate([X_new[~hold_new], X_ex[~hold_ex]]),
        np.concatenate([y_new[~hold_new], y_ex[~hold_ex]]),
        labels=labels,
    )
    timings["train"] = round(time.perf_counter() - t1, 3)
    gate = _gate(
        head,
        old_head,
        cfg,
        labels,
        X_new,
        y_new,
        hold_new,
        X_ex,
        y_ex,
        hold_ex,
        new_labels,
        tolerance_pp=tolerance_pp,
        force=force,
    )
    evidence = new_class_gate(
        [old_labels[i] for i in old_head.predict(X_new)] if len(X_new) else [], new_labels, old_labels
    )
    gate = {
        **gate,
        "new_classes": evidence["classes"],
        "warnings": evidence["warnings"],
        "reasons": evidence["reasons"] + gate["reasons"],
    }
    gate["passed"], gate["forced"] = not gate["reasons"], bool(gate["reasons"] and force)
    if gate["reasons"] and not force and not dry_run:
        raise GateError(
            f"update refused, v{b.head_version} stays current: "
            + "; ".join(gate["reasons"] + gate["warnings"])
            + " (--force to accept)"
        )
    summary = {"labels": labels, "new_classes": new_classes, "gate": gate}
    if dry_run:
        return AdaptResult(b, b.head_version, summary, timings, skipped, accepted=False)

    # the head that ships trains on everything, held-out rows included
    t2 = time.perf_counter()
    X_all, y_all = np.concatenate([X_new, X_ex]), np.concatenate([y_new, y_ex])
    head = kind.update(old_head, X_all, y_all, labels=labels)
    ex_idx = herding(X_all, y_all, len(labels), per_class=int(b.manifest.get("exemplars", {}).get("per_class", 20)))
    version = next_version(b)
    ex_rel, drift_rel = f"exemplars/v{version}.npz", f"drift/v{version}.npz"
    files: dict[str, Callable[[Path], object]] = {
        ex_rel: lambda p: save_exemplars(p, X_all[ex_idx], y_all[ex_idx], labels)
    }
    # the drift reference follows the classes: a new class must not read as drift
    drift = drift_reference(X_all, y_all, len(labels)) if b.head_entry().get("drift") else None
    if drift is not None:
        files[drift_rel] = lambda p: save_drift_reference(drift, p)
    threshold = b.head_entry().get("unknown_threshold", 0.0)
    entry = {
        "exemplars": ex_rel,
        **({"drift": drift_rel} if drift else {}),
        "kind": head.kind,
        "labels": labels,
        "source": f"{source}-replace" if replace else source,
        "data": str(Path(data).resolve()) if isinstance(data, (str, Path)) else str(data),
        task.items: int(len(new_labels)),
        "new_classes": new_classes,
        "gate": gate,
        "l2": head.meta.get("l2"),
        "unknown_threshold": threshold,
    }
    new = add_version(
        b,
        head,
        entry,
        meta={**task.fused_meta(b, head), "labels": labels},
        files=files,
        changes={"labels": labels, "thresholds": {**b.manifest.get("thresholds", {}), "unknown": threshold}},
        signer=signer,
        operation="fleet" if source == "fleet" else "adapt",
    )
    timings["write"] = round(time.perf_counter() - t2, 3)
    timings["total"] = round(time.perf_counter() - t0, 3)
    return AdaptResult(new, new.head_version, summary, timings, skipped)


def _replay_memory(b, labels: list[str], index: dict) -> tuple[np.ndarray, np.ndarray]:
    """The current version's exemplars of classes in ``labels``, as (features, new class indices)."""
    ex_file = b.head_entry().get("exemplars", b.manifest.get("exemplars", {}).get("file", "exemplars.npz"))
    X_ex, y_ex_old, ex_names = load_exemplars(b.open_verified(ex_file))
    keep = np.isin(np.array(ex_names)[y_ex_old], labels) if len(y_ex_old) else np.zeros(0, bool)
    return X_ex[keep], np.array([index[ex_names[i]] for i in y_ex_old[keep]], dtype=np.int64)


def _gate(
    head,
    old_head,
    cfg,
    labels,
    X_new,
    y_new,
    hold_new,
    X_ex,
    y_ex,
    hold_ex,
    new_labels,
    *,
    tolerance_pp: float,
    force: bool,
) -> dict:
    """Compare the heads on held-out data neither trained on; ``reasons`` lists what refuses it.

    The old head trained on the exemplars, so its accuracy on them is optimistic; the fair
    baseline is a *control* head trained the same way on the same replay split without the new
    data. Where there is no replay memory (``--replace``), the old head on held-out new items of
    known classes is the baseline (it never saw those).
    """
    old_labels = list(old_head.labels)
    X_ev, y_ev = np.concatenate([X_new[hold_new], X_ex[hold_ex]]), np.concatenate([y_new[hold_new], y_ex[hold_ex]])
    known = np.isin(np.array(labels)[y_ev], old_labels) if len(y_ev) else np.zeros(0, bool)
    if (~hold_ex).any() and hold_ex.any():
        control = train_head(X_ex[~hold_ex], y_ex[~hold_ex], labels, cfg=cfg)
        baseline, baseline_kind = _accuracy(control, X_ev[known], y_ev[known]), "replay-only control head"
    else:
        old_index = {l: i for i, l in enumerate(old_labels)}
        sel = known[: int(hold_new.sum())]
        y_old = np.array([old_index[labels[i]] for i in y_new[hold_new][sel]], dtype=np.int64)
        baseline, baseline_kind = _accuracy(old_head, X_new[hold_new][sel], y_old), "current head"
        known = np.zeros(len(y_ev), bool)
        known[: int(hold_new.sum())] = sel
    new_known = _accuracy(head, X_ev[known], y_ev[known])
    new_holdout = _accuracy(head, X_new[hold_new], y_new[hold_new])
    k_new = len(np.unique(y_new))
    floor = min(0.5, 2.0 / k_new) if k_new > 1 else 0.0
    swaps = label_disagreements(old_head, X_new, new_labels)
    reasons = [
        f"{w['looks_like_count']} of {w['images']} new images labelled {w['label']!r} look like "
        f"{w['looks_like']!r} to the current head (it agrees with the label on {w['agreement']:.0%}); "
        "are the labels swapped? If the parts really changed, pass --force"
        for w in swaps
    ]
    if baseline is not None and new_known is not None and (baseline - new_known) * 100 > tolerance_pp:
        reasons.append(
            f"accuracy on known classes would fall from {baseline:.1%} to {new_known:.1%} (tolerance {tolerance_pp} pp)"
        )
    if new_holdout is not None and k_new > 1 and new_holdout < floor:
        reasons.append(
            f"held-out accuracy on the new images is {new_holdout:.1%}, near chance "
            f"(floor {floor:.0%}); are the labels right?"
        )
    return {
        "old_known_accuracy": baseline,
        "baseline": baseline_kind,
        "new_known_accuracy": new_known,
        "new_holdout_accuracy": new_holdout,
        "holdout_images": int(hold_new.sum()),
        "holdout_exemplars": int(hold_ex.sum()),
        "tolerance_pp": tolerance_pp,
        "passed": not reasons,
        "forced": bool(reasons and force),
        "label_check": swaps,
        "reasons": reasons,
    }


def label_disagreements(head: Head, X: np.ndarray, labels: list[str], *, min_images: int = 5) -> list[dict]:
    """Known classes whose new images the current head consistently calls another known class.

    Drift lowers agreement too, but spreads the mistakes; a label error (two classes' folders
    swapped, a mislabelled batch) sends most of one label's images to one other class. A label is
    flagged when, by one-sided 95 % Wilson bounds, most of its images look like one other class and
    fewer than half look like itself. Needs ``min_images`` of a label to say anything.
    """
    from ...core.gate import wilson_interval

    known = {l: i for i, l in enumerate(head.labels)}
    lab = np.array(labels)
    pred = head.predict(X) if len(X) else np.zeros(0, np.int64)
    out = []
    for name, idx in known.items():
        rows = np.flatnonzero(lab == name)
        if len(rows) < min_images:
            continue
        p = pred[rows]
        agree = int(np.sum(p == idx))
        others = np.bincount(p[p != idx], minlength=len(known)) if agree < len(rows) else np.zeros(len(known), int)
        other = int(np.argmax(others))
        share = int(others[other])
        if wilson_interval(share, len(rows))[0] > 0.5 and wilson_interval(agree, len(rows))[1] < 0.5:
            out.append(
                {
                    "label": name,
                    "images": int(len(rows)),
                    "agreement": round(agree / len(rows), 4),
                    "looks_like": head.labels[other],
                    "looks_like_count": share,
                }
            )
    return out
