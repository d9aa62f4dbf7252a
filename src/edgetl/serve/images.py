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


# The longest side of a tiled bundle's heat map as the service sends it: the frame at its own
# resolution up to this (a 12 MP frame as a PNG data URL would be tens of megabytes), the aspect
# ratio kept.
MAX_SIDE = 1280


def _view(data: bytes, pre, map_u8, frame: bool, max_side: int):
    from ..tasks.anomaly.render import overlay_view

    norm = map_u8.astype("float32") / 255.0 * MAP_RANGE
    return overlay_view(io.BytesIO(data), norm, pre, frame=frame, max_side=max_side, name="upload")


def make_thumb(data: bytes, pre, map_u8=None, size: int = 192, *, frame: bool = False) -> bytes:
    """A small JPEG of an image as the model saw it; for defects with the heat map over it (with
    ``frame``, a tiled bundle's, over the whole frame, its aspect ratio kept)."""
    if map_u8 is None:
        from ..core.preprocess import load_rgb

        rgb = load_rgb(io.BytesIO(data), "upload", cfg=pre, need=size)
    else:
        rgb = _view(data, pre, map_u8, frame, 4 * size)
    rgb.thumbnail((size, size))
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=82)
    return out.getvalue()


def heatmap_bytes(data: bytes, pre, map_u8, *, frame: bool = False) -> bytes:
    """The heat map over the image as PNG bytes: over the model's input view, or with ``frame``
    (a tiled bundle) over the whole frame at its resolution (at most :data:`MAX_SIDE`)."""
    out = io.BytesIO()
    _view(data, pre, map_u8, frame, MAX_SIDE).save(out, "PNG")
    return out.getvalue()


def heatmap_png(data: bytes, pre, map_u8, *, frame: bool = False) -> str:
    """:func:`heatmap_bytes` as a PNG data URL."""
    return "data:image/png;base64," + base64.b64encode(heatmap_bytes(data, pre, map_u8, frame=frame)).decode()
