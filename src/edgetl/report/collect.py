"""What a report shows, gathered as plain data (numpy and JSON types, no plotting): the bundle's
own record (manifest and ``report.json``), an evaluation on labelled data through the device-side
predictor, the head versions, and optionally this machine's timing of the bundle.

Device side: numpy, Pillow and the bundle's runtime; no torch, no matplotlib.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import tasks
from ..core.bundle import Bundle, load_bundle
from ..core.preprocess import Roi
from ..device.predict import deployment
from ..errors import BundleError, DataError, EdgetlError

# What the page's <meta name="generator"> says, and how an earlier report is recognised.
GENERATOR = "edgetl report"

log = logging.getLogger("edgetl")

# Gallery sizes: enough to see a pattern, few enough that a 1,000-item evaluation stays small.
GALLERY = 12
# Misclassified texts listed in full (the rest are counted).
TEXT_ROWS = 40


@dataclass
class ReportData:
    """Everything one report shows. ``evaluation`` is None without labelled data; ``speed`` is
    None unless the bundle was timed here; ``versions`` holds per-version figures on the data when
    every head version was evaluated."""

    bundle: Bundle
    task: Any
    recorded: dict
    data: str | None = None
    evaluation: dict | None = None
    versions: list[dict] = field(default_factory=list)
    speed: dict | None = None
    timings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.task.name


def recorded_report(b: Bundle) -> dict:
    """``report.json`` as fit wrote it ({} for a bundle without one; it is hashed like every file)."""
    path = b.file("report.json")
    if "report.json" not in b.manifest.get("files", {}) or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise BundleError(f"{b.path}: report.json is not JSON ({exc})") from None


def summary(r: ReportData) -> dict:
    """The figures the top of the page shows, from the manifest and ``report.json``."""
    b, rec, m = r.bundle, r.recorded, r.bundle.manifest
    files = m.get("files", {})
    size = dict(rec.get("size", {}))
    size["bundle_bytes"] = sum(int(v.get("bytes", 0)) for v in files.values())
    backbone = m.get("backbone", {})
    pre = backbone.get("preprocess", {})
    return {
        "bundle": b.path.name,
        "path": str(b.path),
        "task": b.task,
        "edgetl_version": m.get("edgetl_version"),
        "labels": b.labels,
        "head_version": b.head_version,
        "versions": len(m["head"]["versions"]),
        "backbone": backbone.get("name"),
        "num_features": backbone.get("num_features"),
        "input": pre.get("input_size") or pre.get("max_length"),
        "roi": str(Roi.from_dict(pre["roi"])) if pre.get("roi") else None,
        "target": m.get("target", {}).get("name"),
        "target_device": m.get("target", {}).get("device"),
        "latency_budget_ms": m.get("target", {}).get("latency_budget_ms"),
        "precision": b.precision,
        "runtime": b.runtime,
        "float_precision": (rec.get("numerics", {}).get("features") or {}).get("float_precision"),
        "size": size,
        "latency_batch1": rec.get("latency_batch1"),
        "fused_latency_batch1": rec.get("fused_latency_batch1"),
        "throughput": rec.get("throughput"),
        "gate": rec.get("gate"),
        "reference": rec.get("reference") or {},
        "parity": rec.get("fused_parity"),
        "transfer_check": rec.get("transfer_check"),
        "leakage": rec.get("leakage"),
        "conversion": rec.get("conversion") or {},
        "threshold": (m.get("thresholds") or {}).get(r.task.threshold_key),
        "threshold_policy": b.head_entry().get("threshold_policy"),
        "training": m.get("training", {}).get("counts"),
        "created": m["head"]["versions"][0].get("created"),
        "models": m.get("models", {}),
        # the one list of what an app that runs the model itself ships (OpenVINO: .xml and .bin)
        "app_files": deployment(b)["app_files"],
    }


def history(r: ReportData) -> list[dict]:
    """One row per head version, oldest first: where it came from, what it added, its recorded
    figure, its gate and threshold, and whether it is current or was rolled back.

    The manifest keeps no log of rollbacks: a version newer than the current one was rolled back."""
    b, task = r.bundle, r.task
    current = b.head_version
    counts = b.manifest.get("training", {}).get("counts") or {}
    on_data = {v["version"]: v for v in r.versions}
    rows = []
    for e in b.manifest["head"]["versions"]:
        source = e.get("source", "fit")
        gate = e.get("gate") or {}
        if source == "fit":
            added = _fit_items(counts)
            figure, figure_name = (
                (e.get("val_accuracy"), "validation accuracy")
                if e.get("val_accuracy") is not None
                else (e.get("image_auroc"), "image AUROC")
            )
        else:
            added = e.get("new_images", e.get(task.items))
            figure, figure_name = gate.get("new_known_accuracy"), "known classes, held out"
        status = "current" if e["version"] == current else ("rolled back" if e["version"] > current else "earlier")
        rows.append(
            {
                "version": e["version"],
                "created": e.get("created", ""),
                "source": source,
                "status": status,
                "kind": e.get("kind"),
                "classes": len(e.get("labels", [])),
                "new_classes": e.get("new_classes") or [],
                "added": added,
                "figure": figure,
                "figure_name": figure_name,
                "holdout": gate.get("new_holdout_accuracy"),
                "gate": (
                    None
                    if not gate
                    else ("forced" if gate.get("forced") else "passed" if gate.get("passed") else "refused")
                ),
                "threshold": e.get(task.threshold_field),
                "memory_images": e.get("images") if task.one_class else None,
                "on_data": on_data.get(e["version"]),
            }
        )
    return rows


def _fit_items(counts: dict) -> int | None:
    """Training items a fit learned from (the manifest's counts, whatever the task's shape)."""
    if not counts:
        return None
    total = 0
    for k, v in counts.items():
        if isinstance(v, dict):
            total += int(v.get("train", 0))
        elif isinstance(v, (int, float)) and k.startswith("train"):
            total += int(v)
    return total or None


# ----------------------------------------------------------------------------- evaluation
def evaluate(r: ReportData, data, predictor, *, quiet: bool = True, strict: bool = False) -> None:
    """Fill ``r.evaluation`` from ``data`` (a path, or labelled items a fit already found)."""
    t0 = time.perf_counter()
    if r.task.one_class:
        r.evaluation = _evaluate_defects(predictor, data, strict=strict)
    else:
        m = predictor.evaluate(data, quiet=quiet, strict=strict, details=True)
        r.evaluation = _classifier_figures(m, r.task)
    r.timings["evaluate"] = round(time.perf_counter() - t0, 3)


def _classifier_figures(m: dict, task) -> dict:
    """Eval's figures plus what the pictures need: calibration bins, the coverage curve, and the
    galleries (most confident mistakes, least confident correct answers)."""
    items = m.pop("items")
    conf = np.array([it["confidence"] for it in items], np.float64)
    right = np.array([it["correct"] for it in items], bool)
    m["calibration"] = calibration(conf, right)
    m["coverage_curve"] = coverage_curve(conf, right)
    order = np.argsort(conf, kind="stable")
    m["least_confident_correct"] = [items[i] for i in order if right[i]][:GALLERY]
    m["confident_mistakes"] = m["misclassified"][: GALLERY if task.item_key == "path" else TEXT_ROWS]
    m["confidence_mean"] = round(float(conf.mean()), 4)
    return m


def calibration(conf: np.ndarray, right: np.ndarray, *, bins: int = 10) -> dict:
    """Reliability bins (equal width in confidence): count, mean confidence and accuracy per bin,
    and the expected calibration error (the count-weighted gap)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=False), 0, bins - 1)
    rows = []
    ece = 0.0
    for k in range(bins):
        sel = which == k
        n = int(sel.sum())
        c = float(conf[sel].mean()) if n else None
        a = float(right[sel].mean()) if n else None
        if n:
            ece += n / len(conf) * abs(a - c)
        rows.append(
            {
                "lo": round(float(edges[k]), 3),
                "hi": round(float(edges[k + 1]), 3),
                "n": n,
                "confidence": None if c is None else round(c, 4),
                "accuracy": None if a is None else round(a, 4),
            }
        )
    return {"bins": rows, "ece": round(ece, 4)}


