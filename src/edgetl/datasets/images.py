"""Built-in example datasets, made offline from photographs that ship inside scikit-image.

Two datasets, both deterministic for a given seed (byte-identical files):

* ``surfaces`` — classification, "which surface / material is this?": eight classes, each cut from a
  different real photograph or texture, in the ``train/<class>`` + ``val/<class>`` layout;
* ``defects`` — anomaly detection in the MVTec AD layout: good crops of one real texture for
  training; good and synthetically damaged crops (scratch, spot, crack, missing, contamination)
  with pixel masks for testing.

Honesty of the held-out split: every source region is cut in two along its longer side, and the
training crops come only from one part, the validation / test crops only from the other (with a
gap between them). Each crop's source box is recorded in ``example.json`` next to the images, with
the seed that drew its augmentation, so the disjointness can be checked and any file re-made.

scikit-image is not part of the device install, so it is imported only when a dataset is built.
Of the ``skimage.data`` images, these load offline from the wheel (checked with scikit-image 0.26;
the rest need ``pooch`` and a download): astronaut, brick, camera, cat/chelsea, cell,
checkerboard, clock, coffee, coins, colorwheel, grass, gravel, horse, hubble_deep_field,
immunohistochemistry, lfw_subset, logo, microaneurysms, moon, page, retina, rocket,
shepp_logan_phantom, stereo_motorcycle, text. Not offline: brain, cells3d, eagle, human_mitosis,
kidney, lily, nickel_solidification, palisades_of_vogt, protein_transport, skin, vortex.
Used here: brick, coins, grass, gravel, page, moon, immunohistochemistry, coffee, chelsea.

Example:
    >>> summary = make_surfaces("data/surfaces", seed=0)  # doctest: +SKIP
    >>> summary["classes"]  # doctest: +SKIP
    ['brick', 'coins', 'grass', 'gravel', 'print', 'regolith', 'tissue', 'wood']
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import ConfigError, DataError, require

MANIFEST = "example.json"  # written at the dataset's root; also marks a folder as ours for force=True
_FORMAT = 1
_PURPOSE = "building the example datasets"

# Named regions of shipped images: name -> (skimage.data function, (x0, y0, x1, y1) in pixels).
_REGIONS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "brick": ("brick", (0, 0, 512, 512)),
    "coins": ("coins", (0, 0, 384, 303)),
    "grass": ("grass", (0, 0, 512, 512)),
    "gravel": ("gravel", (0, 0, 512, 512)),
    "print": ("page", (0, 38, 384, 191)),  # body text of a scanned page, below its heading
    "regolith": ("moon", (0, 0, 512, 512)),
    "tissue": ("immunohistochemistry", (0, 0, 512, 512)),
    "wood": ("coffee", (488, 0, 600, 400)),  # the table top right of the saucer
    "fur": ("chelsea", (70, 0, 330, 85)),  # the cat's forehead (used only as a contaminant)
}

SURFACE_CLASSES = ("brick", "coins", "grass", "gravel", "print", "regolith", "tissue", "wood")
DEFECT_TEXTURES = ("brick", "gravel", "grass")
DEFECT_TYPES = ("scratch", "spot", "crack", "missing", "contamination")
_CONTAMINANTS = ("tissue", "wood", "fur", "grass", "gravel", "regolith")
_ISOTROPIC = {"gravel", "grass"}  # textures whose look survives a 90 degree turn

_TRAIN_FRACTION = 0.7  # of each source region's longer side, for the surfaces dataset
_DEFECT_TRAIN_FRACTION = 0.55
_GAP = 8  # pixels left unused between the train part and the held-out part of a region

# Augmentation profiles: the classification crops vary a lot; the anomaly crops only a little, since
# "normal" must stay narrow for a defect to stand out.
# The files behind the skimage.data functions used here (all inside the scikit-image wheel).
_FILES = {
    "brick": "brick.png",
    "coins": "coins.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "page": "page.png",
    "moon": "moon.png",
    "immunohistochemistry": "ihc.png",
    "coffee": "coffee.png",
    "chelsea": "chelsea.png",
}

_SURFACE_AUG = dict(
    angle=12.0,
    rot90=True,
    flip=True,
    brightness=(0.75, 1.25),
    contrast=(0.7, 1.3),
    saturation=(0.6, 1.3),
    tint=0.08,
    p_blur=0.3,
    blur=(0.4, 1.4),
    p_noise=0.4,
    noise=(2.0, 7.0),
)
_DEFECT_AUG = dict(
    angle=0.0,
    rot90=False,
    flip=True,
    brightness=(0.95, 1.05),
    contrast=(0.95, 1.05),
    saturation=(1.0, 1.0),
    tint=0.0,
    p_blur=0.0,
    blur=(0.0, 0.0),
    p_noise=0.0,
    noise=(0.0, 0.0),
)


# ------------------------------------------------------------------------------------ sources
@cache
def _load_image(fn: str) -> np.ndarray:
    """A shipped ``skimage.data`` image as a read-only (H, W, 3) uint8 array."""
    data = require("skimage.data", extra="train", purpose=_PURPOSE)
    shipped = Path(getattr(data, "data_dir", "")) / _FILES.get(fn, "-")
    if shipped.is_file():  # same pixels as skimage.data.<fn>(), without importing skimage.io (~1 s)
        with Image.open(shipped) as im:
            arr = np.asarray(im.convert("RGB" if im.mode not in ("L", "RGB") else im.mode))
    else:
        arr = np.asarray(getattr(data, fn)())
    if arr.dtype != np.uint8:
        raise DataError(f"skimage.data.{fn}() returned {arr.dtype}, expected uint8 (unsupported scikit-image?)")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    arr = np.ascontiguousarray(arr[:, :, :3])
    arr.setflags(write=False)
    return arr


def _region(name: str) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    fn, box = _REGIONS[name]
    return _load_image(fn), box


def split_region(box, fraction: float, gap: int = _GAP):
    """Cut ``box`` across its longer side: (first ``fraction`` for training, the rest held out)."""
    x0, y0, x1, y1 = box
    if x1 - x0 >= y1 - y0:
        cut = x0 + round((x1 - x0) * fraction)
        return (x0, y0, cut - gap // 2, y1), (cut + gap - gap // 2, y0, x1, y1)
    cut = y0 + round((y1 - y0) * fraction)
    return (x0, y0, x1, cut - gap // 2), (x0, cut + gap - gap // 2, x1, y1)


def _short_side(box) -> int:
    return min(box[2] - box[0], box[3] - box[1])


def _sample_box(rng: np.random.Generator, region, w: int) -> list[int]:
    x0, y0, x1, y1 = region
    w = max(8, min(w, x1 - x0, y1 - y0))
    x = int(rng.integers(x0, x1 - w + 1))
    y = int(rng.integers(y0, y1 - w + 1))
    return [x, y, x + w, y + w]


def boxes_overlap(a, b) -> bool:
    """Whether two (x0, y0, x1, y1) half-open boxes share any pixel."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# ------------------------------------------------------------------------------------ rendering
