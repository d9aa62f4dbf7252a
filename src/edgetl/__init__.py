"""edgetl: adapt a frozen pretrained backbone to a small dataset and ship it to edge devices.

The public API is small and loaded lazily, so ``import edgetl`` costs little and never imports
torch (the device side has none):

* laptop side: :func:`fit`, :class:`FitOptions`, :class:`HeadConfig`, :class:`AnomalyConfig`,
  :func:`export_bundle`, :func:`load_target`, :func:`list_targets`;
* device side: :func:`load_bundle`, :func:`load_predictor`, :func:`adapt`, :func:`rollback`,
  :func:`set_threshold`, :func:`history`;
* errors: :class:`EdgetlError` and its subclasses in :mod:`edgetl.errors`.

The layers, bottom up, are packages: ``core`` (bundle, sessions, targets, gate, fuse ...),
``heads`` (numpy heads and their graphs), ``tasks`` (what differs between classify, text and
anomaly), ``device`` (predict / adapt / bench; no torch), ``export`` (backbone export; torch),
``pipeline`` (fit, convert, retarget), and this package's ``cli``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "fit": "edgetl.pipeline.fit",
    "FitOptions": "edgetl.pipeline.fit",
    "FitResult": "edgetl.pipeline.fit",
    "export_bundle": "edgetl.pipeline.retarget",
    "HeadConfig": "edgetl.heads.classification",
    "AnomalyConfig": "edgetl.heads.patch",
    "DefectConfig": "edgetl.heads.defect",
    "load_target": "edgetl.core.targets",
    "list_targets": "edgetl.core.targets",
    "load_bundle": "edgetl.core.bundle",
    "load_predictor": "edgetl.device.predict",
    "adapt": "edgetl.device.adapt",
    "rollback": "edgetl.device.adapt",
    "set_threshold": "edgetl.device.adapt",
    "history": "edgetl.device.adapt",
    "EdgetlError": "edgetl.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'edgetl' has no attribute {name!r}")
