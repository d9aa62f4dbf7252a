"""``export``: a finished bundle, re-made for another target / precision / runtime.

The bundle's manifest records how it was fitted (data path, split seed, backbone, head settings,
and the L2 the first fit chose). Re-running that recipe against another target reuses every cached
artefact: the FP32 export, the FP32 reference features, and the original features; only the new
model's conversion and its features are computed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .bundle import load_bundle
from .errors import BundleError, DataError
from .fit import FitOptions, FitResult, fit
from .heads import HeadConfig


def retargeted(opts, recorded_data: str, *, target: str | None, precision: str | None, runtime: str | None,
               data: str | Path | None, allow_drop: bool, cache_dir: str | Path | None, quiet: bool,
               data_hint: str = "DIR"):
    """A run's recorded options (any task's options dataclass) pointed at a new target / precision /
    runtime, and where its data is now. A new ``target`` brings its own precision and runtime
    unless those are given too.

    Raises:
        DataError: the recorded data is gone and ``data`` was not given.
    """
    data_path = Path(data) if data else Path(recorded_data)
    if not data_path.exists():
        raise DataError(f"{data_path}: the run's training data is not there any more; pass --data {data_hint}")
    if target is not None:
        opts = dataclasses.replace(opts, target=target, precision=None, runtime=None)
    opts = dataclasses.replace(opts, precision=precision or opts.precision, runtime=runtime or opts.runtime,
                               allow_drop=allow_drop, cache_dir=str(cache_dir) if cache_dir else opts.cache_dir,
                               quiet=quiet)
    return opts, data_path


def export_bundle(run: str | Path, out: str | Path, *, target: str | None = None, precision: str | None = None,
                  runtime: str | None = None, data: str | Path | None = None, allow_drop: bool = False,
                  cache_dir: str | Path | None = None, force: bool = False, quiet: bool = False,
                  signer=None) -> FitResult:
    """Re-export bundle ``run`` to ``out`` for another target, precision or runtime.

    Raises:
        BundleError: ``run`` is not a bundle made by ``fit``.
        DataError: the recorded training data is gone and ``data`` was not given.
    """
    src = load_bundle(run)
    training = src.manifest.get("training")
    if not training or "options" not in training:
        raise BundleError(f"{run}: this bundle does not record how it was fitted; run edgetl fit instead")
    recorded = dict(training["options"])
    head_cfg = HeadConfig.from_dict(recorded.pop("head"))
    chosen_l2 = src.head_entry(1).get("l2")
    if head_cfg.l2 is None and chosen_l2 is not None:
        head_cfg = dataclasses.replace(head_cfg, l2=chosen_l2)
    fields = {f.name for f in dataclasses.fields(FitOptions)}
    opts = FitOptions(**{k: v for k, v in recorded.items() if k in fields and k != "head"}, head=head_cfg)
    opts, data_path = retargeted(opts, training["data"], target=target, precision=precision, runtime=runtime,
                                 data=data, allow_drop=allow_drop, cache_dir=cache_dir, quiet=quiet)
    return fit(data_path, out, options=opts, force=force, signer=signer)