def _render_crop(
    src: np.ndarray, box, size: int, rng: np.random.Generator, aug: dict, *, rot90: bool | None = None
) -> tuple[np.ndarray, dict]:
    """Cut ``box`` out of ``src`` and turn it into a ``size`` x ``size`` RGB crop.

    Every pixel of the result comes from inside ``box`` (the small rotation is followed by a crop
    to the inscribed square), so crops from disjoint boxes share no source pixel.
    """
    x0, y0, x1, y1 = box
    im = Image.fromarray(np.ascontiguousarray(src[y0:y1, x0:x1]), "RGB")
    w = x1 - x0
    angle = float(rng.uniform(-aug["angle"], aug["angle"])) if aug["angle"] else 0.0
    k = int(rng.integers(0, 4)) if (aug["rot90"] if rot90 is None else rot90) else 0
    flip = bool(rng.random() < 0.5) if aug["flip"] else False
    if angle:
        im = im.rotate(angle, resample=Image.Resampling.BILINEAR)
        rad = math.radians(abs(angle))
        inner = int(w / (math.cos(rad) + math.sin(rad))) - 1  # 1 px margin: no fill colour bleeds in
        off = (w - inner) // 2
        # Crop before resizing: resize(box=...) would let the filter reach the black corners.
        im = im.crop((off, off, off + inner, off + inner))
    im = im.resize((size, size), Image.Resampling.LANCZOS)
    if k:
        im = im.transpose((Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)[k - 1])
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    blur = float(rng.uniform(*aug["blur"])) if rng.random() < aug["p_blur"] else 0.0
    if blur:
        im = im.filter(ImageFilter.GaussianBlur(blur))
    x = np.asarray(im, dtype=np.float32)
    brightness = float(rng.uniform(*aug["brightness"]))
    contrast = float(rng.uniform(*aug["contrast"]))
    saturation = float(rng.uniform(*aug["saturation"]))
    tint = rng.uniform(1.0 - aug["tint"], 1.0 + aug["tint"], size=3).astype(np.float32)
    gray = x.mean(axis=2, keepdims=True)
    x = gray + saturation * (x - gray)
    mean = float(x.mean())
    x = (mean + contrast * (x - mean)) * brightness * tint
    noise = float(rng.uniform(*aug["noise"])) if rng.random() < aug["p_noise"] else 0.0
    if noise:
        x = x + rng.normal(0.0, noise, size=x.shape).astype(np.float32)
    out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    params = {
        "angle": round(angle, 3),
        "rot90": k,
        "flip": flip,
        "blur": round(blur, 3),
        "brightness": round(brightness, 3),
        "contrast": round(contrast, 3),
        "saturation": round(saturation, 3),
        "noise": round(noise, 3),
    }
    return out, params