def coverage_curve(conf: np.ndarray, right: np.ndarray, *, points: int = 101) -> list[dict]:
    """Accuracy on the answered items and coverage as the "unknown" threshold rises from 0 to the
    highest confidence seen (an item is answered when its confidence reaches the threshold)."""
    top = float(conf.max()) if len(conf) else 1.0
    out = []
    for t in np.linspace(0.0, top, points):
        keep = conf >= t
        k = int(keep.sum())
        out.append(
            {
                "threshold": round(float(t), 4),
                "coverage": round(k / len(conf), 4),
                "accuracy": round(float(right[keep].mean()), 4) if k else None,
            }
        )
    return out


def _evaluate_defects(predictor, data, *, strict: bool) -> dict:
    """What ``edgetl eval`` reports on ``data`` (the same functions, so the same numbers), plus the
    score of every image for the histograms and ROC curves and the heat maps of the galleries,
    from one pass of the model over the images."""
    from ..tasks.anomaly.data import labelled_images

    if isinstance(data, (list, tuple)):  # items a fit found: held-out good images, no masks
        samples, mask_files, skipped = (
            [_Sample(Path(getattr(s, "path", s)), getattr(s, "label", "good")) for s in data],
            {},
            [],
        )
        where = f"the {len(samples)} given images"
    else:
        samples, mask_files, skipped = labelled_images(data, strict=strict)
        where = str(data)
        if samples and not any(s.label == "good" for s in samples):
            # A classification folder looks like a defect set with no good images: say which it is.
            kinds = sorted({s.label for s in samples})
            raise DataError(
                f"{data}: no good/ folder (found {', '.join(kinds[:5])}); a defect report needs "
                "test/good and test/<defect> folders (what `edgetl eval` takes for this bundle)"
            )
    if not samples:
        raise DataError(f"{where}: no labelled images; expected good/ and <defect>/ folders")
    pre = predictor.preprocess
    thr = float(predictor.threshold)
    m, maps, scores, y, masks = predictor.score_samples(samples, mask_files, skipped)
    norm = scores / thr
    m["scores"] = [
        {"path": str(s.path), "label": s.label, "normalised": round(float(v), 6)} for s, v in zip(samples, norm)
    ]
    m["roc"] = roc_curve(y, norm) if y.any() and (~y).any() else None
    if maps is not None and any(mk is not None for mk in masks):
        gt = np.stack([mk if mk is not None else np.zeros(maps.shape[1:], bool) for mk in masks])
        # Drawn from a sample of pixels: the curve's shape needs thousands, not millions (the
        # AUROC above is on every pixel).
        rng = np.random.default_rng(0)
        flat_gt, flat = gt.ravel(), (maps / thr).ravel()
        pick = rng.choice(len(flat), size=min(len(flat), 200_000), replace=False)
        m["pixel_roc"] = roc_curve(flat_gt[pick], flat[pick], points=200)
    good = [i for i in np.argsort(-norm, kind="stable") if not y[i]][: GALLERY // 2]
    hidden = [i for i in np.argsort(norm, kind="stable") if y[i]][: GALLERY // 2]
    # An image-level head (knn, gaussian) scores the whole image and has no map: the galleries
    # then show the images themselves.
    ref, m["map_scale"] = map_scale(maps, scores, thr, y) if maps is not None else (1.0, "none")
    tile = lambda i: _tile(samples[i], None if maps is None else maps[i] / ref, norm[i], masks[i], pre)
    m["gallery"] = {"worst_good": [tile(i) for i in good], "hidden_defects": [tile(i) for i in hidden]}
    return m


def map_scale(maps: np.ndarray, scores: np.ndarray, thr: float, y: np.ndarray) -> tuple[float, str]:
    """What a heat map is divided by before it is coloured, and how the page says it.

    Where the image score is the map's peak (PatchCore, PaDiM), the threshold: 1.0 on the map is
    the threshold, as ``predict --heatmaps`` draws it. A head whose score adds an image-level term
    has map peaks well below its scores, and divided by the threshold its maps fade to nothing
    even on a caught defect; there the good images' median peak is 1.0, so the page still shows
    where each image differs from the good ones (the galleries' captions carry the real score)."""
    peaks = maps.reshape(len(maps), -1).max(axis=1)
    if np.allclose(peaks, scores, rtol=1e-3, atol=1e-3 * max(1.0, abs(thr))):
        return thr, "threshold"
    ref = float(np.median(peaks[~y] if (~y).any() else peaks))
    return (ref if ref > 0 else float(np.abs(peaks).max() or 1.0)), "good peaks"


@dataclass
class _Sample:
    path: Path
    label: str


def _tile(sample, norm_map: np.ndarray, score: float, mask, pre) -> dict:
    return {
        "path": str(sample.path),
        "label": sample.label,
        "normalised": round(float(score), 4),
        "map": None if norm_map is None else norm_map.astype(np.float32),
        "mask": mask,
        "image": seen_image(sample.path, pre, None if norm_map is None else norm_map.shape),
    }


def seen_image(path, pre, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The image as the model saw it (resize and centre crop), RGB uint8; a tiled bundle's map
    covers the whole frame (``shape`` (H, W), its working size): then the whole frame at that size."""
    from ..core.preprocess import load_rgb, resize_crop

    if shape is not None and tuple(shape) != (pre.input_size, pre.input_size):
        return np.asarray(load_rgb(path, cfg=pre, need=min(shape)).resize((shape[1], shape[0])).convert("RGB"))
    return np.asarray(resize_crop(load_rgb(path, cfg=pre), pre).convert("RGB"))


def roc_curve(y: np.ndarray, s: np.ndarray, *, points: int | None = None) -> dict:
    """False and true positive rates over every distinct cut (``score >= t``), thinned to
    ``points`` for drawing; the rate at the threshold (1.0 in normalised units) too."""
    y = np.asarray(y, bool)
    s = np.asarray(s, np.float64)
    order = np.argsort(-s, kind="stable")
    ys, ss = y[order], s[order]
    tp, fp = np.cumsum(ys), np.cumsum(~ys)
    last = np.r_[ss[1:] != ss[:-1], True]
    tpr = np.r_[0.0, tp[last] / max(1, y.sum())]
    fpr = np.r_[0.0, fp[last] / max(1, (~y).sum())]
    if points and len(fpr) > points:
        keep = np.unique(np.linspace(0, len(fpr) - 1, points).astype(int))
        tpr, fpr = tpr[keep], fpr[keep]
    at = s >= 1.0
    return {
        "fpr": [round(float(v), 5) for v in fpr],
        "tpr": [round(float(v), 5) for v in tpr],
        "at_threshold": {
            "fpr": round(float(np.mean(at[~y])) if (~y).any() else 0.0, 4),
            "tpr": round(float(np.mean(at[y])) if y.any() else 0.0, 4),
        },
    }


# ------------------------------------------------------------------------------- versions
def evaluate_versions(r: ReportData, data, *, device=None, quiet: bool = True, strict: bool = False) -> None:
    """Every head version's figure on ``data`` (one pass over the data per version): accuracy,
    or image AUROC for defects. A version that cannot answer for the data (it lacks a class)
    gets the reason instead."""
    from ..device.predict import load_predictor

    t0 = time.perf_counter()
    metric = r.task.gate_metric
    for e in r.bundle.manifest["head"]["versions"]:
        v = e["version"]
        try:
            p = load_predictor(r.bundle, device=device, head_version=v)
            m = p.evaluate(data, quiet=quiet, strict=strict)
            r.versions.append({"version": v, "metric": metric, "value": m.get(metric)})
        except EdgetlError as exc:
            r.versions.append({"version": v, "metric": metric, "value": None, "why": str(exc).split(": ", 1)[-1]})
    r.timings["versions"] = round(time.perf_counter() - t0, 3)


# ---------------------------------------------------------------------------------- speed
def measure_speed(
    r: ReportData, *, runs: int = 50, device: str | None = None, batches: Sequence[int] = (1, 2, 4, 8, 16, 32)
) -> None:
    """Time the bundle's single-file model here: every batch-1 run for the distribution, the
    throughput at each batch size, and ``edgetl bench``'s account of where it ran (device, a CPU
    fallback, the budget, peak memory). Every figure comes from the one timed session, so the
    p50 in the text and the histogram under it cannot disagree."""
    from ..device.bench import bench_bundle

    t0 = time.perf_counter()
    r.speed = bench_bundle(r.bundle.path, runs=runs, device=device, batches=tuple(batches), samples=True)
    r.timings["bench"] = round(time.perf_counter() - t0, 3)


def gather(
    bundle,
    data=None,
    *,
    bench: bool = False,
    all_versions: bool = False,
    runs: int = 50,
    device: str | None = None,
    quiet: bool = True,
    strict: bool = False,
) -> ReportData:
    """Load ``bundle`` and collect what its report shows (see :func:`edgetl.report.write_report`)."""
    from ..device.predict import load_predictor

    t0 = time.perf_counter()
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    r = ReportData(b, tasks.for_bundle(b), recorded_report(b))
    if data is not None:
        r.data = str(data) if not isinstance(data, (list, tuple)) else f"{len(data)} validation {r.task.items}"
        evaluate(r, data, load_predictor(b, device=device), quiet=quiet, strict=strict)
        if all_versions and len(b.manifest["head"]["versions"]) > 1:
            evaluate_versions(r, data, device=device, quiet=quiet, strict=strict)
    if bench:
        measure_speed(r, runs=runs, device=device)
    r.timings["gather"] = round(time.perf_counter() - t0, 3)
    return r
