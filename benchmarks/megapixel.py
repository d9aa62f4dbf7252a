"""Small defects on megapixel frames: image AUROC per defect kind, fit time and per-frame latency of the
default ``fit`` (combined head, INT8, openvino-cpu), beside the same defects when they fill a 224 px frame.

    .venv/bin/python benchmarks/megapixel.py [--sets brick gravel retina] [--size 1024] [--train 40] [--json]

Data (made here from scikit-image's packaged images, nothing downloaded): per set, frames of ``--size``
px. Textures (brick, grass, gravel: 512 px greyscale) are enlarged 2.5x, tinted, cropped at a random
place, flipped and given +-5 % gain and sensor noise; the photograph (``retina``, 1411 px colour) is the
same scene shifted by up to 24 px, as a part sits on a line. Six defect kinds at the size they have on a
real frame (0.02-1.5 % of the frame): ``crack`` (a dark polyline 1-3 px wide, 60-250 px long),
``chip`` (a light blob 8-18 px across with a dark rim), ``stain`` (a soft tinted blob 50-120 px),
``smudge`` (a blurred, lightened blob 40-100 px), ``foreign`` (a blob 16-40 px of another texture),
``warp`` (a smooth swirl of 3-6 px in a disc of 60-120 px). Masks are written MVTec style.

Reference: the same frames cut to 256 px windows (a random window of each good frame, the window around
each defect), which edgetl resizes to 224 px: the defect then keeps about its pixel size and fills
~16x more of the picture. The goal is megapixel image AUROC within 2 points of it.

Figures: threshold-free image AUROC per kind and overall (a tiled bundle also per view: the tiles
alone, the whole-frame overview alone, and their combination, which is what the bundle scores); fit
wall time (without the FP32 reference pass: ``reference=False``); latency = median over 10 frames of
scoring one frame (decode, preprocess, model, heat map) at batch 1. Two cores shared with other jobs:
compare rows of one run, medians only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import _provenance  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

KINDS = ("crack", "chip", "stain", "smudge", "foreign", "warp")
TINTS = {"brick": (1.0, 0.78, 0.62), "grass": (0.75, 1.0, 0.6), "gravel": (0.95, 0.92, 0.85)}


# ------------------------------------------------------------------------------------- good frames
def _source(name: str) -> np.ndarray:
    from skimage import data

    a = getattr(data, name)().astype(np.float32)
    if a.ndim == 2:
        a = np.stack([a * t for t in TINTS.get(name, (1.0, 1.0, 1.0))], -1)
    return np.clip(a, 0, 255)


def good_frame(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One good frame (size, size, 3) float32 in 0..255."""
    src = _source(name)
    if name in TINTS:  # texture: enlarged, a random window, flipped
        big = np.asarray(
            Image.fromarray(src.astype(np.uint8)).resize((int(src.shape[1] * 2.5),) * 2, Image.Resampling.BICUBIC),
            np.float32,
        )
        y, x = rng.integers(0, big.shape[0] - size + 1), rng.integers(0, big.shape[1] - size + 1)
        f = big[y : y + size, x : x + size]
        if rng.random() < 0.5:
            f = f[:, ::-1]
        if rng.random() < 0.5:
            f = f[::-1]
    else:  # photograph: one scene, shifted a little
        side = min(src.shape[:2])
        scale = (size + 48) / side
        big = np.asarray(
            Image.fromarray(src.astype(np.uint8)).resize(
                (round(src.shape[1] * scale), round(src.shape[0] * scale)), Image.Resampling.BICUBIC
            ),
            np.float32,
        )
        cy, cx = (big.shape[0] - size) // 2, (big.shape[1] - size) // 2
        y, x = cy + rng.integers(-24, 25), cx + rng.integers(-24, 25)
        f = big[y : y + size, x : x + size]
    f = f * rng.uniform(0.95, 1.05) + rng.normal(0, 2.0, f.shape).astype(np.float32)
    return np.clip(f, 0, 255).astype(np.float32)


