"""Inputs to model inputs, shared by ``fit`` and the device runtime: images (numpy + Pillow) and
texts (the ``tokenizers`` library).

The numbers a head is trained on must be the numbers the device computes, so there is exactly one
implementation, and it has no torch in it. It reproduces timm's evaluation transform for the
backbone's pretrained config (resize the shorter side to ``size / crop_pct``, centre crop, scale to
[0, 1], normalise); ``tests/parity/test_preprocess.py`` checks it against timm's own transform.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import ConfigError, DataError, require
from .compat import tomllib

# The one table of preprocessing bounds: PreprocessConfig here and the manifest check (core.manifest) both use it.
INPUT_SIZE_RANGE = (8, 4096)
# How many times the input's pixels an image may be resized to before its centre crop; crop_pct
# >= 1 / sqrt(4) = 0.5 (timm's pretrained configs use 0.75 .. 1.0).
MAX_RESIZE_FACTOR = 4.0
MIN_CROP_PCT = 1.0 / math.sqrt(MAX_RESIZE_FACTOR)
# Normalisation on the 0..1 pixel scale: a mean outside [-1, 2] or a std outside [1e-3, 10] is
# not a statistic of pixels (ImageNet's and CLIP's are near 0.45 and 0.25).
MEAN_RANGE = (-1.0, 2.0)
STD_RANGE = (1e-3, 10.0)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
_INTERPOLATION = {name: getattr(Image.Resampling, name.upper()) for name in INTERPOLATIONS}

# Transparent pixels are composited onto mid-grey: deterministic, and close to the 0.5 mean most
# backbones normalise with, so a cut-out product photo does not gain a black or white halo.
_ALPHA_BACKGROUND = (128, 128, 128)


# The largest pixel coordinate a region of interest may name (far above any camera's frame).
_MAX_ROI_PIXELS = 1_000_000


def _triple(values) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


@dataclass(frozen=True)
class Roi:
    """A region of interest: the part of every frame the model looks at, in the upright frame.

    ``unit`` is ``"px"`` (integer pixels) or ``"fraction"`` (of the frame's width / height), so a
    region can follow a camera whose resolution changes. Stored in the bundle's preprocessing and
    cut out by :func:`load_rgb` before anything else, in fit and on the device alike.

    Example:
        >>> Roi.parse("100,50,800,600").to_dict()
        {'x': 100, 'y': 50, 'w': 800, 'h': 600, 'unit': 'px'}
        >>> Roi.parse("0.25,0,0.5,1").unit
        'fraction'
    """

    x: float
    y: float
    w: float
    h: float
    unit: str = "px"

    def __post_init__(self) -> None:
        vals = (self.x, self.y, self.w, self.h)
        if self.unit not in ("px", "fraction"):
            raise ValueError(f"region of interest: unit {self.unit!r} is not 'px' or 'fraction'")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals):
            raise ValueError(f"region of interest {vals}: expected four finite numbers x, y, w, h")
        if min(self.x, self.y) < 0 or min(self.w, self.h) <= 0:
            raise ValueError(f"region of interest {vals}: x and y must be >= 0, w and h > 0")
        if self.unit == "fraction" and (self.x + self.w > 1 + 1e-9 or self.y + self.h > 1 + 1e-9):
            raise ValueError(f"region of interest {vals}: as fractions, x + w and y + h must be at most 1")
        if self.unit == "px" and (
            not all(float(v).is_integer() for v in vals) or max(self.x + self.w, self.y + self.h) > _MAX_ROI_PIXELS
        ):
            raise ValueError(
                f"region of interest {vals}: pixel coordinates must be whole numbers up to {_MAX_ROI_PIXELS}"
            )

    @classmethod
    def parse(cls, text: str) -> Roi:
        """``"x,y,w,h"``: whole pixels, or fractions of the frame when all four are at most 1.

        Raises:
            ConfigError: not four numbers, or outside the frame's bounds.
        """
        try:
            vals = [float(v) for v in str(text).replace(" ", "").split(",")]
            if len(vals) != 4:
                raise ValueError("expected four numbers")
            x, y, w, h = vals
            if all(v <= 1 for v in vals):
                return cls(x, y, w, h, unit="fraction")
            x, y, w, h = (int(v) if v.is_integer() else v for v in vals)
            return cls(x, y, w, h, unit="px")
        except ValueError as exc:
            raise ConfigError(
                f"--roi {text!r}: {exc}; give x,y,w,h in pixels (100,50,800,600) or as "
                "fractions of the frame (0.1,0.05,0.8,0.9)"
            ) from None

    @classmethod
    def load(cls, text: str) -> Roi:
        """``--roi``'s value: ``"x,y,w,h"`` (see :meth:`parse`), or a camera file (``.toml`` or
        ``.json``) whose ``roi`` table holds ``x``, ``y``, ``w``, ``h`` and optionally ``unit``
        (``"px"``, the default, or ``"fraction"``): the line's camera set-up kept beside the camera,
        so every fit of that station cuts the same region.

        Raises:
            ConfigError: an unreadable file, no ``roi`` table, or a region that is not valid.
        """
        path = Path(text)
        if path.suffix.lower() not in (".toml", ".json"):
            return cls.parse(text)
        try:
            raw = path.read_bytes()
            doc = tomllib.loads(raw.decode("utf-8")) if path.suffix.lower() == ".toml" else json.loads(raw)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"--roi {path}: cannot read the camera file ({exc}); give a TOML or JSON file") from None
        table = doc.get("roi") if isinstance(doc, dict) else None
        if not isinstance(table, dict) or not {"x", "y", "w", "h"} <= set(table):
            raise ConfigError(
                f'--roi {path}: expected a \'roi\' table with x, y, w, h (and optionally unit = "px" or "fraction")'
            )
        try:
            return cls(table["x"], table["y"], table["w"], table["h"], unit=str(table.get("unit", "px")))
        except ValueError as exc:
            raise ConfigError(f"--roi {path}: {exc}") from None

    def to_dict(self) -> dict:
        return {"x": self.x, "y": self.y, "w": self.w, "h": self.h, "unit": self.unit}

    @classmethod
    def from_dict(cls, d: dict) -> Roi:
        return cls(d["x"], d["y"], d["w"], d["h"], unit=d.get("unit", "px"))

    def __str__(self) -> str:
        if self.unit == "fraction":
            return f"{self.x:g},{self.y:g},{self.w:g},{self.h:g} (fractions of the frame)"
        return f"{self.x:g},{self.y:g},{self.w:g},{self.h:g} (pixels)"

    def box(self, width: int, height: int, name) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in pixels of a ``width`` x ``height`` frame.

        Raises:
            DataError: the frame does not contain the region (naming the file ``name``).
        """
        if self.unit == "fraction":
            left, top = round(self.x * width), round(self.y * height)
            right, bottom = round((self.x + self.w) * width), round((self.y + self.h) * height)
            if right - left >= 1 and bottom - top >= 1:
                return left, top, right, bottom
        else:
            left, top, right, bottom = int(self.x), int(self.y), int(self.x + self.w), int(self.y + self.h)
            if right <= width and bottom <= height:
                return left, top, right, bottom
        raise DataError(
            f"{name}: the {width} x {height} frame does not contain the region of interest {self} "
            "the bundle was fitted with; send frames from the same camera, or fit again with another --roi"
        )


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes the backbone's input tensor. Travels with the weights and the bundle."""

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    roi: Roi | None = None

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {sorted(_INTERPOLATION)}")
        # The manifest check's bounds: they keep a hostile or mistyped manifest from allocating
        # gigabytes or dividing by 0, and a config made in code from what no manifest may hold.
        lo, hi = INPUT_SIZE_RANGE
        if not (
            lo <= self.input_size <= hi
            and MIN_CROP_PCT <= self.crop_pct <= 1.0
            and len(self.mean) == 3
            and len(self.std) == 3
            and all(MEAN_RANGE[0] <= m <= MEAN_RANGE[1] for m in self.mean)
            and all(STD_RANGE[0] <= s <= STD_RANGE[1] for s in self.std)
        ):
            raise ValueError(
                f"preprocessing out of range: input_size {self.input_size} ({lo}..{hi}), crop_pct "
                f"{self.crop_pct} ({MIN_CROP_PCT:g}..1), mean {self.mean} (each {MEAN_RANGE[0]:g}..{MEAN_RANGE[1]:g}), "
                f"std {self.std} (each {STD_RANGE[0]:g}..{STD_RANGE[1]:g})"
            )

    def to_dict(self) -> dict:
        # No "roi" key without a region: the digest (a cache key) of every other config is unchanged.
        d = {k: v for k, v in asdict(self).items() if k != "roi"}
        if self.roi is not None:
            d["roi"] = self.roi.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        roi = d.get("roi")
        return cls(
            input_size=int(d["input_size"]),
            crop_pct=float(d["crop_pct"]),
            interpolation=str(d["interpolation"]),
            mean=_triple(d["mean"]),
            std=_triple(d["std"]),
            roi=Roi.from_dict(roi) if roi is not None else None,
        )

    def digest(self) -> str:
        """A short stable hash: part of every feature-cache key."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


DEFAULT_MAX_MEGAPIXELS = 64.0

# Bytes of memory one pixel of the budget stands for: Pillow keeps an RGB pixel in 4 bytes, and
# an image kept at full size may need an upright copy and an RGB conversion (4 + 4 + 4), so an RGB
# image at the pixel budget passes however it is decoded.
_BUDGET_BYTES_PER_PIXEL = 12


class OverBudget(DataError):
    """An image whose decode would take more memory than the pixel budget allows."""


def max_pixels() -> int:
    """The pixel budget per image: ``EDGETL_MAX_MEGAPIXELS`` (default 64, i.e. 8000 x 8000 RGB). A
    12000 x 12000 PNG of 420 KB decodes to 430 MB of RGB and needed 1.2 GB of memory; such an
    image is refused before it is decoded."""
    from .environment import env_number

    mp = env_number("EDGETL_MAX_MEGAPIXELS", DEFAULT_MAX_MEGAPIXELS, lo=0.01, hi=1e6)  # nan / inf refused
    return int(mp * 1_000_000)


def budget_bytes() -> int:
    """The memory one image's decode may take: the pixel budget's RGB pixels, decoded, turned
    upright and converted. Besides its source pixels, an image is charged for its bytes per pixel and the copies
    its conversion makes (:func:`decode_cost`)."""
    return max_pixels() * _BUDGET_BYTES_PER_PIXEL


def _stored_bytes(mode: str) -> int:
    """Bytes per pixel Pillow keeps for ``mode`` (multi-band images take 4 bytes a pixel)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


