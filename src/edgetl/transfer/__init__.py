"""Know when transfer works: measuring pieces for the failure modes of transfer learning.

Four parts, all taking plain numpy arrays (features, labels, groups) and returning dataclasses or
dicts, so any pipeline (fit, predict, eval, a CLI command) can call them:

* :mod:`.rank` — choose a backbone by measurement: :func:`rank_backbones` (LogME from :mod:`.evidence`
  and cross-validated head accuracy, with the uncertainty of each and a rule that prefers the
  cheaper backbone when the difference is within noise);
* :mod:`.negative` — negative transfer: :func:`transfer_check` / :func:`compare_to_baseline`
  against :func:`pixel_baseline_features`, a baseline with no pretrained knowledge;
* :mod:`.drift` — input drift on the device: :func:`fit_drift_reference` at fit time, then
  :meth:`DriftReference.score` per image and :func:`drift_summary` per folder;
* :mod:`.groups` — :func:`group_accuracy`: accuracy per group, the worst group and its gap.

No torch anywhere in this package: it sits between the heads and the tasks (the device scores drift
with it). ``rank`` and ``negative`` use edgetl's numpy head trainer and the gate's intervals; the
features they measure come from the caller (:mod:`edgetl.pipeline.rank` extracts them for
``edgetl rank``). Submodules load lazily, so ``import edgetl.transfer`` costs nothing.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "logme": ".evidence",
    "LogMEResult": ".evidence",
    "rank_backbones": ".rank",
    "score_backbones": ".rank",
    "choose_backbone": ".rank",
    "cv_accuracy": ".rank",
    "RankResult": ".rank",
    "BackboneScore": ".rank",
    "CVResult": ".rank",
    "transfer_check": ".negative",
    "compare_to_baseline": ".negative",
    "pixel_baseline_features": ".negative",
    "TransferCheck": ".negative",
    "fit_drift_reference": ".drift",
    "drift_summary": ".drift",
    "save_drift_reference": ".drift",
    "load_drift_reference": ".drift",
    "DriftReference": ".drift",
    "DriftScores": ".drift",
    "DriftSummary": ".drift",
    "DRIFT_ARRAYS": ".drift",
    "group_accuracy": ".groups",
    "GroupReport": ".groups",
    "kendall_tau_b": "._stats",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'edgetl.transfer' has no attribute {name!r}")