def _save_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Fast zlib level: noisy crops barely compress, and level 6 made saving 3/4 of the run time.
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


# ------------------------------------------------------------------------------------ output folder
@contextmanager
def _staged_output(out_dir, *, force: bool):
    """Yield a fresh folder next to ``out_dir``; on success it becomes ``out_dir`` in one rename.

    A crash (or Ctrl-C) leaves ``out_dir`` as it was and removes the partial folder. ``force``
    replaces a previous example dataset (one holding ``example.json``), never a foreign folder.
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is a file; give a folder path for the example dataset")
    old = None
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise DataError(f"{out} is not empty; choose a new folder or pass force=True (--force) to replace it")
        if not (out / MANIFEST).is_file():
            raise DataError(
                f"{out} is not empty and holds no {MANIFEST}, so it is not an example dataset; "
                "--force only replaces earlier examples, so choose a new folder or empty this one yourself"
            )
        old = out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        if old is not None:
            trash = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            if out.is_dir():
                out.rmdir()  # empty (checked above)
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_manifest(root: Path, summary: dict, items: list[dict]) -> None:
    doc = {"format": _FORMAT, **summary, "items": items}
    (root / MANIFEST).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------ surfaces
def surface_plan() -> dict:
    """Per class: (source region name, train region, val region, base window side in pixels)."""
    plan = {}
    for cls in SURFACE_CLASSES:
        fn, box = _REGIONS[cls]
        train, val = split_region(box, _TRAIN_FRACTION)
        base = min(96, int(0.9 * min(_short_side(train), _short_side(val)) / 1.5))
        plan[cls] = {
            "image": fn,
            "region": list(box),
            "train_region": list(train),
            "val_region": list(val),
            "base_window": base,
        }
    return plan


def make_surfaces(
    out_dir, *, seed: int = 0, per_class: int = 48, val_per_class: int = 16, size: int = 160, force: bool = False
) -> dict:
    """Write the "surface / material inspection" classification example.

    Layout: ``out_dir/train/<class>/<class>_NNN.png`` and ``out_dir/val/<class>/<class>_NNN.png``
    (RGB PNGs, ``size`` x ``size``) and ``out_dir/example.json`` (each crop's source box, augmentation
    and seed). Eight classes, each cut from a different shipped photograph; validation crops come
    from a part of each photograph that no training crop touches. Crops vary in position, scale
    (0.5-1.5x), rotation (90 degree turns and up to +-12 degrees), flips, brightness, contrast,
    colour, blur and noise.

    Returns:
        a small summary: name, root, classes, counts per class and split, sources, seed, size.

    Raises:
        DataError: ``out_dir`` is not empty (and not an earlier example with ``force=True``).
        ConfigError: a count or size out of range.
        MissingDependency: scikit-image is not installed.
    """
    _check_count("seed", seed, 0)
    _check_count("per_class", per_class, 1)
    _check_count("val_per_class", val_per_class, 1)
    _check_count("size", size, 16)
    plan = surface_plan()
    with _staged_output(out_dir, force=force) as tmp:
        items = []
        for ci, cls in enumerate(SURFACE_CLASSES):
            src, _ = _region(cls)
            p = plan[cls]
            for si, (split, n) in enumerate((("train", per_class), ("val", val_per_class))):
                region = p[f"{split}_region"]
                for i in range(n):
                    box_rng = np.random.default_rng([seed, ci, si, i, 0])
                    scale = float(2.0 ** box_rng.uniform(-1.0, math.log2(1.5)))
                    box = _sample_box(box_rng, region, round(p["base_window"] * scale))
                    aug_seed = [seed, ci, si, i, 1]
                    arr, params = _render_crop(src, box, size, np.random.default_rng(aug_seed), _SURFACE_AUG)
                    rel = f"{split}/{cls}/{cls}_{i:03d}.png"
                    _save_png(arr, tmp / rel)
                    items.append(
                        {
                            "file": rel,
                            "split": split,
                            "label": cls,
                            "region": cls,
                            "box": box,
                            "aug_seed": aug_seed,
                            "aug": params,
                        }
                    )
        summary = {
            "name": "surfaces",
            "task": "classification",
            "classes": list(SURFACE_CLASSES),
            "counts": {c: {"train": per_class, "val": val_per_class} for c in SURFACE_CLASSES},
            "sources": {c: {k: v for k, v in plan[c].items() if k != "base_window"} for c in SURFACE_CLASSES},
            "seed": seed,
            "size": size,
        }
        _write_manifest(tmp, {**summary, "profile": "surfaces"}, items)
    return {**summary, "root": str(Path(out_dir)), "manifest": str(Path(out_dir) / MANIFEST)}


# ------------------------------------------------------------------------------------ defects
def _supersampled_strokes(size: int, strokes, ss: int = 4) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of polylines [(points (N, 2) in pixels, width in pixels)]."""
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    for pts, width in strokes:
        xy = [(float(x) * ss, float(y) * ss) for x, y in pts]
        wpx = max(1, int(round(width * ss)))
        draw.line(xy, fill=255, width=wpx, joint="curve")
        r = wpx / 2.0
        for x, y in (xy[0], xy[-1]):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _blob(size: int, rng: np.random.Generator, area: float, roughness: float, nd) -> tuple[np.ndarray, tuple]:
    """An irregular filled blob of about ``area`` (fraction of the image): a random ellipse whose
    outline is pushed in and out by smooth noise. Returns (0/1 float mask, centre)."""
    mean_r = size * math.sqrt(area / math.pi)
    ratio = float(rng.uniform(0.55, 1.0))
    ax, ay = mean_r / math.sqrt(ratio), mean_r * math.sqrt(ratio)
    theta = float(rng.uniform(0, math.pi))
    margin = min(max(ax, ay) + 2, size / 2)
    cx, cy = (float(v) for v in rng.uniform(margin, size - margin, size=2))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c, s = math.cos(theta), math.sin(theta)
    u = ((xx - cx) * c + (yy - cy) * s) / ax
    v = (-(xx - cx) * s + (yy - cy) * c) / ay
    dist = np.sqrt(u * u + v * v)
    field = nd.gaussian_filter(rng.normal(size=(size, size)).astype(np.float32), max(2.0, 0.35 * mean_r))
    field /= max(float(field.std()), 1e-6)
    inside = (dist + 0.3 * roughness * field < 1.0) & (dist < 1.6)
    if inside.sum() < 0.3 * area * size * size:  # the noise ate the blob: fall back to the ellipse
        inside = dist < 1.0
    return inside.astype(np.float32), (cx, cy)