def _work_bytes(mode: str) -> int:
    """Bytes per pixel of the copies :func:`to_rgb` and the orientation fix make of an image in ``mode``."""
    if mode in ("I", "F") or mode.startswith("I;16"):
        return 4 + 1 + 4  # float32 rescale, 8-bit result, RGB
    if mode in ("RGBA", "LA", "PA", "RGBa", "La", "P"):
        return 4 * 3  # RGBA, the grey background, the composite
    return 4 + _stored_bytes(mode)  # an upright copy, the RGB conversion


def decode_cost(im: Image.Image, reduce_by: int = 1) -> int:
    """Peak bytes of decoding ``im`` (as opened: a JPEG at its draft scale) and bringing it to RGB,
    reduced by ``reduce_by``: what the budget counts, so a 16-bit or float image is charged for its
    bytes per pixel and a JPEG decoded at 1/8 scale for what it really decodes."""
    w, h = im.size
    px = w * h
    cost = px * _stored_bytes(im.mode)
    if reduce_by >= 2 and (im.mode.startswith("I;16") or im.mode not in _REDUCIBLE):
        cost += px * 4  # widened to 32-bit integers, or converted to RGB, before the box filter
    out = math.ceil(w / reduce_by) * math.ceil(h / reduce_by)
    return cost + out * _work_bytes(im.mode)


