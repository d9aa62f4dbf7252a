"""On-device head retraining: ``adapt``, ``rollback``, ``history``. numpy + the bundle's runtime only.

How an update happens (and why it cannot lose the working model):

1. The bundle is verified and checked writable *before* any work.
2. New images go through the bundle's own backbone (the exact model the device runs).
3. Each class's new images are split: most train, a stratified part is held out. The replay
   exemplars (features of earlier training images, per class) are split the same way.
4. The head is retrained with the same numpy trainer ``fit`` uses, on new + replayed features
   (``--replace``: new only), with the current head's settings (kind, L2).
5. The gate compares old and new heads on the held-out data: accuracy on previously known classes
   may not fall by more than the tolerance, and the new data must be learnable (held-out accuracy
   well above chance; shuffled or wrong labels fail here). A refused update changes nothing.
6. New files are written beside the old ones (``heads/vN.npz``, ``exemplars/vN.npz``,
   ``model-vN.*``), fsynced, and only then does one atomic rename of ``manifest.json`` make version
   N current. A power cut before that rename leaves the old version current and whole; after it,
   the new one. ``rollback`` is the same manifest switch back to an older version.

Exemplar memory: per class at most ``per_class`` feature vectors (50 by default), chosen by herding
over the old exemplars plus the new training images, so memory stays bounded however many
updates run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import Bundle, load_bundle, update_manifest, updating, write_npz_durably
from .data import scan_images
from .errors import BundleError, ConfigError, DataError, GateError
from .features import extract_features
from .heads import Head, HeadConfig, train_head
from .runtime import open_backbone

# Keep the fused single-file model of this many most recent versions; older ones are regenerated
# on rollback (they are a few MB each, heads are a few hundred KB).
KEEP_FUSED = 3
DEFAULT_TOLERANCE_PP = 5.0
HOLDOUT = 0.25


def _fault(point: str) -> None:
    """Test hook: ``EDGETL_FAULT=<point>`` kills the process here, like a power cut would."""
    if os.environ.get("EDGETL_FAULT") == point:
        os._exit(70)


@dataclass
class AdaptResult:
    """What an update did; ``accepted`` is False only with ``dry_run``."""

    bundle: Bundle
    version: int
    labels: list[str]
    new_classes: list[str]
    gate: dict
    timings: dict
    skipped: list
    accepted: bool = True

    def to_dict(self) -> dict:
        return {"bundle": str(self.bundle.path), "version": self.version, "labels": self.labels,
                "new_classes": self.new_classes, "gate": self.gate, "timings_s": self.timings,
                "accepted": self.accepted,
                "skipped": [{"path": str(p), "reason": r} for p, r in self.skipped]}


def load_exemplars(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """exemplars.npz -> (features, label indices, label names)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            names = json.loads(bytes(z["label_names"]).decode())
            return z["features"].astype(np.float32), z["labels"].astype(np.int64), names
    except (OSError, KeyError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable exemplar memory ({exc}); re-export the bundle") from None


def herding(X: np.ndarray, y: np.ndarray, n_classes: int, *, per_class: int) -> np.ndarray:
    """Indices of up to ``per_class`` rows per class chosen by herding (iCaRL).

    Herding greedily adds the row that brings the running mean of the chosen set closest to the
    class mean, so a few exemplars reproduce the class's centre better than a random few.
    """
    chosen: list[int] = []
    for c in range(n_classes):
        rows = np.flatnonzero(y == c)
        if len(rows) <= per_class:
            chosen += rows.tolist()
            continue
        F = X[rows] / (np.linalg.norm(X[rows], axis=1, keepdims=True) + 1e-12)
        mu = F.mean(axis=0)
        acc = np.zeros_like(mu)
        free = np.ones(len(rows), dtype=bool)
        for k in range(1, per_class + 1):
            dist = np.linalg.norm(mu[None, :] - (acc[None, :] + F) / k, axis=1)
            dist[~free] = np.inf
            j = int(np.argmin(dist))
            free[j] = False
            acc += F[j]
            chosen.append(int(rows[j]))
    return np.array(chosen, dtype=np.int64)


def save_exemplars(path: Path, X: np.ndarray, y: np.ndarray, labels: list[str]) -> None:
    """features, integer labels, and label names as JSON bytes (no object arrays, no pickles)."""
    names = np.frombuffer(json.dumps(labels).encode(), dtype=np.uint8)
    write_npz_durably(path, features=X.astype(np.float32), labels=y.astype(np.int64), label_names=names)


def _holdout_mask(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
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


def fused_name(b: Bundle, version: int) -> str:
    suffix = Path(b.manifest["models"]["fused"]).suffix
    return f"model{suffix}" if version == 1 else f"model-v{version}{suffix}"


def fused_files(name: str) -> list[str]:
    return [name, str(Path(name).with_suffix(".bin"))] if name.endswith(".xml") else [name]


@contextlib.contextmanager
def new_version_files(b: Bundle, rels: list[str]):
    """Writing a new version's files: if one fails (a full disk, a read-only file system), the ones
    already written are removed and one :class:`BundleError` says the current version stays."""
    try:
        yield
    except OSError as exc:
        for rel in rels:
            (b.path / rel).unlink(missing_ok=True)
            try:
                (b.path / rel).parent.rmdir()  # a folder this update made, if it is empty
            except OSError:
                pass
        raise BundleError(f"{b.path}: cannot write the new head ({exc.strerror or exc}); "
                          f"v{b.head_version} stays current") from None


def write_fused(b: Bundle, version: int, write) -> str:
    """Write version ``version``'s single-file model through ``write(staging_path)``, then rename it
    into place (``model.*`` for v1, ``model-vN.*`` after): a crash leaves no half file under the
    final name. Returns its name inside the bundle."""
    name = fused_name(b, version)
    target = b.path / name
    staging = b.path / f".staging-{os.getpid()}{target.suffix}"
    try:
        write(staging)
        if name.endswith(".xml"):
            os.replace(staging.with_suffix(".bin"), target.with_suffix(".bin"))
        os.replace(staging, target)
    finally:
        for p in (staging, staging.with_suffix(".bin")):
            p.unlink(missing_ok=True)
    return name


def _write_fused(b: Bundle, head: Head, version: int) -> str:
    """Regenerate the classification model (backbone + ``head`` + softmax) for ``version``."""
    from .fuse import fuse

    meta = {"labels": head.labels, "head_version": version, "backbone": b.manifest["backbone"]["name"],
            "preprocess": b.manifest["backbone"]["preprocess"], "precision": b.precision}
    return write_fused(b, version, lambda staging: fuse(b.model_file("backbone"), head, staging, meta=meta))


def with_new_version(b: Bundle, entry: dict) -> tuple[list[dict], list[str]]:
    """The version list with ``entry`` added and the fused models of all but the
    :data:`KEEP_FUSED` most recent versions pruned: (versions, files to drop). A pruned version's
    ``fused`` becomes None (its head is always kept; rollback regenerates the model)."""
    versions = b.manifest["head"]["versions"] + [entry]
    keep = {e["version"] for e in versions[-KEEP_FUSED:]}
    out, drop = [], []
    for e in versions:
        if e["version"] not in keep and e.get("fused"):
            drop += [f for f in fused_files(e["fused"]) if f in b.manifest["files"]]
            e = dict(e, fused=None)
        out.append(e)
    return out, drop


def switch_version(b: Bundle, changes: dict, *, add: list[str] = (), drop: list[str] = (), signer=None,
                   operation: str = "adapt", new_version: dict | None = None) -> Bundle:
    """Atomically make ``changes`` current (the files in ``add`` hashed in), then delete the files
    in ``drop``, which the new manifest no longer lists. The caller holds the writer lock."""
    _fault("before-switch")
    new = update_manifest(b, changes, add=add, drop=drop, signer=signer, operation=operation, new_version=new_version)
    _fault("after-switch")
    for rel in drop:
        (b.path / rel).unlink(missing_ok=True)
    return new


def for_update(bundle: str | Path | Bundle, *, operation: str, dry_run: bool = False, wait: float = 0.0):
    """The bundle to work on: under its writer lock, as it is now, for a real update; simply
    loaded for a dry run (which writes nothing)."""
    path = bundle.path if isinstance(bundle, Bundle) else Path(bundle)
    if dry_run:
        return contextlib.nullcontext(load_bundle(path))
    return updating(path, operation=operation, wait=wait)


def check_tolerance(value: float, name: str = "--tolerance") -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 100):
        raise ConfigError(f"{name} {value!r}: give percentage points between 0 and 100")
    return float(value)


def adapt(
    bundle: str | Path | Bundle,
    data: str | Path,
    *,
    replace: bool = False,
    force: bool = False,
    tolerance_pp: float = DEFAULT_TOLERANCE_PP,
    holdout: float = HOLDOUT,
    seed: int = 0,
    strict: bool = False,
    dry_run: bool = False,
    quiet: bool = True,
    wait: float = 0.0,
    signer=None,
) -> AdaptResult:
    """Retrain the bundle's head on labelled images in ``data`` (plus replayed exemplars).

    Args:
        bundle: bundle directory (or a loaded Bundle).
        data: ImageFolder of new labelled images; new class names extend the label set.
        replace: train on the new data only (forget the replay memory and classes not in ``data``).
        force: accept the update even if the gate refuses it.
        tolerance_pp: allowed accuracy drop on previously known classes, in percentage points.
        holdout: fraction of new images (per class) and of exemplars held out for the gate.
        dry_run: run everything including the gate, write nothing.
        wait: seconds to wait for another writer of the bundle (0: refuse at once).
        signer: a :class:`edgetl.signing.SigningKey` that signs the new version.

    Raises:
        BundleError: damaged, foreign or read-only bundle; disk full while writing (old head stays).
        BundleBusy: another process is writing the bundle.
        DataError: no usable images in ``data``.
        GateError: the update would hurt known classes or the new labels are not learnable.

    Example:
        >>> r = adapt("parts.bundle", "new_images/")  # doctest: +SKIP
        >>> r.version, r.new_classes  # doctest: +SKIP
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    check_tolerance(tolerance_pp)
    with for_update(bundle, operation="adapt", dry_run=dry_run, wait=wait) as b:
        if b.task != "classify":
            raise BundleError(f"{b.path}: adapt for task {b.task!r} bundles is done by its own command")
        layout, samples, val, skipped = scan_images(data, strict=strict)
        samples += val or []
        if not samples:
            raise DataError(f"{data}: no usable labelled images ({len(skipped)} skipped); expected {data}/<class>/<image>")
        session = open_backbone(b)
        X_new = extract_features([s.path for s in samples], session=session, preprocess=b.preprocess,
                                 digests=[s.digest for s in samples], quiet=quiet, desc="adapt features")
        timings["features"] = round(time.perf_counter() - t0, 3)
        return update_head(b, X_new, [s.label for s in samples], data=data, n_items=len(samples), skipped=skipped,
                           replace=replace, force=force, tolerance_pp=tolerance_pp, holdout=holdout, seed=seed,
                           dry_run=dry_run, timings=timings, t0=t0, signer=signer)


def update_head(b: Bundle, X_new: np.ndarray, new_labels: list[str], *, data, n_items: int, skipped: list,
                replace: bool = False, force: bool = False, tolerance_pp: float = DEFAULT_TOLERANCE_PP,
                holdout: float = HOLDOUT, seed: int = 0, dry_run: bool = False, timings: dict | None = None,
                t0: float | None = None, signer=None) -> AdaptResult:
    """Replay + gate + new head version from already extracted features (any modality).

    ``adapt`` (images) and ``edgetl.text.adapt_text`` both end here, so the gate, the exemplar
    memory and the atomic switch are one piece of code. The caller holds the writer lock (it got
    ``b`` from :func:`for_update`).
    """
    timings = {} if timings is None else timings
    t0 = time.perf_counter() if t0 is None else t0
    old_head = b.load_head()
    old_labels = list(old_head.labels)
    new_classes = sorted(set(new_labels) - set(old_labels))
    labels = (sorted(set(new_labels)) if replace else old_labels + new_classes)
    index = {l: i for i, l in enumerate(labels)}
    y_new = np.array([index[l] for l in new_labels], dtype=np.int64)
    t1 = time.perf_counter()

    ex_file = b.head_entry().get("exemplars", b.manifest.get("exemplars", {}).get("file", "exemplars.npz"))
    X_ex, y_ex_old, ex_names = load_exemplars(b.path / ex_file)
    keep = np.isin(np.array(ex_names)[y_ex_old], labels) if len(y_ex_old) else np.zeros(0, bool)
    X_ex = X_ex[keep]
    y_ex = np.array([index[ex_names[i]] for i in y_ex_old[keep]], dtype=np.int64)

    hold_new = _holdout_mask(y_new, holdout, seed)
    hold_ex = _holdout_mask(y_ex, holdout, seed + 1)
    X_tr = np.concatenate([X_new[~hold_new]] + ([] if replace else [X_ex[~hold_ex]]))
    y_tr = np.concatenate([y_new[~hold_new]] + ([] if replace else [y_ex[~hold_ex]]))

    cfg = HeadConfig.from_dict(old_head.meta.get("config", {"kind": old_head.kind}))
    if cfg.l2 is None and old_head.meta.get("l2") is not None:
        cfg = HeadConfig.from_dict({**cfg.to_dict(), "l2": old_head.meta["l2"]})  # no search on the device
    head = train_head(X_tr, y_tr, labels, cfg=cfg)
    timings["train"] = round(time.perf_counter() - t1, 3)

    # ---- gate: compare heads on held-out data neither of them trained on.
    # The old head trained on the exemplars, so its accuracy on them is optimistic; the fair
    # baseline is a *control* head trained the same way on the same replay split without the new
    # data. Where there is no replay memory (--replace), the old head on held-out new images of
    # known classes is the baseline (it never saw those).
    X_ev = np.concatenate([X_new[hold_new], X_ex[hold_ex]])
    y_ev = np.concatenate([y_new[hold_new], y_ex[hold_ex]])
    known = np.isin(np.array(labels)[y_ev], old_labels) if len(y_ev) else np.zeros(0, bool)
    if not replace and (~hold_ex).any() and hold_ex.any():
        control = train_head(X_ex[~hold_ex], y_ex[~hold_ex], labels, cfg=cfg)
        baseline = _accuracy(control, X_ev[known], y_ev[known])
        baseline_kind = "replay-only control head"
    else:
        old_index = {l: i for i, l in enumerate(old_labels)}
        sel = known[: int(hold_new.sum())]
        y_old = np.array([old_index[labels[i]] for i in y_new[hold_new][sel]], dtype=np.int64)
        X_sel = X_new[hold_new][sel]
        baseline = _accuracy(old_head, X_sel, y_old)
        baseline_kind = "current head"
        known = np.zeros(len(y_ev), bool)
        known[: int(hold_new.sum())] = sel
    new_known = _accuracy(head, X_ev[known], y_ev[known])
    new_holdout = _accuracy(head, X_new[hold_new], y_new[hold_new])
    k_new = len(np.unique(y_new))
    floor = min(0.5, 2.0 / k_new) if k_new > 1 else 0.0
    reasons = []
    swaps = label_disagreements(old_head, X_new, new_labels)
    for w in swaps:
        reasons.append(f"{w['looks_like_count']} of {w['images']} new images labelled {w['label']!r} look like "
                       f"{w['looks_like']!r} to the current head (it agrees with the label on {w['agreement']:.0%}); "
                       "are the labels swapped? If the parts really changed, pass --force")
    if baseline is not None and new_known is not None and (baseline - new_known) * 100 > tolerance_pp:
        reasons.append(f"accuracy on known classes would fall from {baseline:.1%} to {new_known:.1%} "
                       f"(tolerance {tolerance_pp} pp)")
    if new_holdout is not None and k_new > 1 and new_holdout < floor:
        reasons.append(f"held-out accuracy on the new images is {new_holdout:.1%}, near chance "
                       f"(floor {floor:.0%}); are the labels right?")
    gate = {"old_known_accuracy": baseline, "baseline": baseline_kind, "new_known_accuracy": new_known, "new_holdout_accuracy": new_holdout,
            "holdout_images": int(hold_new.sum()), "holdout_exemplars": int(hold_ex.sum()),
            "tolerance_pp": tolerance_pp, "passed": not reasons, "forced": bool(reasons and force),
            "label_check": swaps, "reasons": reasons}
    if reasons and not force and not dry_run:
        raise GateError(f"update refused, v{b.head_version} stays current: " + "; ".join(reasons) + " (--force to accept)")
    if dry_run:
        return AdaptResult(b, b.head_version, labels, new_classes, gate, timings, skipped, accepted=False)

    # ---- final head on all data (held-out rows included), new exemplar memory, files, switch
    t2 = time.perf_counter()
    X_all = np.concatenate([X_new] + ([] if replace else [X_ex]))
    y_all = np.concatenate([y_new] + ([] if replace else [y_ex]))
    head = train_head(X_all, y_all, labels, cfg=cfg)
    per_class = int(b.manifest.get("exemplars", {}).get("per_class", 20))
    ex_idx = herding(X_all, y_all, len(labels), per_class=per_class)
    version = max(e["version"] for e in b.manifest["head"]["versions"]) + 1
    head_rel, ex_rel = f"heads/v{version}.npz", f"exemplars/v{version}.npz"
    with new_version_files(b, [head_rel, ex_rel, *fused_files(fused_name(b, version))]):
        (b.path / "heads").mkdir(exist_ok=True)
        (b.path / "exemplars").mkdir(exist_ok=True)
        head.save(b.path / head_rel)
        save_exemplars(b.path / ex_rel, X_all[ex_idx], y_all[ex_idx], labels)
        fused = _write_fused(b, head, version)
    timings["write"] = round(time.perf_counter() - t2, 3)
    entry = {"version": version, "file": head_rel, "exemplars": ex_rel, "fused": fused, "kind": head.kind,
             "labels": labels, "source": "adapt-replace" if replace else "adapt",
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "data": str(Path(data).resolve()), "images": n_items, "new_classes": new_classes,
             "gate": gate, "l2": head.meta.get("l2"), "unknown_threshold": b.head_entry().get("unknown_threshold", 0.0)}
    versions, drop = with_new_version(b, entry)
    new = switch_version(b, {"head": {"current": version, "versions": versions}, "labels": labels,
                             "models": {**b.manifest["models"], "fused": fused},
                             "thresholds": {**b.manifest.get("thresholds", {}), "unknown": entry["unknown_threshold"]}},
                         add=[head_rel, ex_rel, *fused_files(fused)], drop=drop, signer=signer, operation="adapt",
                         new_version=entry)
    timings["total"] = round(time.perf_counter() - t0, 3)
    return AdaptResult(new, version, labels, new_classes, gate, timings, skipped)


def rollback(bundle: str | Path | Bundle, *, to: int | None = None, wait: float = 0.0, signer=None) -> Bundle:
    """Make an earlier head version current again (default: the one before the current).

    Works for every task (classification, text, anomaly). The old head file is used as it was
    written, so predictions are bit-identical to what that version gave, and the version comes
    back with its own thresholds (its "unknown" confidence, or its defect score cut). Its fused
    model is regenerated if it was pruned.

    Raises:
        BundleError: no such version, nothing to roll back to, or a read-only bundle.
        BundleBusy: another process is writing the bundle.
    """
    with for_update(bundle, operation="rollback", wait=wait) as b:
        current = b.head_version
        versions = [e["version"] for e in b.manifest["head"]["versions"]]
        if to is None:
            older = [v for v in versions if v < current]
            if not older:
                raise BundleError(f"{b.path}: v{current} is the first version; nothing to roll back to")
            to = max(older)
        entry = b.head_entry(to)  # raises for an unknown version
        if to == current:
            return b
        thresholds = dict(b.manifest.get("thresholds", {}))
        fused = entry.get("fused") or fused_name(b, to)
        present = all(f in b.manifest["files"] for f in fused_files(fused))
        if b.task == "anomaly":
            from .anomaly import AnomalyHead, write_fused_anomaly

            thresholds["anomaly"] = float(entry.get("threshold", thresholds.get("anomaly", 1.0)))
            if not present:
                fused = write_fused_anomaly(b, AnomalyHead.load(b.path / entry["file"]), to, thresholds["anomaly"])
        else:
            thresholds["unknown"] = float(entry.get("unknown_threshold", 0.0))
            if not present:
                fused = _write_fused(b, b.load_head(to), to)
        versions_meta = [dict(e, fused=fused) if e["version"] == to else e for e in b.manifest["head"]["versions"]]
        return switch_version(b, {"labels": entry["labels"], "thresholds": thresholds,
                                  "head": {"current": to, "versions": versions_meta},
                                  "models": {**b.manifest["models"], "fused": fused}},
                              add=[] if present else fused_files(fused), signer=signer, operation="rollback")


def set_threshold(bundle: str | Path | Bundle, value: float, *, wait: float = 0.0, signer=None) -> Bundle:
    """Set the current head version's decision threshold (a manifest switch; graphs untouched).

    Classification and text: predictions under ``value`` confidence (0..1) answer "unknown"; 0
    turns that off. Anomaly: an image scoring ``value`` (> 0) or more is a defect. Each head version
    keeps its own threshold (a rollback brings back that version's).

    Raises:
        ConfigError: a value outside the range.  BundleBusy: another writer holds the bundle.
    """
    with for_update(bundle, operation="threshold", wait=wait) as b:
        anomaly = b.task == "anomaly"
        if not (isinstance(value, (int, float)) and math.isfinite(value)) or \
                (anomaly and not value > 0) or (not anomaly and not 0.0 <= value <= 1.0):
            raise ConfigError(f"threshold {value!r}: " + ("a defect score cut must be a number > 0" if anomaly
                                                         else "give a confidence between 0 and 1 (0 turns 'unknown' off)"))
        key, field = ("anomaly", "threshold") if anomaly else ("unknown", "unknown_threshold")
        extra = {"threshold_policy": "set by user"} if anomaly else {}
        versions = [dict(e, **{field: float(value)}, **extra) if e["version"] == b.head_version else e
                    for e in b.manifest["head"]["versions"]]
        return switch_version(b, {"head": {**b.manifest["head"], "versions": versions},
                                  "thresholds": {**b.manifest.get("thresholds", {}), key: float(value)}},
                              signer=signer, operation="threshold")


def label_disagreements(head: Head, X: np.ndarray, labels: list[str], *, min_images: int = 5) -> list[dict]:
    """Known classes whose new images the current head consistently calls another known class.

    Drift lowers agreement too, but spreads the mistakes; a label error (two classes' folders
    swapped, a mislabelled batch) sends most of one label's images to one other class. A label is
    flagged when, by one-sided 95 % Wilson bounds, most of its images look like one other class and
    fewer than half look like itself. Needs ``min_images`` of a label to say anything.
    """
    from .gate import wilson_interval

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
            out.append({"label": name, "images": int(len(rows)), "agreement": round(agree / len(rows), 4),
                        "looks_like": head.labels[other], "looks_like_count": share})
    return out


def history(bundle: str | Path | Bundle) -> list[dict]:
    """Every head version, oldest first, with ``current`` marked."""
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    cur = b.head_version
    return [{**e, "current": e["version"] == cur} for e in b.manifest["head"]["versions"]]