def _defect_scratch(img, rng, ctx):
    size = img.shape[0]
    length = size * rng.uniform(0.3, 0.9)
    theta = rng.uniform(0, np.pi)
    mid = rng.uniform(0.25 * size, 0.75 * size, size=2)
    d = np.array([np.cos(theta), np.sin(theta)])
    p0, p2 = mid - d * length / 2, mid + d * length / 2
    bend = rng.uniform(-0.25, 0.25) * length
    p1 = mid + np.array([-d[1], d[0]]) * bend
    t = np.linspace(0, 1, 80)[:, None]
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    n = 1 if rng.random() < 0.7 else int(rng.integers(2, 4))
    width = rng.uniform(1.0, 3.0)
    strokes = []
    for j in range(n):
        off = np.array([-d[1], d[0]]) * j * rng.uniform(3, 7)
        strokes.append((curve + off, width * rng.uniform(0.7, 1.0)))
    alpha = _supersampled_strokes(size, strokes) * rng.uniform(0.6, 1.0)
    bright = bool(rng.random() < 0.5)
    target = img * 0.3 + 0.7 * rng.uniform(215, 255) if bright else img * rng.uniform(0.1, 0.4)
    return (
        alpha,
        target,
        {"strokes": n, "width": round(float(width), 2), "bright": bright, "length": round(float(length), 1)},
    )


