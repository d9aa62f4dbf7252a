"""How well a defect detector does: image AUROC, F1 at its threshold, and, where masks exist,
pixel AUROC and whether the map's peak lands on the defect.

Pixel AUROC counts pixels, and almost all pixels are good: it reads 0.97 while half the small
defects go unseen. So beside it: per defect kind, the share of defective images flagged at the
threshold, and per defect *region* (a connected part of a mask) whether the map reaches the
threshold anywhere on it (``region_recall``) and what share of its pixels it covers there
(``region_overlap``, the per-region overlap of the PRO curve at this one operating point).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ...core.metrics import auroc


def detection_metrics(
    y: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    *,
    maps: np.ndarray | None = None,
    masks: list[np.ndarray | None] | None = None,
    kinds: Sequence[str] | None = None,
    map_threshold: float | None = None,
) -> dict:
    """Image AUROC, pixel AUROC (when masks are given for the defect images), counts at the
    threshold, and per kind (``kinds``: each image's label) and per region the detection rates.
    ``map_threshold``: the map value that is "at the threshold" (default: ``threshold``)."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(scores) >= threshold
    tp, fp = int(np.sum(pred & y)), int(np.sum(pred & ~y))
    fn, tn = int(np.sum(~pred & y)), int(np.sum(~pred & ~y))
    out: dict[str, Any] = {
        "n": int(len(y)),
        "n_defect": int(y.sum()),
        "n_good": int((~y).sum()),
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
        cut = float(threshold if map_threshold is None else map_threshold)
        regs = [region_hits(m, mk, cut) for m, mk in zip(maps, masks) if mk is not None and mk.any()]
        out["regions"] = regions_summary([r for rs in regs for r in rs])
        if kinds is not None:
            per: dict[str, list] = {}
            for m, mk, k in zip(maps, masks, kinds):
                if mk is not None and mk.any():
                    per.setdefault(k, []).extend(region_hits(m, mk, cut))
            out["regions_per_kind"] = {k: regions_summary(v) for k, v in sorted(per.items())}
    if kinds is not None:
        kinds = list(kinds)
        out["recall_per_kind"] = {
            k: round(float(np.mean(pred[[i for i, kk in enumerate(kinds) if kk == k]])), 4)
            for k in sorted(set(kinds[i] for i in np.flatnonzero(y)))
        }
    return out


def regions_summary(hits: list[tuple[bool, float]]) -> dict:
    """{n, recall, overlap} of (hit, overlap) per region."""
    if not hits:
        return {"n": 0, "recall": None, "overlap": None}
    return {
        "n": len(hits),
        "recall": _round(float(np.mean([h for h, _ in hits]))),
        "overlap": _round(float(np.mean([o for _, o in hits]))),
    }


def region_hits(m: np.ndarray, mask: np.ndarray, cut: float) -> list[tuple[bool, float]]:
    """Per connected region of ``mask`` (8-connected): (does the map reach ``cut`` on it, share of
    its pixels where it does)."""
    above = np.asarray(m) >= cut
    return [(bool(above[r].any()), float(above[r].mean())) for r in regions(mask)]


def regions(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The 8-connected regions of a boolean mask, each as (rows, cols) index arrays (numpy only:
    a flood fill over the mask's pixels, which are few)."""
    mask = np.asarray(mask, bool)
    H, W = mask.shape
    label = np.zeros((H, W), np.int32)
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for start in zip(*np.nonzero(mask)):
        if label[start]:
            continue
        n = len(out) + 1
        label[start] = n
        stack, ys, xs = [start], [], []
        while stack:
            i, j = stack.pop()
            ys.append(i)
            xs.append(j)
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    a, b = i + di, j + dj
                    if 0 <= a < H and 0 <= b < W and mask[a, b] and not label[a, b]:
                        label[a, b] = n
                        stack.append((a, b))
        out.append((np.array(ys), np.array(xs)))
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
