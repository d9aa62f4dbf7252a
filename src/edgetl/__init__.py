"""edgetl: adapt a frozen pretrained backbone to a small dataset and ship it to edge devices.

The public API is small and loaded lazily, so ``import edgetl`` costs little and never imports
torch (the device side has none):

* training side: :func:`fit`, :class:`FitOptions`, :class:`HeadConfig`, :func:`load_target`,
  :func:`list_targets`;
* device side: :func:`load_bundle`, :class:`Predictor`, :func:`adapt`, :func:`rollback`.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "fit": "edgetl.fit",
    "FitOptions": "edgetl.fit",
    "HeadConfig": "edgetl.heads",
    "load_target": "edgetl.targets",
    "list_targets": "edgetl.targets",
    "load_bundle": "edgetl.bundle",
    "Predictor": "edgetl.runtime",
    "adapt": "edgetl.adapt",
    "rollback": "edgetl.adapt",
    "EdgetlError": "edgetl.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'edgetl' has no attribute {name!r}")
