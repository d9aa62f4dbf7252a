"""On-device updates, for every task: ``adapt``, ``rollback``, ``threshold``, ``history``.

numpy + the bundle's runtime only. Every writer holds the bundle's writer lock for its whole
read-modify-write (:func:`edgetl.core.versions.for_update`), works on the bundle as it is then,
and switches the manifest in one atomic rename (:mod:`edgetl.core.versions`): a power cut leaves
the old or the new version current and whole, and two writers never lose each other's update.
What an update learns is the task's (:meth:`edgetl.tasks.base.Task.adapt`): a classifier retrains
its head on the new labelled items plus the replay memory behind a gate; a defect detector adds
newly confirmed good images to its memory bank or statistics.
"""

from __future__ import annotations

import math
from pathlib import Path

from .. import tasks
from ..core.bundle import Bundle, load_bundle
from ..core.versions import for_update, fused_files, fused_name, switch_version, write_fused
from ..errors import BundleError, ConfigError
from ..tasks.base import AdaptResult

DEFAULT_TOLERANCE_PP = 5.0
HOLDOUT = 0.25


def check_tolerance(value: float, name: str = "--tolerance") -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 100):
        raise ConfigError(f"{name} {value!r}: give percentage points between 0 and 100")
    return float(value)


def adapt(
    bundle: str | Path | Bundle,
    data,
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
    threshold: float | None = None,
) -> AdaptResult:
    """Teach a deployed bundle new data, on the device: a new head version, or nothing.

    Args:
        bundle: the bundle directory (or a loaded Bundle).
        data: classification: new labelled images (``DATA/<class>/...``) or texts (a CSV / TSV /
            JSONL), new class names extending the label set; defects: newly confirmed good images.
        replace: classification: train on ``data`` only (forget the replay memory and classes
            not in it).
        force: accept the update even if the gate refuses it.
        tolerance_pp: allowed accuracy drop on known classes, in percentage points.
        holdout: fraction of new items (per class) and of exemplars held out for the gate.
        dry_run: run everything including the gate, write nothing.
        wait: seconds to wait for another writer of the bundle (0: refuse at once).
        signer: a :class:`edgetl.core.signing.SigningKey` that signs the new version.
        threshold: defects: a new score threshold (default: carried over).

    Raises:
        BundleError: damaged, foreign or read-only bundle; disk full while writing (old head stays).
        BundleBusy: another process is writing the bundle.
        DataError: no usable items in ``data``.
        GateError: the update would hurt known classes or its labels are not learnable.

    Example:
        >>> r = adapt("parts.bundle", "new_images/")  # doctest: +SKIP
        >>> r.version, r.summary["new_classes"]  # doctest: +SKIP
    """
    check_tolerance(tolerance_pp)
    with for_update(bundle, operation="adapt", dry_run=dry_run, wait=wait) as b:
        return tasks.for_bundle(b).adapt(
            b,
            data,
            replace=replace,
            force=force,
            tolerance_pp=tolerance_pp,
            holdout=holdout,
            seed=seed,
            strict=strict,
            dry_run=dry_run,
            quiet=quiet,
            signer=signer,
            threshold=threshold,
        )


def rollback(bundle: str | Path | Bundle, *, to: int | None = None, wait: float = 0.0, signer=None) -> Bundle:
    """Make an earlier head version current again (default: the one before the current).

    The old head file is used as it was written, so predictions are bit-identical to what that
    version gave, and the version comes back with its own thresholds. Its fused model is
    regenerated if it was pruned.

    Raises:
        BundleError: no such version, nothing to roll back to, or a read-only bundle.
        BundleBusy: another process is writing the bundle.
    """
    with for_update(bundle, operation="rollback", wait=wait) as b:
        task = tasks.for_bundle(b)
        current = b.head_version
        if to is None:
            older = [e["version"] for e in b.manifest["head"]["versions"] if e["version"] < current]
            if not older:
                raise BundleError(f"{b.path}: v{current} is the first version; nothing to roll back to")
            to = max(older)
        entry = b.head_entry(to)  # raises for an unknown version
        if to == current:
            return b
        thresholds = {
            **b.manifest.get("thresholds", {}),
            task.threshold_key: float(
                entry.get(task.threshold_field, b.manifest.get("thresholds", {}).get(task.threshold_key, 0.0))
            ),
        }
        fused = entry.get("fused") or fused_name(b, to)
        present = all(f in b.manifest["files"] for f in fused_files(fused))
        if not present:
            head = task.load_head(b.open_verified(entry["file"]))
            fused = write_fused(b, to, head, {**task.fused_meta(b, head), "labels": entry["labels"]})
        versions = [dict(e, fused=fused) if e["version"] == to else e for e in b.manifest["head"]["versions"]]
        return switch_version(
            b,
            {
                "labels": entry["labels"],
                "thresholds": thresholds,
                "head": {"current": to, "versions": versions},
                "models": {**b.manifest["models"], "fused": fused},
            },
            add=[] if present else fused_files(fused),
            signer=signer,
            operation="rollback",
        )


def set_threshold(bundle: str | Path | Bundle, value: float, *, wait: float = 0.0, signer=None) -> Bundle:
    """Set the current head version's decision threshold (a manifest switch; graphs untouched).

    Classification and text: predictions under ``value`` confidence (0..1) answer "unknown"; 0
    turns that off. Defects: an image scoring ``value`` (> 0) or more is a defect. Each head version
    keeps its own threshold (a rollback brings back that version's).

    Raises:
        ConfigError: a value outside the task's range.  BundleBusy: another writer holds the bundle.
    """
    with for_update(bundle, operation="threshold", wait=wait) as b:
        task = tasks.for_bundle(b)
        value = task.check_threshold(value)
        extra = {"threshold_policy": "set by user"} if task.threshold_field == "threshold" else {}
        versions = [
            dict(e, **{task.threshold_field: value}, **extra) if e["version"] == b.head_version else e
            for e in b.manifest["head"]["versions"]
        ]
        return switch_version(
            b,
            {
                "head": {**b.manifest["head"], "versions": versions},
                "thresholds": {**b.manifest.get("thresholds", {}), task.threshold_key: value},
            },
            signer=signer,
            operation="threshold",
        )


def history(bundle: str | Path | Bundle) -> list[dict]:
    """Every head version, oldest first, with ``current`` marked."""
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    cur = b.head_version
    return [{**e, "current": e["version"] == cur} for e in b.manifest["head"]["versions"]]