# ------------------------------------------------------------------------------------------ defects
def _blob(size: int, cy: float, cx: float, r: float, rng, soft: float = 0.0) -> np.ndarray:
    """An irregular disc (radius r, wobbly edge) as a float mask in [0, 1]; soft: edge blur in px."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ang = np.arctan2(yy - cy, xx - cx)
    wob = sum(rng.uniform(0.05, 0.18) * np.sin(k * ang + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    d = np.hypot(yy - cy, xx - cx) / (r * (1 + wob))
    if soft <= 0:
        return (d <= 1).astype(np.float32)
    return np.clip((1 - d) * r / soft + 0.5, 0, 1).astype(np.float32)


def add_defect(f: np.ndarray, kind: str, rng: np.random.Generator, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(frame with one defect, mask bool) — sizes in pixels of the frame, as they would be on a line."""
    size = f.shape[0]
    m = 140
    cy, cx = rng.uniform(m, size - m, 2)
    out = f.copy()
    if kind == "crack":
        pts, ang = [(cx, cy)], rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(6, 14))):
            ang += rng.normal(0, 0.5)
            step = rng.uniform(10, 20)
            pts.append((pts[-1][0] + step * np.cos(ang), pts[-1][1] + step * np.sin(ang)))
        mk = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mk).line(pts, fill=255, width=int(rng.integers(1, 4)), joint="curve")
        a = np.asarray(mk.filter(ImageFilter.GaussianBlur(0.4)), np.float32) / 255
        out = f * (1 - a[..., None] * rng.uniform(0.45, 0.7))
        mask = a > 0.25
    elif kind == "chip":
        r = rng.uniform(4, 9)
        a = _blob(size, cy, cx, r, rng)
        rim = np.clip(_blob(size, cy, cx, r + 1.5, rng) - a, 0, 1)
        out = f * (1 - a[..., None]) + a[..., None] * (0.5 * f + 0.5 * rng.uniform(200, 235))
        out = out * (1 - 0.5 * rim[..., None])
        mask = (a + rim) > 0.5
    elif kind == "stain":
        a = _blob(size, cy, cx, rng.uniform(25, 60), rng, soft=8.0) * rng.uniform(0.35, 0.55)
        tint = np.array(rng.choice([(0.7, 0.55, 0.35), (0.5, 0.5, 0.6), (0.85, 0.8, 0.4)]), np.float32)
        out = f * (1 - a[..., None]) + a[..., None] * f * tint
        mask = a > 0.1
    elif kind == "smudge":
        r = rng.uniform(20, 50)
        a = _blob(size, cy, cx, r, rng, soft=6.0)
        blur = np.asarray(
            Image.fromarray(np.clip(f, 0, 255).astype(np.uint8)).filter(
                ImageFilter.GaussianBlur(rng.uniform(2.5, 4.0))
            ),
            np.float32,
        )
        out = f * (1 - a[..., None]) + a[..., None] * (blur * 0.9 + 0.1 * 210)
        mask = a > 0.3
    elif kind == "foreign":
        r = rng.uniform(8, 20)
        a = _blob(size, cy, cx, r, rng)
        y0, x0 = rng.integers(0, other.shape[0] - size + 1), rng.integers(0, other.shape[1] - size + 1)
        out = f * (1 - a[..., None]) + a[..., None] * other[y0 : y0 + size, x0 : x0 + size]
        mask = a > 0.5
    elif kind == "warp":
        r = rng.uniform(30, 60)
        amp = rng.uniform(3, 6) * rng.choice([-1, 1])
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        d = np.hypot(yy - cy, xx - cx) / r
        w = np.where(d < 1, (1 - d) ** 2 * np.sin(np.pi * d), 0).astype(np.float32)
        # a swirl: pixels move along the circle around the centre by amp * w
        t = amp * w / np.maximum(np.hypot(yy - cy, xx - cx), 1)
        sy = np.clip(yy + t * (xx - cx), 0, size - 1)
        sx = np.clip(xx - t * (yy - cy), 0, size - 1)
        y0, x0 = np.floor(sy).astype(int), np.floor(sx).astype(int)
        y1, x1 = np.minimum(y0 + 1, size - 1), np.minimum(x0 + 1, size - 1)
        wy, wx = (sy - y0)[..., None], (sx - x0)[..., None]
        out = (1 - wy) * ((1 - wx) * f[y0, x0] + wx * f[y0, x1]) + wy * ((1 - wx) * f[y1, x0] + wx * f[y1, x1])
        mask = np.abs(amp * w) > 0.75
    else:
        raise ValueError(kind)
    return np.clip(out, 0, 255).astype(np.float32), mask


# -------------------------------------------------------------------------------------- data sets
def _png(a: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8)).save(path, compress_level=1)