def check_cost(im: Image.Image, name, reduce_by: int = 1) -> int:
    """The decode's cost in bytes, within the budget.

    Raises:
        OverBudget: over :func:`budget_bytes`.
    """
    cost, budget = decode_cost(im, reduce_by), budget_bytes()
    if cost > budget:
        w, h = im.size
        raise OverBudget(
            f"{name}: {w} x {h} {im.mode} image would take {cost / 1e6:.0f} MB to decode, over the pixel "
            f"budget's {budget / 1e6:.0f} MB ({max_pixels() / 1e6:g} megapixels of RGB); downscale it or "
            "raise EDGETL_MAX_MEGAPIXELS"
        )
    return cost


class _MemoryGate:
    """Decodes running at once hold at most one budget of memory between them (beyond one at a
    time): the threads decoding ahead of the model never multiply the peak of a large image."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._used = 0

    @contextmanager
    def hold(self, cost: int):
        limit = budget_bytes()
        with self._cond:
            while self._used and self._used + cost > limit:
                self._cond.wait()
            self._used += cost
        try:
            yield
        finally:
            with self._cond:
                self._used -= cost
                self._cond.notify_all()


_GATE = _MemoryGate()


def _reason(exc: Exception) -> str:
    """Pillow's message without the in-memory file object it names (``<_io.BytesIO ...>``)."""
    text = str(exc)
    if "cannot identify image file" in text:
        return "not an image file Pillow can read"
    return text.split(" <_io.")[0]


