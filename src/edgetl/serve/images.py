"""Uploaded images: checked before anything decodes them, kept as the review store needs them,
and drawn small for the operator page (with the defect heat map over them)."""

from __future__ import annotations

import base64
import io

from ..core.preprocess import OverBudget, check_cost, decode
from ..errors import DataError, EdgetlError
from .engine import MAP_RANGE
from .review import SUFFIXES


class TooLarge(EdgetlError):
    """A request body or image over the service's limits."""


def check_image(data: bytes) -> str:
    """The suffix an uploaded image is stored under; refuses what is not an image or over the
    budget before anything decodes it (the decoder's own cost check, at full resolution).

    Raises:
        DataError: not an image Pillow reads.  TooLarge: over the budget.
    """
    if not data:
        raise DataError("upload: the body is empty; send the image file's bytes")
    try:
        with decode(io.BytesIO(data), "upload", load=False) as im:
            check_cost(im, "upload")
            fmt = im.format
    except OverBudget as exc:
        raise TooLarge(str(exc)) from None
    except DataError:
        raise DataError("upload: not an image file Pillow can read (send PNG, JPEG, BMP, TIFF or WebP bytes)") from None
    return SUFFIXES.get(fmt, "")


def stored_form(data: bytes, suffix: str) -> tuple[bytes, str]:
    """An image as the review store keeps it: its own bytes, or, for a format the dataset readers
    do not list (GIF, MPO ...), the RGB image edgetl decoded from it as PNG (the same pixels, so an
    update sees what the prediction saw)."""
    if suffix:
        return data, suffix
    from ..core.preprocess import load_rgb

    out = io.BytesIO()
    load_rgb(io.BytesIO(data), "upload").save(out, "PNG")
    return out.getvalue(), ".png"


def make_thumb(data: bytes, pre, map_u8=None, size: int = 192) -> bytes:
    """A small JPEG of an image as the model saw it; for defects with the heat map over it."""
    from ..core.preprocess import load_rgb, resize_crop

    rgb = load_rgb(io.BytesIO(data), "upload", cfg=pre, need=size if map_u8 is None else None)
    if map_u8 is not None:
        from ..tasks.anomaly.render import overlay

        seen = resize_crop(rgb, pre)
        rgb = overlay(seen, map_u8.astype("float32") / 255.0 * MAP_RANGE) if seen.size == map_u8.shape[::-1] else seen
    rgb.thumbnail((size, size))
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=82)
    return out.getvalue()


def heatmap_png(data: bytes, pre, map_u8) -> str:
    from ..core.preprocess import load_rgb, resize_crop
    from ..tasks.anomaly.render import overlay

    seen = resize_crop(load_rgb(io.BytesIO(data), "upload", cfg=pre), pre)
    out = io.BytesIO()
    overlay(seen, map_u8.astype("float32") / 255.0 * MAP_RANGE).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
