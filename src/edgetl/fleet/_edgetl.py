"""The one door between ``edgetl.fleet`` and the rest of edgetl.

Every other module of the fleet package imports edgetl *only* from here: one place that names the
edgetl pieces the fleet uses, each with at most the glue it needs. Nothing here knows about Flower.

What the fleet uses, by purpose:

* errors: :class:`FleetError` (a :class:`edgetl.errors.EdgetlError`, exit code 2) plus edgetl's own
  ``BundleError`` / ``DataError`` / ``GateError`` / ``BundleBusy`` / ``TrustError``;
* bundles: :func:`load_bundle`, :func:`for_update` (the writer lock), :func:`current_head`;
* head kinds: :func:`fleet_merge` (a merge by name from edgetl's registry of head kinds),
  :class:`FleetMerge` and :func:`register_fleet_merge` (how the fleet's merges register);
* heads: :func:`head_from_arrays` (a ``Head`` from plain arrays, checked the way loading a head
  file checks it), :func:`train_head` (central and device-alone baselines);
* data and features: :func:`labelled_images`, :func:`good_images`, :func:`image_features`,
  :func:`patch_features` (always through the bundle's own backbone);
* anomaly maths: :func:`merge_moments` (Chan's merge), :func:`greedy_coreset`, :func:`patch_rows`,
  :func:`coreset_size`, :func:`fit_anomaly_head`, :func:`auroc`, :func:`softmax`;
* replay memory: :func:`load_exemplars`, :func:`herding`, :func:`holdout_mask`;
* writing a new head version: :func:`write_head_version` (the same
  :func:`edgetl.core.versions.add_version` every ``adapt`` uses), :func:`history`, :func:`rollback`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .. import tasks
from ..core import bundle as _bundle
from ..core.features import ImageExtractor
from ..core.metrics import auroc as _auroc
from ..core.metrics import softmax
from ..core.sessions import bundle_session
from ..core.signing import policy_from_env, sign_delivery, signing_key_from, trust_path, verify_delivery
from ..core.versions import add_version
from ..core.versions import for_update as _for_update
from ..device import adapt as _adapt
from ..errors import (
    BundleBusy,
    BundleError,
    ConfigError,
    DataError,
    EdgetlError,
    GateError,
    MissingDependency,
    TrustError,
)
from ..heads import exemplars as _exemplars
from ..heads import patch as _patch
from ..heads import registry as _registry
from ..heads.classification import Head, HeadConfig
from ..heads.registry import FleetMerge, register_fleet_merge
from ..heads.training import train_head as _train_head
from ..tasks.anomaly.data import good_images as _good_images
from ..tasks.anomaly.task import AnomalyPredictor, PatchExtractor
from ..tasks.anomaly.task import load_overview as _load_overview
from ..tasks.anomaly.task import score_rows as _score_rows
from ..tasks.anomaly.tiles import TilePlan
from ..tasks.anomaly.tiles import read_plan as tile_plan  # a defect bundle's plan (None: one view)
from ..tasks.classify.data import scan_images
from ..tasks.classify.update import holdout_mask as _holdout_mask

__all__ = [
    "BundleBusy",
    "BundleError",
    "ConfigError",
    "DataError",
    "EdgetlError",
    "GateError",
    "MissingDependency",
    "TrustError",
    "softmax",
    "policy_from_env",
    "sign_delivery",
    "trust_path",
    "verify_delivery",
    "FleetError",
    "FleetMerge",
    "register_fleet_merge",
]


class FleetError(EdgetlError):
    """A fleet summary, round or option is unusable: one line saying which device sent what, and
    what was expected. Exit code 2 like every edgetl user error."""


# ------------------------------------------------------------------------------------ bundles
def load_bundle(path, *, trust=None):
    """edgetl's verified bundle load (hashes, schema, trust policy from ``EDGETL_TRUST``)."""
    return _bundle.load_bundle(path, trust=trust)


def for_update(path, *, operation: str = "adapt", wait: float = 0.0):
    """edgetl's writer lock around a read-modify-write of the bundle."""
    return _for_update(path, operation=operation, wait=wait)


