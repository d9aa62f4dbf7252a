"""Heat-map overlays of anomaly maps (numpy + Pillow: written on the device by ``predict --heatmaps``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ...core.heatmap import blend
from ...core.preprocess import PreprocessConfig, load_rgb, resize_crop


def overlay(image: Image.Image, norm_map: np.ndarray) -> Image.Image:
    """The normalised map (1.0 = threshold) over an image of the same size, in the one colouring
    (:mod:`edgetl.core.heatmap`)."""
    return Image.fromarray(np.round(blend(np.asarray(image.convert("RGB")), norm_map)).astype(np.uint8), "RGB")


def overlay_view(
    source, norm_map: np.ndarray, pre: PreprocessConfig, *, frame: bool = False, max_side: int | None = None, name=None
) -> Image.Image:
    """The image as the model saw it with the map on top: its input view (the resized, cropped
    square), or with ``frame`` (a tiled bundle) the whole frame (its region of interest) at its own
    resolution, at most ``max_side`` px on its longer side, the map enlarged to it. ``source`` is a
    file or an open binary stream (an upload, named ``name`` in messages)."""
    if frame:
        seen = load_rgb(source, name, cfg=pre, need=0)
        if max_side and max(seen.size) > max_side:  # keeps the aspect ratio
            seen.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    else:
        seen = resize_crop(load_rgb(source, name, cfg=pre), pre)
    if norm_map.shape[::-1] != seen.size:  # bilinear, in float: the map keeps its values
        norm_map = np.asarray(
            Image.fromarray(np.asarray(norm_map, np.float32), "F").resize(seen.size, Image.Resampling.BILINEAR)
        )
    return overlay(seen, norm_map)


def save_overlay(
    path: Path,
    norm_map: np.ndarray,
    out_dir: Path,
    pre: PreprocessConfig,
    taken: set[str] | None = None,
    *,
    frame: bool = False,
) -> Path:
    """Write ``<out_dir>/<stem>_heatmap.png``: :func:`overlay_view` of the image (with ``frame``,
    a tiled bundle's, the whole frame at its own resolution).

    ``taken`` holds the names already written in this run: a second input with the same stem (from
    another folder) gets ``<stem>_1_heatmap.png``; a file left by an earlier run is overwritten.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    taken = set() if taken is None else taken
    name, k = f"{Path(path).stem}_heatmap.png", 1
    while name in taken:
        name, k = f"{Path(path).stem}_{k}_heatmap.png", k + 1
    taken.add(name)
    overlay_view(path, norm_map, pre, frame=frame).save(out_dir / name)
    return out_dir / name
