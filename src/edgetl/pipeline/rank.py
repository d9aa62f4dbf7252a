"""``edgetl rank`` and ``fit --backbone auto``: score candidate backbones on the user's own labelled
images before fitting any of them.

Each candidate is exported once (cached) and its FP32 features of the *training* split are
extracted through the same extractor and cache key the FP32 reference of ``fit`` uses, so the fit
that follows runs no backbone for them again. The scores and the noise-aware choice are
:mod:`edgetl.transfer.rank`'s. Latency is each backbone's batch-1 latency on this machine at the
precision the target ships: with a target (``fit --backbone auto`` always has one) each candidate
is converted as ``fit`` converts it (same calibration items, same model cache, so the fit reuses
the chosen one) and that model is timed, because a budget judged on FP32 refuses backbones whose
INT8 model runs in half the time; without a target, FP32 ONNX Runtime. Size is the FP32 model's
(INT8 weights are about a quarter).

With a region of interest (``--roi``, parsed by the one :meth:`edgetl.core.preprocess.Roi.load`
that ``fit`` uses) every candidate sees the frames cut to it, as the bundle will: a backbone is
ranked on what it will be shown, and ``fit --roi ... --backbone auto`` reuses these features.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import tasks
from ..core.console import status
from ..core.features import FeatureCache, default_cache_dir
from ..core.preprocess import Roi
from ..core.targets import Target, load_target
from ..errors import ConfigError, DataError
from .options import FitOptions


def candidates(names: Sequence[str] | None = None) -> list[str]:
    """The backbones ranked when none are named: every registry image backbone whose weights install offline."""
    from ..export import REGISTRY

    if names:
        return list(dict.fromkeys(names))
    return [s.name for s in REGISTRY.values() if s.kind == "image" and s.package]


def backbone_features(
    items: Sequence,
    backbone: str,
    *,
    cache_dir: str | Path | None = None,
    weights=None,
    roi: Roi | None = None,
    quiet: bool = True,
) -> tuple[np.ndarray, object]:
    """FP32 ONNX Runtime features of image items (samples or paths) through ``backbone`` (each cut
    to ``roi`` first, as ``fit --roi`` cuts them), from the cache that ``fit``'s FP32 reference
    shares. -> (features, the exported backbone, with the region in its preprocessing)."""
    from ..export import export_backbone

    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    exported = export_backbone(backbone, weights=weights, cache_dir=cache_root)
    if roi is not None:  # as fit does: the region is part of the preprocessing (and the cache key)
        exported = exported.with_preprocess({**exported.preprocess, "roi": roi.to_dict()})
    task = tasks.get("classify")
    ext = task.extractor(exported.path, exported, runtime="onnxruntime", device="CPU", providers=None)
    return ext.features(
        list(items), cache=FeatureCache(cache_root, ext.cache_key), quiet=quiet, desc=f"{backbone} features"
    ), exported


def rank(
    data: str | Path,
    *,
    backbones: Sequence[str] | None = None,
    target: str | Target | None = None,
    budget_ms: float | None = None,
    by: str = "cv",
    seed: int = 0,
    val_split: float = 0.2,
    group_by: str | None = None,
    cache_dir: str | Path | None = None,
    roi: str | Roi | None = None,
    quiet: bool = True,
) -> dict:
    """Rank backbones on the training split of the labelled image data at ``data``.

    Args:
        backbones: names to compare (default: :func:`candidates`).
        target: a profile (or its name): latency is measured on the model it ships, and its
            ``latency_budget_ms`` is the budget unless ``budget_ms`` is given.
        by: ``cv`` (cross-validated head accuracy, the default) or ``logme``.
        roi: the region of interest every frame is cut to (``fit --roi``'s value: ``"x,y,w,h"``
            in pixels or fractions, or a camera file), so candidates see what the bundle will.

    Returns:
        ``{"table", "choice", "leader", "reason", ...}`` (:class:`edgetl.transfer.rank.RankResult`)
        plus ``size_mb`` and ``budget_ms`` per row and the data it ranked on.

    Raises:
        DataError: unusable data (fewer than 2 classes, too few images to cross-validate).
        ConfigError: an unknown backbone, target or score, or a malformed region.
    """
    from ..core.sessions import open_session, time_calls
    from ..transfer.rank import SCORES, rank_backbones

    if by not in SCORES:
        raise ConfigError(f"--by {by!r}: use {' or '.join(SCORES)}")
    region = Roi.load(roi) if isinstance(roi, str) else roi  # a malformed region fails before any work
    task = tasks.get("classify")
    if tasks.for_data(data).name != task.name:
        raise ConfigError(
            f"{data}: rank compares image backbones on labelled images (DATA/<class>/... or a CSV of "
            f"path,label); this looks like {tasks.for_data(data).name} data"
        )
    cache_root = Path(cache_dir) if cache_dir else default_cache_dir()
    ds = task.load_data(Path(data), FitOptions(val_split=val_split, seed=seed, group_by=group_by), cache_root)
    profile = load_target(target) if isinstance(target, str) else target
    budget = budget_ms if budget_ms is not None else (profile.latency_budget_ms if profile else None)
    features, latency, size = {}, {}, {}
    names = candidates(backbones)
    for i, name in enumerate(names, 1):
        # each candidate takes seconds to a minute (export, features, conversion): say which one
        status(f"rank: {name} ({i} of {len(names)}): features of {len(ds.train)} training images, latency", quiet=quiet)
        features[name], exported = backbone_features(ds.train, name, cache_dir=cache_root, roi=region, quiet=quiet)
        model, runtime = _shipped_model(exported, profile, task, ds, seed, cache_root, quiet)
        session = open_session(model, runtime=runtime)
        x = np.zeros((1, 3, exported.image_preprocess.input_size, exported.image_preprocess.input_size), np.float32)
        latency[name] = time_calls(lambda s=session, a=x: s(a), runs=10)["p50_ms"]
        size[name] = round(exported.path.stat().st_size / 1e6, 2)
    groups = [s.group for s in ds.train] if any(s.group for s in ds.train) else None
    status(f"rank: scoring {len(names)} backbone(s) (cross-validated heads, LogME)", quiet=quiet)
    try:
        result = rank_backbones(
            features, [s.label for s in ds.train], groups, latency, budget or None, by=by, seed=seed
        ).to_dict()
    except ValueError as exc:
        raise DataError(f"{data}: cannot rank backbones on these images ({exc})") from None
    for row in result["table"]:
        row["size_mb"] = size[row["backbone"]]
    measured = (
        f"batch-1 {profile.precision.upper()} {profile.runtime} (what {profile.name} ships) on this machine"
        if profile
        else "batch-1 FP32 onnxruntime on this machine"
    )
    if budget:
        result["reason"] += f" (latency: {measured})"
    return {
        **result,
        "data": str(data),
        "images": len(ds.train),
        "classes": ds.classes,
        "grouped": groups is not None,
        "latency": measured,
        "roi": region.to_dict() if region is not None else None,
    }


def _shipped_model(exported, profile, task, ds, seed: int, cache_root: Path, quiet: bool) -> tuple[Path, str]:
    """The model file whose speed the budget is about, and its runtime: the target's converted
    model (from fit's model cache, made on a miss) or, without a target, the FP32 backbone."""
    if profile is None:
        return exported.path, "onnxruntime"
    from .convert import converted_model

    calibration = task.calibration(ds, profile, exported, seed) if profile.precision == "int8" else None
    converted = converted_model(exported, profile, cache_root, calibration, quiet=quiet)
    return converted.path, converted.runtime


def format_rank(r: dict) -> str:
    """The ranking as a table for people (what ``edgetl rank`` prints)."""
    lines = [f"{'backbone':<22} {'LogME':>14} {'CV accuracy (95% CI)':>24} {'ms':>6} {'MB':>6}  rank"]
    for row in r["table"]:
        lm = (
            "-"
            if row["logme"] is None
            else f"{row['logme']:.3f}" + (f" +-{row['logme_sd']:.3f}" if row["logme_sd"] is not None else "")
        )
        cv = (
            "-"
            if row["cv_accuracy"] is None
            else (f"{100 * row['cv_accuracy']:.1f}% [{100 * row['cv_lower']:.1f}, {100 * row['cv_upper']:.1f}]")
        )
        lines.append(
            f"{row['backbone']:<22} {lm:>14} {cv:>24} {row['latency_ms']:>6.1f} {row['size_mb']:>6.1f}  "
            f"{row['rank']}{' *' if row['backbone'] == r['choice'] else ''}"
            + ("" if row["within_budget"] else "  (over budget)")
        )
    how = "grouped " if r["grouped"] else ""
    roi = r.get("roi")
    cut = f", cut to the region {roi['x']:g},{roi['y']:g},{roi['w']:g},{roi['h']:g} ({roi['unit']})" if roi else ""
    return "\n".join(
        lines
        + [
            f"{r['reason']}",
            f"({r['images']} training images{cut}, {how}5-fold CV; ms: {r['latency']}; a score "
            "on training images cannot see a gap to where you deploy)",
        ]
    )