def task_of(name: str):
    """The registered task called ``name``: a round asks it what differs by task (a one-class task
    merges defect heads and sends verdicts, a classifier merges classes)."""
    return tasks.get(name)


def current_head(b):
    """The bundle's current head: a ``Head`` (classify / text) or an ``AnomalyHead``.

    Raises:
        FleetError: a defect head with an image-level part (combined, knn, gaussian): its merges
            (and the normalisation of its two parts across devices) are not built yet.
    """
    task = tasks.for_bundle(b)
    head = task.load_head(b.open_verified(b.head_entry()["file"]))
    if task.one_class and not isinstance(head, _patch.AnomalyHead):
        raise FleetError(
            f"{b.path}: its {getattr(head, 'label', head.kind)} defect head cannot be merged by a "
            "fleet round yet (patchcore and padim can); fit the fleet's bundle with --head patchcore "
            "or --head padim"
        )
    if task.one_class:
        # the tile plan travels with the head through a round: patches of another plan are
        # patches of another scale, and a merge of them would score neither plan's frames
        head.meta = {**head.meta, "tiles": tiles_tag(tile_plan(b))}
    return head


def tiles_tag(plan: TilePlan | None) -> str:
    """What a round compares of two bundles' tilings, readable in a refusal: ``"none"`` or
    ``"448x336 frames, 2x2 tiles of 224 at scale 1, <digest>"``."""
    if plan is None:
        return "none"
    (fw, fh), n = plan.frame, f"{len(plan.xs)}x{len(plan.ys)}"
    return f"{fw}x{fh} frames, {n} tiles of {plan.tile} at scale {plan.scale:.3g}, {plan.digest()}"


def signing_key(option):
    """A signing key from a path (or ``EDGETL_SIGN_KEY``), or None."""
    return signing_key_from(option)


# ------------------------------------------------------------------------------------ heads
def fleet_merge(name):
    """The fleet merge registered as ``name`` (:func:`edgetl.heads.registry.fleet_merge`).

    Raises:
        FleetError: no such merge; the message lists the valid ones.
    """
    try:
        return _registry.fleet_merge(name)
    except ConfigError as exc:
        raise FleetError(str(exc)) from None


def fleet_merge_names() -> tuple[str, ...]:
    """Every registered fleet merge's name."""
    return _registry.fleet_merge_names()


def head_from_arrays(kind: str, labels: list[str], arrays: dict, meta: dict | None = None):
    """A classification ``Head`` from float arrays, checked like loading a head file.

    Raises:
        FleetError: the arrays do not make a ``kind`` head over ``labels``.
    """
    try:
        return Head.from_arrays(kind, labels, arrays, meta)
    except DataError as exc:
        raise FleetError(f"global head refused: {exc}") from None


def train_head(X, y, labels, **kw):
    """edgetl's numpy head trainer: the central and device-alone baselines."""
    cfg = kw.pop("cfg", None)
    if cfg is None:
        cfg = HeadConfig(
            kind=kw.pop("kind", "linear"), **{k: kw.pop(k) for k in list(kw) if k in ("l2", "seed", "hidden", "epochs")}
        )
    return _train_head(X, y, labels, cfg=cfg, **kw)


def anomaly_head_like(template, arrays: dict, meta: dict | None = None):
    """An ``AnomalyHead`` with ``template``'s settings (kind, config, grid, size) and new arrays."""
    return dataclasses.replace(template, arrays=dict(arrays), meta=dict(meta or template.meta), _cache={})