def decode(source, name: str | Path, *, load: bool = True) -> Image.Image:
    """Open ``source`` (a path or a binary file object) as an image within the pixel budget. With
    ``load``, its decode's memory is checked too (:func:`check_cost`) and it is decoded so a
    truncated file fails here (a JPEG at 1/8 scale: its whole
    entropy-coded stream is still read); without, the caller sizes, checks and decodes it (as
    :func:`load_rgb` does). The caller closes it.

    Raises:
        DataError: unreadable, truncated, not an image.  OverBudget: over the budget.
    """
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns on stderr at 89 MP; edgetl's budget decides, in one line.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source)
        w, h = im.size
        budget = max_pixels()
        if w * h > budget:  # decoding time grows with the source's pixels, whatever is kept of them
            im.close()
            raise OverBudget(
                f"{name}: {w} x {h} = {w * h / 1e6:.1f} megapixels is over the pixel budget of "
                f"{budget / 1e6:g}; downscale it or raise EDGETL_MAX_MEGAPIXELS"
            )
        if load:
            try:
                if im.format == "JPEG":
                    im.draft(im.mode, (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
                with _GATE.hold(check_cost(im, name)):
                    im.load()
            except BaseException:
                im.close()
                raise
        return im
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except MemoryError:
        raise DataError(
            f"{name}: not enough memory to decode this image; downscale it or lower EDGETL_MAX_MEGAPIXELS"
        ) from None
    except Image.DecompressionBombError as exc:
        raise OverBudget(f"{name}: over Pillow's decompression-bomb limit ({_reason(exc)}); downscale it") from None
    except (OSError, ValueError, SyntaxError, OverflowError) as exc:
        raise DataError(f"{name}: not a readable image ({_reason(exc)})") from None


# Bumped whenever the decoder's numbers change (reductions, ROI cropping): part of every feature
# cache key, so vectors computed by an older decode are never served for a newer one.
DECODE_VERSION = 2

# JPEG's DCT-domain scalings that libjpeg offers through Pillow's ``draft``.
_JPEG_SCALES = (8, 4, 2)

# The box reduction keeps at least this many times the needed short side (see _decode_sized).
_BOX_GAP = 2
# Modes Pillow's ``Image.reduce`` (an integer box filter) works on directly; 16-bit images are
# widened to 32-bit integers first (still 4 bytes a pixel, half the float64 the 8-bit rescale used).
_REDUCIBLE = ("L", "RGB", "RGBA", "LA", "I", "F", "CMYK", "RGBX", "RGBa", "La", "YCbCr")


def resize_side(cfg: PreprocessConfig) -> int:
    """The short side an image (or its region of interest) is resized to before the centre crop."""
    return math.floor(cfg.input_size / cfg.crop_pct)


def load_rgb(
    path, name: str | Path | None = None, *, cfg: PreprocessConfig | None = None, need: int | None = None
) -> Image.Image:
    """Decode an image file into an 8-bit RGB image, upright: the one decoder every job uses
    (fit, eval, predict, adapt, drift, report, serve). ``path`` may also be an open binary stream
    (an upload), named ``name`` in messages.

    Sized for the model: when ``need`` (or ``cfg``) says how many pixels the caller resizes the
    short side to, the image is decoded no larger than it has to be. A JPEG is decoded in the DCT
    domain at 1/2, 1/4 or 1/8 scale (``Image.draft``) to the smallest that still covers ``need``;
    any format is then reduced by the largest integer box filter (``Image.reduce``) that keeps the
    short side at or above twice ``need`` (a box filter aliases where it does the last step); the final
    resample (:func:`resize_crop`) does the rest. A 5 MP JPEG costs about a tenth of a full decode.
    Whatever this returns is what the head learns on and what the device sees: fit and the device
    call this same function with the same arguments.

    Args:
        cfg: the bundle's preprocessing: its region of interest is cut out (in the upright full
            frame's coordinates) and, unless ``need`` is given, :func:`resize_side` pixels are kept.
        need: the short side, in pixels, the caller will resize the image (or region) to; ``0``
            keeps full resolution. A caller that needs more pixels (tiling a frame for small
            defects, say) asks for them here. Without ``cfg`` and ``need``: full resolution.

    Handles EXIF orientation, grayscale, palette, RGBA/LA (composited on grey), CMYK, and 16-bit
    or float single-channel images (rescaled to 8 bits rather than clipped).

    Raises:
        DataError: the file is missing, truncated, not an image, over the pixel budget, or does not
            contain the region of interest.
    """
    source = Path(path) if isinstance(path, (str, Path)) else path
    name = name if name is not None else source
    if need is None:
        need = resize_side(cfg) if cfg is not None else 0
    roi = cfg.roi if cfg is not None else None
    with decode(source, name, load=False) as im:
        try:
            return _decode_sized(im, name, int(need), roi)
        except MemoryError:
            raise DataError(f"{name}: not enough memory to convert this image") from None
        except (OSError, ValueError, SyntaxError, OverflowError) as exc:
            raise DataError(f"{name}: not a readable image ({_reason(exc)})") from None


def _upright_size(im: Image.Image) -> tuple[int, int]:
    """The frame's size once its EXIF orientation is applied (orientations 5-8 swap the sides)."""
    w, h = im.size
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a garbled EXIF block is ignored, as exif_transpose does
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _decode_sized(im: Image.Image, name, need: int, roi: Roi | None) -> Image.Image:
    full_w, full_h = _upright_size(im)
    box = roi.box(full_w, full_h, name) if roi is not None else (0, 0, full_w, full_h)
    short = min(box[2] - box[0], box[3] - box[1])
    factor = max(1, short // need) if need > 0 else 1
    if im.format == "JPEG" and factor >= 2:
        scale = next(s for s in _JPEG_SCALES + (1,) if s <= factor)
        if scale > 1:
            # Asking for (w // s, h // s) makes Pillow pick exactly scale s (it takes the largest
            # scale whose ceil-divided size still covers the request).
            im.draft(im.mode, (im.size[0] // scale, im.size[1] // scale))
    w, h = _upright_size(im)  # as it will decode (a drafted JPEG's size is already the scaled one)
    # A box filter alone aliases (measured on a 5 MP PNG: mean error 0.03 against a full decode when
    # reduced to just above the need, 0.002 when twice the need is kept); libjpeg's scaled inverse
    # DCT does not (0.003 at just above the need), so the JPEG scale may go down to the need itself.
    rest = max(1, min(box[2] - box[0], box[3] - box[1]) * w // full_w // (_BOX_GAP * need)) if need > 0 else 1
    with _GATE.hold(check_cost(im, name, rest)):
        return _reduce_convert(im, rest, full_w, full_h, box if roi is not None else None)


def _reduce_convert(im: Image.Image, rest: int, full_w: int, full_h: int, box) -> Image.Image:
    im.load()
    if rest >= 2:
        if im.mode.startswith("I;16"):
            im = im.convert("I")
        elif im.mode not in _REDUCIBLE:
            im = to_rgb(im)
        im = im.reduce(rest)
    im = ImageOps.exif_transpose(im)
    w, h = im.size
    if box is not None:
        fx, fy = full_w / w, full_h / h
        im = im.crop(
            (
                round(box[0] / fx),
                round(box[1] / fy),
                max(round(box[2] / fx), round(box[0] / fx) + 1),
                max(round(box[3] / fy), round(box[1] / fy) + 1),
            )
        )
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a decoded Pillow image of any mode to 8-bit RGB."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # float32, in place: one 4-byte copy of the image, where float64 temporaries took ~4 x 8 bytes.
        arr = np.array(im, dtype=np.float32)
        peak = float(arr.max()) if arr.size else 0.0
        top = 65535.0 if im.mode.startswith("I;16") else max(peak, 1.0)
        if im.mode == "I" and peak <= 255:
            top = 255.0
        if im.mode == "F" and peak <= 1.0:
            top = 1.0
        np.divide(arr, np.float32(top), out=arr)
        np.multiply(arr, np.float32(255.0), out=arr)
        np.rint(arr, out=arr)
        np.clip(arr, 0, 255, out=arr)
        arr8 = arr.astype(np.uint8)
        del arr
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")
    return im


# Above this many times the crop's pixels (an aspect ratio beyond ~50:1 at the usual crop), the
# resize computes the crop alone (see resize_crop); below it, the full resize keeps the pixels
# identical to timm's transform, and costs at most this many crops of memory (13 MB at 224 px).
_FULL_RESIZE_LIMIT = 64


def resize_crop(im: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """Resize the shorter side to ``floor(size / crop_pct)`` and take the centre ``size`` crop.

    Integer rounding follows torchvision (``int`` for the long side, ``round`` for crop offsets), so
    the pixels equal timm's evaluation transform exactly.
    """
    size = cfg.input_size
    scale = resize_side(cfg)
    w, h = im.size
    if w <= h:
        new_w, new_h = scale, int(scale * h / w)
    else:
        new_w, new_h = int(scale * w / h), scale
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    if new_w * new_h > _FULL_RESIZE_LIMIT * size * size:
        # An extreme aspect ratio (a 1 x 10000 strip resizes to 256 x 2,560,000, 2.6 GB): resample
        # only the crop's source box. The same filter centres and support as the full resize, but
        # Pillow's vertical pass then differs by a few levels (measured: up to 9 of 255), so only
        # strips too long to resize whole take this path.
        sx, sy = w / new_w, h / new_h
        resample = _INTERPOLATION[cfg.interpolation]
        box = (left * sx, top * sy, min(w, (left + size) * sx), min(h, (top + size) * sy))
        return im.resize((size, size), resample, box=box)
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), _INTERPOLATION[cfg.interpolation])
    return im.crop((left, top, left + size, top + size))


def to_tensor(im: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """An RGB image of the right size -> normalised float32 CHW array."""
    arr = np.asarray(im, dtype=np.float32) / np.float32(255.0)
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    arr = (arr - mean) / std
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess_image(im: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """Decoded image -> the backbone's (3, size, size) float32 input."""
    return to_tensor(resize_crop(to_rgb(im), cfg), cfg)


def preprocess_file(path: str | Path, cfg: PreprocessConfig) -> np.ndarray:
    """Image file -> the backbone's (3, size, size) float32 input, decoded as :func:`load_rgb` sizes it."""
    return to_tensor(resize_crop(load_rgb(path, cfg=cfg), cfg), cfg)


# ---------------------------------------------------------------------------------------- text
# The longest token sequence a text backbone reads, unless the model allows fewer.
DEFAULT_MAX_LENGTH = 256


def load_tokenizer(path: str | Path, *, max_length: int = DEFAULT_MAX_LENGTH):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json``: truncating to ``max_length`` and padding
    each batch to its longest row (whatever padding the file was saved with).

    Raises:
        MissingDependency: ``tokenizers`` is not installed (``pip install 'edgetl[text]'``).
        ConfigError: the file is not a tokenizer.
    """
    tk = require("tokenizers", extra="text", purpose="tokenizing text")
    try:
        tok = tk.Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a plain Exception for bad files
        raise ConfigError(f"{path}: not a readable tokenizer.json ({exc})") from None
    pad = tok.padding or {}
    pad_id = pad.get("pad_id", 0)
    pad_token = pad.get("pad_token", "[PAD]")
    tok.no_padding()
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token)
    tok.no_truncation()
    tok.enable_truncation(max_length=max_length)
    return tok