def make_set(
    root: Path, name: str, seed: int, *, size: int, n_train: int, n_good: int, per_kind: int, window: int = 256
) -> tuple[Path, Path, dict]:
    """(megapixel folder, reference folder of ``window`` px crops, defect areas in % of the frame)."""
    rng = np.random.default_rng(seed)
    other = np.asarray(Image.fromarray(_source("coffee").astype(np.uint8)).resize((size + 200, size + 200)), np.float32)
    mega, ref = root / f"{name}-{seed}", root / f"{name}-{seed}-ref"
    areas: dict[str, list[float]] = {k: [] for k in KINDS}

    def crop(a, cy, cx):
        y = int(np.clip(cy - window // 2 + rng.integers(-window // 4, window // 4 + 1), 0, size - window))
        x = int(np.clip(cx - window // 2 + rng.integers(-window // 4, window // 4 + 1), 0, size - window))
        return a[y : y + window, x : x + window]

    for i in range(n_train):
        f = good_frame(name, size, rng)
        _png(f, mega / "train/good" / f"{i:03d}.png")
        _png(crop(f, *rng.uniform(window, size - window, 2)), ref / "train/good" / f"{i:03d}.png")
    for i in range(n_good):
        f = good_frame(name, size, rng)
        _png(f, mega / "test/good" / f"{i:03d}.png")
        _png(crop(f, *rng.uniform(window, size - window, 2)), ref / "test/good" / f"{i:03d}.png")
    for kind in KINDS:
        for i in range(per_kind):
            f, mask = add_defect(good_frame(name, size, rng), kind, rng, other)
            areas[kind].append(100 * mask.mean())
            _png(f, mega / "test" / kind / f"{i:03d}.png")
            _png(mask.astype(np.float32) * 255, mega / "ground_truth" / kind / f"{i:03d}_mask.png")
            ys, xs = np.nonzero(mask)
            cy, cx = float(ys.mean()), float(xs.mean())
            state = rng.bit_generator.state
            _png(crop(f, cy, cx), ref / "test" / kind / f"{i:03d}.png")
            rng.bit_generator.state = state  # the same window for the mask
            _png(crop(mask.astype(np.float32) * 255, cy, cx), ref / "ground_truth" / kind / f"{i:03d}_mask.png")
    return mega, ref, {k: [round(min(v), 3), round(max(v), 3)] for k, v in areas.items()}


# ------------------------------------------------------------------------------------------ running
def run_one(data: Path, out: Path, cache: str, extra_head: dict | None = None) -> dict:
    from edgetl import FitOptions, fit, load_predictor
    from edgetl.tasks.anomaly.task import ANOMALY

    t0 = time.perf_counter()
    head = ANOMALY.head_config({"kind": "combined", **(extra_head or {})})
    r = fit(
        data,
        out,
        force=True,
        options=FitOptions(head=head, cache_dir=cache, reference=False, allow_drop=True, quiet=True),
    )
    fit_s = time.perf_counter() - t0
    pred = load_predictor(out)
    m = pred.evaluate(data)
    frames = sorted((data / "test").rglob("*.png"))[:: max(1, len(list((data / "test").rglob("*.png"))) // 10)][:10]
    pred.maps(frames[:1])  # warm-up
    lat = []
    for f in frames:
        t = time.perf_counter()
        pred.maps([f])
        lat.append(time.perf_counter() - t)
    return {
        "image_auroc": m["image_auroc"],
        "pixel_auroc": m["pixel_auroc"],
        "per_kind": m["per_defect_auroc"],
        "fit_s": round(fit_s, 1),
        "frame_ms": round(1000 * float(np.median(lat)), 1),
        "detected": m.get("defects_detected"),
        "tiling": r.report.get("tiling"),
        "views": views(out, data),
    }


def views(bundle: Path, data: Path) -> dict | None:
    """Image AUROC (overall and per kind) of each view of a tiled bundle with an overview, from
    the same fitted heads: ``tiles`` (the frame's tile maximum alone: the default before the
    overview), ``overview`` (the whole-frame view alone) and ``combined`` (their soft maximum in
    z units: what the bundle scores). None for a bundle without an overview."""
    from edgetl.core.bundle import load_bundle
    from edgetl.core.metrics import auroc
    from edgetl.tasks.anomaly.data import labelled_images
    from edgetl.tasks.anomaly.task import AnomalyPredictor, PatchExtractor, score_rows

    p = AnomalyPredictor(load_bundle(bundle), fused=False)
    ov = p.overview
    if ov is None or p.plan is None:
        return None
    samples, _, _ = labelled_images(data)
    ext = PatchExtractor(p.session, p.preprocess, p.bundle.model_file("backbone"), p.shape)
    tiles, whole = p.plan.split(ext.tiles(samples, p.plan))
    st = p.plan.frames(*score_rows(p.head, tiles))[1]
    so = score_rows(ov.head, whole)[1]
    y = np.array([s.label != "good" for s in samples])
    kinds = np.array([s.label for s in samples])
    out = {}
    for name, s in (("tiles", st), ("overview", so), ("combined", ov.combine(st, so))):
        row = {"all": auroc(y, s)}
        for k in sorted(set(kinds) - {"good"}):
            sel = (kinds == "good") | (kinds == k)
            row[k] = auroc(y[sel], s[sel])
        out[name] = {k: None if v is None else round(float(v), 4) for k, v in row.items()}
    return out


def main() -> None:
    _provenance.stamp()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=["brick", "gravel", "retina"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--train", type=int, default=40)
    ap.add_argument("--good", type=int, default=16)
    ap.add_argument("--per-kind", type=int, default=8)
    ap.add_argument("--no-reference", action="store_true", help="skip the 224-px-filling reference fits")
    ap.add_argument("--defect-size", type=float, help="passed to fit (pixels)")
    ap.add_argument("--keep", help="write the data and bundles here instead of a temporary folder")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="edgetl-megapixel-"))
    tmp.mkdir(parents=True, exist_ok=True)
    cache = str(tmp / "cache")
    extra = {"defect_size": args.defect_size} if args.defect_size else None
    rows = []
    for name in args.sets:
        t0 = time.perf_counter()
        mega, ref, areas = make_set(
            tmp, name, args.seed, size=args.size, n_train=args.train, n_good=args.good, per_kind=args.per_kind
        )
        print(f"# {name}: data in {time.perf_counter() - t0:.0f} s; defect area % of frame {areas}", file=sys.stderr)
        row = {
            "set": name,
            "seed": args.seed,
            "size": args.size,
            "areas_pct": areas,
            "mega": run_one(mega, tmp / f"{name}.bundle", cache, extra),
        }
        if not args.no_reference:
            row["ref224"] = run_one(ref, tmp / f"{name}-ref.bundle", cache)
        rows.append(row)
        print(_line(row), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(summary(rows))


def _line(r: dict) -> str:
    m = r["mega"]
    s = (
        f"{r['set']:<8} {r['size']} px: image AUROC {m['image_auroc']:.3f} "
        + " ".join(f"{k} {v:.2f}" for k, v in m["per_kind"].items())
        + f" | fit {m['fit_s']:.0f} s, {m['frame_ms']:.0f} ms/frame"
    )
    for name, row in (m.get("views") or {}).items():
        s += f"\n{'':<8} {name:<8} AUROC {row['all']:.3f} " + " ".join(
            f"{k} {v:.2f}" for k, v in row.items() if k != "all" and v is not None
        )
    if "ref224" in r:
        f = r["ref224"]
        s += f"\n{'':<8} 224 ref: image AUROC {f['image_auroc']:.3f} " + " ".join(
            f"{k} {v:.2f}" for k, v in f["per_kind"].items()
        )
    return s


def summary(rows: list[dict]) -> str:
    lines = [_line(r) for r in rows]
    mean = lambda xs: float(np.mean(xs)) if xs else math.nan  # noqa: E731
    mega = [r["mega"]["image_auroc"] for r in rows]
    lines.append(f"mean megapixel image AUROC {mean(mega):.3f} (spread over sets {min(mega):.3f}-{max(mega):.3f})")
    if all("ref224" in r for r in rows):
        ref = [r["ref224"]["image_auroc"] for r in rows]
        lines.append(f"mean 224-px reference      {mean(ref):.3f} (gap {100 * (mean(ref) - mean(mega)):+.1f} points)")
    for k in KINDS:
        v = [r["mega"]["per_kind"].get(k) for r in rows if r["mega"]["per_kind"].get(k) is not None]
        lines.append(f"  {k:<8} megapixel {mean(v):.3f} (min {min(v):.3f})")
    lines.append(f"frame latency median {mean([r['mega']['frame_ms'] for r in rows]):.0f} ms (batch 1, shared cores)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