def merge_moments(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """The exact parallel-moments merge (Chan et al.) PaDiM updates use."""
    return _patch.merge_moments(mean_a, m2_a, n_a, mean_b, m2_b, n_b)


def greedy_coreset(X, n, *, seed=0, projection=128, centres=None):
    return _patch.greedy_coreset(X, n, seed=seed, projection=projection, centres=centres)


def patch_rows(F):
    """(N, C, H, W) patch features -> (N*H*W, C) rows, as PatchCore stores them."""
    return _patch.patch_rows(np.asarray(F, np.float32))


def coreset_size(n_patches: int, cfg) -> int:
    return _patch.coreset_size(n_patches, cfg)


def padim_moments(F, channels):
    """Per-position mean (P, d) and scatter (P, d, d) in float64, and the image count."""
    return _patch.padim_moments(np.asarray(F, np.float32), np.asarray(channels, np.int64))


def fit_anomaly_head(F, cfg, *, size: int):
    return _patch.fit_patch_head(F, cfg, size=size)


def anomaly_config(**kw):
    return _patch.AnomalyConfig(**kw)


def auroc(y, s):
    return _auroc(np.asarray(y), np.asarray(s))


# ------------------------------------------------------------------------------------ data
def labelled_images(data, *, strict: bool = False) -> tuple[list[Path], list[str], list[str], list]:
    """(paths, labels, sha256 digests, skipped) of an edgetl image folder / CSV; an explicit
    validation split is folded in, as ``adapt`` does."""
    _, samples, val, skipped = scan_images(data, strict=strict)
    samples = list(samples) + list(val or [])
    return [s.path for s in samples], [s.label for s in samples], [s.digest for s in samples], skipped


def labelled_features(b, data, *, strict: bool = False, quiet: bool = True) -> tuple[np.ndarray, list[str], list]:
    """(features, labels, skipped) of a classifier bundle's labelled ``data``, found and read by the
    bundle's task as ``adapt`` reads them (image folders and CSV manifests with an explicit
    validation split folded in; CSV / TSV / JSONL texts) and through the bundle's own backbone.

    Raises:
        DataError: no usable labelled item in ``data``.
    """
    task = tasks.for_bundle(b)
    items, skipped = task.scan(data, bundle=b, strict=strict)
    if not items:
        raise DataError(f"{data}: no usable labelled {task.items} for this device ({len(skipped)} skipped)")
    X = task.features(task.predictor(b).extractor, items, quiet=quiet, desc="fleet features")
    return X, [s.label for s in items], skipped


def good_images(data, *, strict: bool = False) -> list[Path]:
    """Good images of an anomaly layout (``DATA/train/good``, ``DATA/good`` or the folder itself)."""
    samples, _ = _good_images(data, strict=strict)
    return [s.path for s in samples]


def image_features(b, paths, *, digests=None, quiet: bool = True) -> np.ndarray:
    """Feature vectors through the bundle's own backbone, exactly what ``adapt`` computes."""
    session = bundle_session(b, b.model_file("backbone"))
    ext = ImageExtractor(session, b.preprocess, b.model_file("backbone"))
    items = [Path(p) for p in paths]
    if digests is not None:
        items = [_Item(p, d) for p, d in zip(items, digests)]
    return ext.features(items, quiet=quiet, desc="fleet features")


@dataclasses.dataclass(frozen=True)
class _Item:
    path: Path
    digest: str


def patch_features(b, paths, *, quiet: bool = True) -> np.ndarray:
    """Patch features (N, C, H, W) through an anomaly bundle's backbone (as ``adapt`` does); for a
    tiled bundle, of every tile of every frame (N * tiles, C, H, W), frame-major."""
    pred = AnomalyPredictor(b, fused=False)
    ext = PatchExtractor(pred.session, pred.preprocess, b.model_file("backbone"), pred.shape)
    items = [Path(p) for p in paths]
    if pred.plan is not None:
        rows = ext.tiles(items, pred.plan)
    else:
        rows = ext.patches(items, quiet=quiet, desc="fleet features")  # (N, C*H*W)
    return rows.reshape(len(rows), *ext.shape)


def tiles_per_image(b) -> int:
    """Rows of :func:`patch_features` per image: a tiled bundle's tiles (and its overview row,
    where the plan has one), else 1."""
    plan = tile_plan(b)
    return 1 if plan is None else plan.rows


def has_overview(b) -> bool:
    """Whether each frame's rows of :func:`patch_features` end with a whole-frame overview row:
    scored with the frame, never merged into the shared patch memory (the overview is the whole
    frame at another scale and has a memory of its own, which each device keeps)."""
    plan = tile_plan(b)
    return plan is not None and plan.overview


def anomaly_scores(b, head, F) -> np.ndarray:
    """Image scores of patch features under ``head`` (the numpy reference of the fused graph); for
    a tiled bundle, frame scores as the device scores them: the maximum over each frame's tiles,
    with the overview (the bundle's current one) combined in where the plan has one."""
    plan = tile_plan(b)
    if plan is None:
        return head.maps(F)[1]
    overview = _load_overview(b, b.head_version, plan)  # the file alone: no runtime session for it
    return _score_rows(head, np.asarray(F).reshape(len(F), -1), plan, overview)[1]


# ------------------------------------------------------------------------------------ replay memory
def load_exemplars(b) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The current version's replay memory: (features, label indices, label names)."""
    rel = b.head_entry().get("exemplars", b.manifest.get("exemplars", {}).get("file", "exemplars.npz"))
    return _exemplars.load_exemplars(b.open_verified(rel))


def herding(X, y, n_classes: int, *, per_class: int) -> np.ndarray:
    return _exemplars.herding(X, y, n_classes, per_class=per_class)


def holdout_mask(y, fraction: float, seed: int) -> np.ndarray:
    """``adapt``'s stratified held-out mask (none from a class with a single row)."""
    return _holdout_mask(np.asarray(y), fraction, seed)


# ------------------------------------------------------------------------------------ new versions
def write_head_version(b, head, *, entry: dict, exemplars=None, signer=None):
    """Write ``head`` as a new version of bundle ``b`` and make it current, as ``adapt`` does
    (:func:`edgetl.core.versions.add_version`: files beside the old ones, one atomic manifest
    switch). The caller holds the writer lock. ``exemplars`` = (X, y, labels) writes a new replay
    memory (classification); None keeps pointing at the current version's. ``entry`` holds the
    provenance fields of the version entry (``source``, ``fleet`` ...). Returns (bundle, version).
    """
    task = tasks.for_bundle(b)
    cur = b.head_entry()
    thresholds = dict(b.manifest.get("thresholds", {}))
    version = max(e["version"] for e in b.manifest["head"]["versions"]) + 1
    files = {}
    if task.one_class:
        threshold = float(entry.get("threshold", cur.get("threshold", thresholds.get(task.threshold_key, 1.0))))
        # a tiled bundle's whole-frame head is not merged by the round: the new version keeps the
        # current one's (file and normalisation), so its frames score as the threshold expects
        keep = {k: cur[k] for k in ("overview", "overview_norm") if cur.get(k)}
        full = {"kind": head.kind, "labels": list(task.fixed_labels), **keep, **entry, "threshold": threshold}
        thresholds[task.threshold_key] = threshold
        changes = {"thresholds": thresholds}
        meta = {**task.fused_meta(b, head), "threshold": threshold}
    else:
        ex_rel = cur.get("exemplars", b.manifest.get("exemplars", {}).get("file", "exemplars.npz"))
        if exemplars is not None:
            ex_rel = f"exemplars/v{version}.npz"
            X, y, labels = exemplars
            files[ex_rel] = lambda p: _exemplars.save_exemplars(p, X, y, labels)
        full = {
            "kind": head.kind,
            "labels": list(head.labels),
            "exemplars": ex_rel,
            "unknown_threshold": float(cur.get("unknown_threshold", 0.0)),
            **entry,
        }
        thresholds["unknown"] = full["unknown_threshold"]
        changes = {"thresholds": thresholds, "labels": list(head.labels)}
        meta = {**task.fused_meta(b, head), "labels": list(head.labels)}
    new = add_version(b, head, full, meta=meta, changes=changes, files=files, signer=signer, operation="adapt")
    return new, new.head_version


def history(path) -> list[dict]:
    return _adapt.history(path)


def rollback(path, *, to=None, wait: float = 0.0, signer=None):
    return _adapt.rollback(path, to=to, wait=wait, signer=signer)
