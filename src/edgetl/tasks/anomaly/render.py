"""Heat-map overlays of anomaly maps (numpy + Pillow: written on the device by ``predict --heatmaps``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ...core.preprocess import PreprocessConfig, load_rgb, resize_crop

_JET = np.array([[0, 0, 0.5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0.5, 0, 0]], np.float32)


def colormap(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> (..., 3) uint8 RGB along a jet-like ramp (blue = low, red = high)."""
    v = np.clip(np.asarray(v, np.float32), 0, 1) * (len(_JET) - 1)
    i = np.minimum(v.astype(np.int64), len(_JET) - 2)
    w = (v - i)[..., None]
    return np.round(255 * ((1 - w) * _JET[i] + w * _JET[i + 1])).astype(np.uint8)


def overlay(image: Image.Image, norm_map: np.ndarray, *, vmax: float = 1.5) -> Image.Image:
    """Blend a normalised map (1.0 = threshold) over an image of the same size: colour shows the
    score (red from the threshold up), opacity grows with it, so good areas stay readable."""
    v = np.clip(norm_map / vmax, 0, 1)
    heat = colormap(v).astype(np.float32)
    alpha = (0.25 + 0.5 * v)[..., None]
    base = np.asarray(image.convert("RGB"), np.float32)
    return Image.fromarray(np.round((1 - alpha) * base + alpha * heat).astype(np.uint8), "RGB")


def save_overlay(
    path: Path,
    norm_map: np.ndarray,
    out_dir: Path,
    pre: PreprocessConfig,
    taken: set[str] | None = None,
    *,
    frame: bool = False,
) -> Path:
    """Write ``<out_dir>/<stem>_heatmap.png``: the image as the model saw it, with the map on top;
    with ``frame`` (a tiled bundle) the whole frame at its own resolution, the map enlarged to it.

    ``taken`` holds the names already written in this run: a second input with the same stem (from
    another folder) gets ``<stem>_1_heatmap.png``; a file left by an earlier run is overwritten.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    seen = load_rgb(path, cfg=pre, need=0) if frame else resize_crop(load_rgb(path, cfg=pre), pre)
    if norm_map.shape[::-1] != seen.size:  # bilinear, in float: the map keeps its values
        norm_map = np.asarray(
            Image.fromarray(np.asarray(norm_map, np.float32), "F").resize(seen.size, Image.Resampling.BILINEAR)
        )
    taken = set() if taken is None else taken
    name, k = f"{Path(path).stem}_heatmap.png", 1
    while name in taken:
        name, k = f"{Path(path).stem}_{k}_heatmap.png", k + 1
    taken.add(name)
    overlay(seen, norm_map).save(out_dir / name)
    return out_dir / name