def _defect_spot(img, rng, ctx):
    size = img.shape[0]
    area = rng.uniform(0.01, 0.10)
    blob, centre = _blob(size, rng, area, 0.8, ctx["ndimage"])
    sigma = math.sqrt(area * size * size / math.pi) * rng.uniform(0.12, 0.3)
    nd = ctx["ndimage"]
    soft = nd.gaussian_filter(blob, sigma)
    alpha = soft / max(float(soft.max()), 1e-6) * rng.uniform(0.4, 0.85)
    kind = ("dark", "light", "rust", "oil")[int(rng.integers(0, 4))]
    colour = {"dark": (0, 0, 0), "light": (235, 230, 220), "rust": (150, 85, 40), "oil": (55, 50, 70)}[kind]
    keep = 0.35 if kind == "dark" else 0.45
    target = img * keep + (1 - keep) * np.array(colour, dtype=np.float32)
    return alpha, target, {"stain": kind, "area": round(float(area), 4)}


def _defect_crack(img, rng, ctx):
    size = img.shape[0]
    width0 = rng.uniform(1.2, 3.0)
    total = size * rng.uniform(0.35, 0.8)
    start = rng.uniform(0.2 * size, 0.8 * size, size=2)
    stack = [(start, float(rng.uniform(0, 2 * np.pi)), total, width0, 0)]
    strokes = []
    while stack:
        p, heading, length, width, depth = stack.pop(0)
        base = heading
        pts, travelled = [p], 0.0
        while travelled < length:
            heading = base + 0.6 * (heading - base) + float(rng.normal(0, 0.45))
            step = float(rng.uniform(2.0, 5.0))
            p = p + step * np.array([math.cos(heading), math.sin(heading)])
            pts.append(p)
            travelled += step
            if depth < 2 and rng.random() < 0.04:
                turn = float(rng.uniform(0.5, 1.1)) * (1 if rng.random() < 0.5 else -1)
                stack.append(
                    (
                        p,
                        heading + turn,
                        (length - travelled) * rng.uniform(0.3, 0.7) + 8,
                        max(0.8, width * 0.6),
                        depth + 1,
                    )
                )
        pts = np.array(pts)
        third = max(2, 2 * len(pts) // 3)
        strokes += [(pts[: third + 1], width), (pts[third:], max(0.8, width * 0.6))]
    alpha = _supersampled_strokes(size, strokes) * rng.uniform(0.75, 1.0)
    target = img * rng.uniform(0.05, 0.3)
    return (
        alpha,
        target,
        {"width": round(float(width0), 2), "length": round(float(total), 1), "branches": len(strokes) // 2 - 1},
    )


def _defect_missing(img, rng, ctx):
    size = img.shape[0]
    area = rng.uniform(0.015, 0.10)
    blob, centre = _blob(size, rng, area, 1.2, ctx["ndimage"])
    nd = ctx["ndimage"]
    alpha = np.clip(nd.gaussian_filter(blob, 0.7) * 1.15, 0, 1)
    if rng.random() < 0.5:
        fill = "flat"
        level = rng.uniform(15, 70) if rng.random() < 0.7 else rng.uniform(150, 200)
        noise = nd.gaussian_filter(rng.normal(0, 4.0, size=(size, size)).astype(np.float32), 1.0)
        target = np.repeat((level + noise)[:, :, None], 3, axis=2) * np.array([1.0, 0.97, 0.93], np.float32)
    else:
        fill = "hole"
        smooth = np.stack([nd.gaussian_filter(img[:, :, c], 6.0) for c in range(3)], axis=2)
        yy = np.arange(size, dtype=np.float32)[:, None, None]
        shade = 1.0 - 0.5 * np.clip((yy - (centre[1] - size * 0.1)) / (size * 0.3), 0, 1)
        target = smooth * rng.uniform(0.25, 0.5) * shade
    return alpha, target, {"fill": fill, "area": round(float(area), 4)}


def _defect_contamination(img, rng, ctx):
    size = img.shape[0]
    area = rng.uniform(0.015, 0.10)
    blob, centre = _blob(size, rng, area, 1.0, ctx["ndimage"])
    choices = [c for c in _CONTAMINANTS if c != ctx["texture"]]
    name = choices[int(rng.integers(0, len(choices)))]
    src, region = _region(name)
    w = int(rng.uniform(0.4, 1.0) * _short_side(region))
    box = _sample_box(rng, region, w)
    patch = Image.fromarray(np.ascontiguousarray(src[box[1] : box[3], box[0] : box[2]]), "RGB")
    target = np.asarray(patch.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    alpha = np.clip(ctx["ndimage"].gaussian_filter(blob, 1.0) * 1.1, 0, 1) * rng.uniform(0.65, 1.0)
    return alpha, target, {"foreign": name, "area": round(float(area), 4)}


_DEFECTS = {
    "scratch": _defect_scratch,
    "spot": _defect_spot,
    "crack": _defect_crack,
    "missing": _defect_missing,
    "contamination": _defect_contamination,
}
_ALPHA_CUTOFF = 0.05  # weaker changes are dropped entirely, so every altered pixel is in the mask


def apply_defect(clean: np.ndarray, kind: str, rng: np.random.Generator, *, texture: str = "brick"):
    """Damage an RGB uint8 image. Returns (damaged uint8 image, 0/255 uint8 mask, params).

    Pixels outside the mask are exactly the input's; the mask is the altered area dilated by 2 px.
    """
    nd = require("scipy.ndimage", extra="train", purpose=_PURPOSE)
    img = clean.astype(np.float32)
    alpha, target, params = _DEFECTS[kind](img, rng, {"ndimage": nd, "texture": texture})
    alpha = np.where(alpha >= _ALPHA_CUTOFF, alpha, 0.0).astype(np.float32)
    out = img * (1.0 - alpha[:, :, None]) + np.clip(target, 0, 255) * alpha[:, :, None]
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    mask = nd.binary_dilation(alpha > 0, iterations=2)
    out[~mask] = clean[~mask]  # exact, whatever the float arithmetic did
    params = {"type": kind, **params, "mask_fraction": round(float(mask.mean()), 4)}
    return out, (mask.astype(np.uint8) * 255), params


def defect_plan(texture: str = "brick") -> dict:
    """The texture's source region and its disjoint train / test parts."""
    if texture not in DEFECT_TEXTURES:
        raise ConfigError(f"unknown texture {texture!r}; choose one of {', '.join(DEFECT_TEXTURES)}")
    fn, box = _REGIONS[texture]
    train, test = split_region(box, _DEFECT_TRAIN_FRACTION)
    return {
        "image": fn,
        "region": list(box),
        "train_region": list(train),
        "test_region": list(test),
        "max_window": min(_short_side(train), _short_side(test)),
    }


def make_defects(
    out_dir,
    *,
    seed: int = 0,
    n_train_good: int = 60,
    n_test_good: int = 20,
    n_test_defect: int = 40,
    size: int = 224,
    texture: str = "brick",
    force: bool = False,
) -> dict:
    """Write the surface-inspection anomaly-detection example in the MVTec AD layout.

    Layout: ``train/good/NNN.png``, ``test/good/NNN.png``, ``test/<defect>/NNN.png`` and
    ``ground_truth/<defect>/NNN_mask.png`` (0/255, same size) for the defects ``scratch``, ``spot``,
    ``crack``, ``missing`` and ``contamination`` (``n_test_defect`` spread evenly over them, the
    first types getting the remainder). All images are ``size`` x ``size`` RGB crops of one shipped
    texture (``texture``: gravel, grass or brick); training crops and test crops come from disjoint
    parts of it. Defects cover from about 1% to 10% of an image, with varying contrast.

    Returns:
        a small summary: name, root, texture, defect types, counts per folder, seed, size.

    Raises:
        DataError: ``out_dir`` is not empty (and not an earlier example with ``force=True``).
        ConfigError: an unknown texture, a count or size out of range.
        MissingDependency: scikit-image is not installed.
    """
    _check_count("seed", seed, 0)
    _check_count("n_train_good", n_train_good, 1)
    _check_count("n_test_good", n_test_good, 0)
    _check_count("n_test_defect", n_test_defect, 0)
    _check_count("size", size, 32)
    plan = defect_plan(texture)
    src, _ = _region(texture)
    rot90 = texture in _ISOTROPIC
    per_type = [
        n_test_defect // len(DEFECT_TYPES) + (1 if j < n_test_defect % len(DEFECT_TYPES) else 0)
        for j in range(len(DEFECT_TYPES))
    ]
    jobs = [("train", "good", n_train_good), ("test", "good", n_test_good)]
    jobs += [("test", kind, n) for kind, n in zip(DEFECT_TYPES, per_type)]
    counts: dict[str, int] = {}
    with _staged_output(out_dir, force=force) as tmp:
        items = []
        for ji, (split, kind, n) in enumerate(jobs):
            region = plan[f"{split}_region"]
            for i in range(n):
                box_rng = np.random.default_rng([seed, 100 + ji, i, 0])
                box = _sample_box(box_rng, region, round(plan["max_window"] * box_rng.uniform(0.8, 1.0)))
                aug_seed = [seed, 100 + ji, i, 1]
                clean, params = _render_crop(src, box, size, np.random.default_rng(aug_seed), _DEFECT_AUG, rot90=rot90)
                rel = f"{split}/{kind}/{i:03d}.png"
                item = {
                    "file": rel,
                    "split": split,
                    "label": kind,
                    "region": texture,
                    "box": box,
                    "aug_seed": aug_seed,
                    "aug": params,
                    "rot90": rot90,
                }
                if kind == "good":
                    _save_png(clean, tmp / rel)
                else:
                    defect_seed = [seed, 100 + ji, i, 2]
                    bad, mask, dparams = apply_defect(clean, kind, np.random.default_rng(defect_seed), texture=texture)
                    mrel = f"ground_truth/{kind}/{i:03d}_mask.png"
                    _save_png(bad, tmp / rel)
                    _save_png(mask, tmp / mrel)
                    item.update(mask=mrel, defect_seed=defect_seed, defect=dparams)
                items.append(item)
            if n:
                counts[f"{split}/{kind}"] = n
        summary = {
            "name": "defects",
            "task": "anomaly",
            "texture": texture,
            "defect_types": [k for k, n in zip(DEFECT_TYPES, per_type) if n],
            "counts": counts,
            "sources": {texture: {k: v for k, v in plan.items() if k != "max_window"}},
            "seed": seed,
            "size": size,
        }
        _write_manifest(tmp, {**summary, "profile": "defects"}, items)
    return {**summary, "root": str(Path(out_dir)), "manifest": str(Path(out_dir) / MANIFEST)}


def rerender(root, item: dict) -> np.ndarray:
    """Re-make one clean crop of an example from its ``example.json`` record (for checks).

    For a defect image this returns the crop before damage.
    """
    doc = json.loads((Path(root) / MANIFEST).read_text(encoding="utf-8"))
    src, _ = _region(item["region"])
    aug = _SURFACE_AUG if doc["profile"] == "surfaces" else _DEFECT_AUG
    rng = np.random.default_rng(item["aug_seed"])
    arr, _ = _render_crop(src, item["box"], doc["size"], rng, aug, rot90=item.get("rot90"))
    return arr
