"""``export``: a finished bundle re-made for another target, precision or runtime, for every task.

A bundle's manifest records how it was fitted (data path, split seed, backbone, head settings and
what the first fit chose, such as a classifier's L2). Re-running that recipe against another
target reuses every cached artefact: the FP32 export, the FP32 reference features and the original
features; only the new model's conversion and its features are computed, and the head is trained
again on what *that* model computes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import tasks
from ..core.bundle import load_bundle
from ..errors import BundleError, DataError
from .fit import FitOptions, FitResult, fit


def export_bundle(
    run: str | Path,
    out: str | Path,
    *,
    target: str | None = None,
    precision: str | None = None,
    runtime: str | None = None,
    data: str | Path | None = None,
    allow_drop: bool = False,
    cache_dir: str | Path | None = None,
    force: bool = False,
    quiet: bool = False,
    signer=None,
) -> FitResult:
    """Re-make bundle ``run`` at ``out`` for another target, precision or runtime.

    A new ``target`` brings its own precision and runtime unless those are given too.

    Raises:
        BundleError: ``run`` is not a bundle that records how it was fitted.
        DataError: the recorded training data is gone and ``data`` was not given.
    """
    src = load_bundle(run)
    training = src.manifest.get("training") or {}
    recorded = dict(training.get("options") or {})
    if "head" not in recorded or "data" not in training:
        raise BundleError(f"{run}: this bundle does not record how it was fitted; run edgetl fit instead")
    task = tasks.for_bundle(src)
    # the kind the first fit chose is recorded: no second choice (head_auto off)
    options = FitOptions.from_dict(
        {**recorded, "task": task.name, "head_auto": False, "head": task.recorded_head(src, recorded["head"])}
    )
    data_path = Path(data) if data else Path(training["data"])
    if not data_path.exists():
        what = "FILE" if data_path.suffix else "DIR"
        raise DataError(f"{data_path}: the bundle's training data is not there any more; pass --data {what}")
    if target is not None:
        options = dataclasses.replace(options, target=target, precision=None, runtime=None)
    options = dataclasses.replace(
        options,
        precision=precision or options.precision,
        runtime=runtime or options.runtime,
        allow_drop=allow_drop,
        quiet=quiet,
        cache_dir=str(cache_dir) if cache_dir else options.cache_dir,
    )
    return fit(data_path, out, options=options, force=force, signer=signer)
