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
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import ConfigError, DataError, require

_INTERPOLATION = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

# Transparent pixels are composited onto mid-grey: deterministic, and close to the 0.5 mean most
# backbones normalise with, so a cut-out product photo does not gain a black or white halo.
_ALPHA_BACKGROUND = (128, 128, 128)


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes the backbone's input tensor. Travels with the weights and the bundle."""

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.interpolation not in _INTERPOLATION:
            raise ValueError(
                f"interpolation {self.interpolation!r} is not one of {sorted(_INTERPOLATION)}"
            )
        # Bounds that keep a hostile or mistyped manifest from allocating gigabytes or dividing by 0.
        if not (8 <= self.input_size <= 4096 and 0.0 < self.crop_pct <= 1.0 and len(self.mean) == 3
                and len(self.std) == 3 and all(s > 0 for s in self.std)):
            raise ValueError(f"preprocessing out of range: input_size {self.input_size} (8..4096), crop_pct "
                             f"{self.crop_pct} (0..1], std {self.std} (> 0)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        return cls(
            input_size=int(d["input_size"]),
            crop_pct=float(d["crop_pct"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
        )

    def digest(self) -> str:
        """A short stable hash: part of every feature-cache key."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


DEFAULT_MAX_MEGAPIXELS = 64.0


def max_pixels() -> int:
    """The pixel budget per image: ``EDGETL_MAX_MEGAPIXELS`` (default 64, i.e. 8000 x 8000). A
    12000 x 12000 PNG of 420 KB decodes to 430 MB of RGB and needed 1.2 GB of memory; such an
    image is refused before it is decoded."""
    from .environment import env_number

    mp = env_number("EDGETL_MAX_MEGAPIXELS", DEFAULT_MAX_MEGAPIXELS, lo=0.01, hi=1e6)  # nan / inf refused
    return int(mp * 1_000_000)


def _reason(exc: Exception) -> str:
    """Pillow's message without the in-memory file object it names (``<_io.BytesIO ...>``)."""
    text = str(exc)
    if "cannot identify image file" in text:
        return "not an image file Pillow can read"
    return text.split(" <_io.")[0]


def decode(source, name: str | Path, *, load: bool = True) -> Image.Image:
    """Open ``source`` (a path or a binary file object) as an image within the pixel budget, fully
    decoded (``load``) so a truncated file fails here. The caller closes it.

    Raises:
        DataError: unreadable, truncated, not an image, or over the pixel budget.
    """
    budget = max_pixels()
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns on stderr at 89 MP; edgetl's budget decides, in one line.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source)
            w, h = im.size
            if w * h > budget:
                im.close()
                raise DataError(f"{name}: {w} x {h} = {w * h / 1e6:.1f} megapixels is over the pixel budget of "
                                f"{budget / 1e6:g}; downscale it or raise EDGETL_MAX_MEGAPIXELS")
            if load:
                im.load()
        return im
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except MemoryError:
        raise DataError(f"{name}: not enough memory to decode this image; downscale it or lower "
                        "EDGETL_MAX_MEGAPIXELS") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{name}: not a readable image ({_reason(exc)})") from None


def load_rgb(path, name: str | Path | None = None) -> Image.Image:
    """Decode any image file Pillow reads into an 8-bit RGB image, upright. ``path`` may also be an
    open binary stream (an upload), named ``name`` in messages.

    Handles EXIF orientation, grayscale, palette, RGBA/LA (composited on grey), CMYK, and 16-bit
    or float single-channel images (rescaled to 8 bits rather than clipped).

    Raises:
        DataError: the file is missing, truncated, not an image or over the pixel budget.
    """
    source = Path(path) if isinstance(path, (str, Path)) else path
    name = name if name is not None else source
    with decode(source, name) as im:
        try:
            return to_rgb(ImageOps.exif_transpose(im))
        except MemoryError:
            raise DataError(f"{name}: not enough memory to convert this image") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a decoded Pillow image of any mode to 8-bit RGB."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if im.mode == "I" and arr.max() <= 255:
            top = 255.0
        if im.mode == "F" and arr.max() <= 1.0:
            top = 1.0
        arr8 = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
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


def resize_crop(im: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """Resize the shorter side to ``floor(size / crop_pct)`` and take the centre ``size`` crop.

    Integer rounding follows torchvision (``int`` for the long side, ``round`` for crop offsets), so
    the pixels equal timm's evaluation transform exactly.
    """
    size = cfg.input_size
    scale = math.floor(size / cfg.crop_pct)
    w, h = im.size
    if w <= h:
        new_w, new_h = scale, int(scale * h / w)
    else:
        new_w, new_h = int(scale * w / h), scale
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), _INTERPOLATION[cfg.interpolation])
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
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
    """Image file -> the backbone's (3, size, size) float32 input."""
    return preprocess_image(load_rgb(path), cfg)


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
