"""How well a defect detector does: image AUROC, F1 at its threshold, and, where masks exist,
pixel AUROC and whether the map's peak lands on the defect."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ...core.metrics import auroc

def detection_metrics(y: np.ndarray, scores: np.ndarray, threshold: float, *, maps: np.ndarray | None = None,
                      masks: list[np.ndarray | None] | None = None) -> dict:
    """Image AUROC, pixel AUROC (when masks are given for the defect images), and counts at the threshold."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(scores) >= threshold
    tp, fp = int(np.sum(pred & y)), int(np.sum(pred & ~y))
    fn, tn = int(np.sum(~pred & y)), int(np.sum(~pred & ~y))
    out = {
        "n": int(len(y)), "n_defect": int(y.sum()), "n_good": int((~y).sum()),
        "image_auroc": _round(auroc(y, scores)),
        "threshold": float(threshold),
        "accuracy": round((tp + tn) / max(len(y), 1), 4),
        "precision": round(tp / (tp + fp), 4) if tp + fp else None,
        "recall": round(tp / (tp + fn), 4) if tp + fn else None,
        "f1": round(2 * tp / (2 * tp + fp + fn), 4) if tp + fp + fn else None,
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "pixel_auroc": None,
    }
    if maps is not None and masks is not None and any(m is not None for m in masks):
        gt = np.stack([m if m is not None else np.zeros(maps.shape[1:], bool) for m in masks])
        out["pixel_auroc"] = _round(auroc(gt.ravel(), maps.ravel()))
        out["peak_in_mask"] = _round(peak_in_mask(maps, masks, radius=8))
    return out


def _round(v: float | None, nd: int = 4) -> float | None:
    return None if v is None else round(float(v), nd)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation with a (2r+1)^2 square, numpy only."""
    if radius <= 0:
        return mask.astype(bool)
    H, W = mask.shape
    p = np.pad(mask.astype(bool), radius)
    out = np.zeros((H, W), bool)
    for i in range(2 * radius + 1):
        for j in range(2 * radius + 1):
            out |= p[i : i + H, j : j + W]
    return out


def peak_in_mask(maps: np.ndarray, masks: Sequence[np.ndarray | None], *, radius: int = 8) -> float | None:
    """Fraction of images with a mask whose map maximum lies inside the mask dilated by ``radius`` px."""
    hits = []
    for m, mask in zip(maps, masks):
        if mask is None or not mask.any():
            continue
        i, j = np.unravel_index(int(np.argmax(m)), m.shape)
        hits.append(bool(dilate(mask, radius)[i, j]))
    return float(np.mean(hits)) if hits else None


