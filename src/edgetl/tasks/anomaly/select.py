"""Choosing patch, image or combined scoring on labelled anomalies, without switching on noise.

The combined score is the default. Another candidate replaces it only when it is shown better:
the DeLong interval of its AUROC minus the default's, on the same labelled images, lies above
zero. Two alternatives are tried, so each interval is two-sided at 1 - 0.05 / 2 (Bonferroni:
at most a 5 % chance of any switch when none is better). The choice is made on the same images
the figures are reported on, which flatters the one chosen slightly; the intervals say by how
much it could be off.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np

from ...core.gate import delong

DEFAULT = "combined"
LEVEL = 0.05


def choose(y: np.ndarray, candidates: dict[str, np.ndarray], *, default: str = DEFAULT, level: float = LEVEL) -> dict:
    """The candidate to use and the evidence: per alternative its AUROC, the difference to the
    default's and its interval; ``chosen`` stays ``default`` unless an interval excludes zero.

    ``candidates``: name -> scores on the labelled images (``y`` True = anomalous).
    """
    y = np.asarray(y, bool)
    alts = [k for k in candidates if k != default]
    z = NormalDist().inv_cdf(1 - level / max(len(alts), 1) / 2)  # two-sided at the Bonferroni level
    out: dict[str, Any] = {
        "default": default,
        "chosen": default,
        "confidence": round(1 - level / max(len(alts), 1), 4),
        "rule": "switch only when the AUROC difference's interval excludes zero",
        "candidates": {},
    }
    if not (y.any() and (~y).any()):
        out["reason"] = "no labelled anomalies: the default"
        return out
    best = 0.0
    for name in alts:
        a_def, a_alt, var = delong(y, candidates[default], candidates[name])
        diff, half = a_alt - a_def, z * math.sqrt(var)
        out["candidates"][name] = {
            "auroc": round(a_alt, 4),
            "diff": round(diff, 4),
            "interval": [round(diff - half, 4), round(diff + half, 4)],
        }
        out["default_auroc"] = round(a_def, 4)
        if diff - half > 0 and diff > best:
            best, out["chosen"] = diff, name
    out["reason"] = (
        "kept the default: no alternative is shown better"
        if out["chosen"] == default
        else f"{out['chosen']} is better than {default} beyond noise"
    )
    return out
