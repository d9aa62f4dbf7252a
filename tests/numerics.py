"""Comparisons that hold on every CPU: floats computed by two correct routes (a merge and a central
fit, another BLAS kernel) agree to a tolerance set by the computation, not to the last digit."""

from __future__ import annotations

import numpy as np


def assert_same_decisions(pred, ref_logits, *, rel: float = 1e-4) -> None:
    """Predictions ``pred`` are the argmax of the reference logits wherever the reference's top two
    are further apart than ``rel`` of its logit scale. Closer than that, two routes' rounding (about
    1e-6 relative in float32, more after a sum over devices) may order them either way: such near-
    ties are allowed, but must be rare (at most 1 % of the items), or the check would say little."""
    ref = np.asarray(ref_logits, np.float64)
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > rel * max(float(np.abs(ref).max()), 1e-30)
    assert clear.mean() >= 0.99, f"{int((~clear).sum())} of {len(ref)} near-ties"
    a, b = np.asarray(pred)[clear], np.argmax(ref, axis=1)[clear]
    assert np.array_equal(a, b), f"{int((a != b).sum())} clear decisions differ"
