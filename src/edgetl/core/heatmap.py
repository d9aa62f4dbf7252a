"""The one colouring of defect heat maps: ``predict --heatmaps``, the service's operator page and
the report all draw with :func:`colormap` and :func:`blend` (numpy only, so a device can)."""

from __future__ import annotations

import numpy as np

# Inferno (perceptually uniform, readable with colour-vision deficiency, dark = low), sampled at
# nine evenly spaced points of matplotlib's table; linear between them stays within a few levels.
_INFERNO = (
    np.array(
        [
            [0, 0, 4],
            [33, 12, 74],
            [87, 16, 110],
            [138, 34, 106],
            [188, 55, 84],
            [228, 90, 49],
            [249, 142, 9],
            [249, 203, 53],
            [252, 255, 164],
        ],
        np.float32,
    )
    / 255.0
)

# Where a map is drawn over an image: the colour scale's top (1.0 = the threshold) and how opaque
# the heat is from the lowest to the highest value, so that good areas stay readable.
VMAX = 1.5
ALPHA_LOW, ALPHA_HIGH = 0.15, 0.75


def colormap(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> (..., 3) uint8 RGB along the inferno ramp (dark = low, yellow = high)."""
    v = np.clip(np.asarray(v, np.float32), 0, 1) * (len(_INFERNO) - 1)
    i = np.minimum(v.astype(np.int64), len(_INFERNO) - 2)
    w = (v - i)[..., None]
    return np.round(255 * ((1 - w) * _INFERNO[i] + w * _INFERNO[i + 1])).astype(np.uint8)


def blend(rgb: np.ndarray, norm_map: np.ndarray, *, vmax: float = VMAX) -> np.ndarray:
    """A normalised map (1.0 = threshold, same height and width as ``rgb``) over an RGB image:
    colour shows the score, opacity grows with it. -> float32 (H, W, 3) on the 0..255 scale."""
    v = np.clip(np.asarray(norm_map, np.float32) / vmax, 0, 1)
    alpha = (ALPHA_LOW + (ALPHA_HIGH - ALPHA_LOW) * v)[..., None]
    return (1 - alpha) * np.asarray(rgb, np.float32) + alpha * colormap(v).astype(np.float32)
