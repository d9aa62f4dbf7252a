"""Defect detection on the built-in `defects` example: image AUROC, pixel AUROC, latency, bundle size
for each head (padim, patchcore) x precision (fp32, int8) x runtime (ONNX Runtime, OpenVINO).

    .venv/bin/python benchmarks/anomaly.py [--seeds 0 1] [--targets cpu-x86 openvino-cpu] [--json]
    .venv/bin/python benchmarks/anomaly.py --wrong-part [--source digits|photos] [--kinds 0 2 4 6 8] \\
        --seeds 0 1 --targets cpu-x86
    .venv/bin/python benchmarks/anomaly.py --anomalib /path/to/anomalib-site   # + anomalib, side by side

`--wrong-part`: the wrong part instead of a local defect: patch part, image part and combined score of one
combined fit (INT8 and FP32), and a plain 2-NN on the FP32 pooled features (no training), per good kind and
seed. `--source digits` (default, see make_wrong_digit): each of scikit-learn's ten handwritten digits in turn
is the good part (60 training, 30 test scans), 5 scans of each other digit the wrong part. `--source photos`
(see make_wrong_part): regions of six scikit-image photographs, the wrong region / upside down / a quarter
missing / two quarters swapped as anomalies (every head separates those: AUROC ~1.0).

Each seed is one `make_defects(seed=...)` dataset (60 good training images, 20 good + 40 defective
test images, 224 px); the threshold is the best-F1 cut on the test images, AUROCs are threshold-free.
Latency: the fused model (backbone + scoring graph), batch 1, median of 20 runs after warm-up, on
this machine with its current load: compare rows of one run, not runs of different days.

`--anomalib DIR` adds anomalib's own PaDiM and PatchCore (torch, FP32) on the same images, with the
same EfficientNet-Lite0 weights and the same layers (blocks.1 + blocks.2, i.e. strides 4 and 8), its
default settings otherwise (PaDiM: all 64 channels; PatchCore: coreset --anomalib-coreset, 1 %).
DIR is a pip `--target` folder holding anomalib and its dependencies (kept out of the project venv).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import _provenance  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
import numpy as np


def edgetl_rows(
    data: Path, cache: str, targets: list[str], seed: int, heads: tuple[str, ...] = ("padim", "patchcore", "combined")
) -> list[dict]:
    from edgetl import FitOptions, fit
    from edgetl.tasks.anomaly.task import ANOMALY

    rows = []
    for target in targets:
        for kind in heads:
            for precision in ("fp32", "int8"):
                out = Path(cache).parent / f"{target}-{kind}-{precision}.bundle"
                t0 = time.perf_counter()
                r = fit(
                    data,
                    out,
                    force=True,
                    options=FitOptions(
                        head=ANOMALY.head_config(kind),
                        target=target,
                        precision=precision,
                        cache_dir=cache,
                        reference=False,
                        allow_drop=True,
                        quiet=True,
                    ),
                )
                rep, m = r.report, r.report["metrics"]
                rows.append(
                    {
                        "seed": seed,
                        "tool": "edgetl",
                        "head": kind,
                        "target": target,
                        "runtime": rep["runtime"],
                        "precision": precision,
                        "image_auroc": m["image_auroc"],
                        "pixel_auroc": m["pixel_auroc"],
                        "peak_in_mask": m["peak_in_mask"],
                        "f1": m["f1"],
                        "latency_ms": rep["fused_latency_batch1"]["p50_ms"],
                        "bundle_mb": round(sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file()) / 1e6, 2),
                        "fused_mb": round(rep["size"]["fused_bytes"] / 1e6, 2),
                        "parity_rel": rep["fused_parity"]["max_rel_score_diff"],
                        "fit_s": round(time.perf_counter() - t0, 1),
                    }
                )
                print(_line(rows[-1]), file=sys.stderr, flush=True)
    return rows


def anomalib_rows(data: Path, site: str, seed: int, coreset: float) -> list[dict]:
    """anomalib's PaDiM / PatchCore torch models on the same images, weights and layers (FP32, torch)."""
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # its coreset progress bar
    sys.path.insert(0, site)
    import torch

    from edgetl.core.features import load_input
    from edgetl.core.metrics import auroc
    from edgetl.export import resolve
    from edgetl.export.image import build_model, preprocess_config, weight_source
    from edgetl.tasks.anomaly.data import load_anomaly_data, load_mask

    try:
        from anomalib.models.image.padim.torch_model import PadimModel
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    except Exception as exc:  # anomalib absent or incompatible with this torch
        print(f"anomalib unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return []
    spec = resolve("efficientnet_lite0")
    ours = build_model(spec, weight_source(spec))
    pre = preprocess_config(ours)
    pre = type(pre).from_dict({**pre.to_dict(), "crop_pct": 1.0})  # as the defect task feeds the backbone
    ds = load_anomaly_data(data)
    x_tr = torch.from_numpy(np.stack([load_input(s.path, pre) for s in ds.train]))
    x_te = torch.from_numpy(np.stack([load_input(s.path, pre) for s in ds.test]))
    y = np.array([s.label != "good" for s in ds.test])
    masks = [
        load_mask(ds.masks.get(str(s.path)), pre) if s.label != "good" else np.zeros((224, 224), bool) for s in ds.test
    ]
    rows = []
    for name, make in (
        (
            "padim",
            lambda: PadimModel(
                backbone="tf_efficientnet_lite0", layers=["blocks.1", "blocks.2"], pre_trained=False, n_features=64
            ),
        ),
        (
            "patchcore",
            lambda: PatchcoreModel(
                backbone="tf_efficientnet_lite0", pre_trained=False, layers=["blocks.1", "blocks.2"]
            ),
        ),
    ):
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = make()
        fe = model.feature_extractor.feature_extractor
        missing, _ = fe.load_state_dict(ours.state_dict(), strict=False)
        assert not missing, missing[:3]  # the same weights in every layer anomalib reads
        model.train()
        with torch.no_grad():
            for i in range(0, len(x_tr), 8):  # training mode: the model stores the embeddings
                model(x_tr[i : i + 8])
            if name == "padim":
                model.fit()
            else:
                model.subsample_embedding(sampling_ratio=coreset)
            model.eval()
            t_fit = time.perf_counter() - t0
            outs = [model(x_te[i : i + 8]) for i in range(0, len(x_te), 8)]
            scores = torch.cat([o.pred_score.reshape(-1) for o in outs]).numpy()
            maps = torch.cat(
                [o.anomaly_map.reshape(len(o.pred_score), *o.anomaly_map.shape[-2:]) for o in outs]
            ).numpy()
            x1 = x_te[:1]
            for _ in range(3):
                model(x1)
            lat = []
            for _ in range(20):
                t = time.perf_counter()
                model(x1)
                lat.append((time.perf_counter() - t) * 1000)
        rows.append(
            {
                "seed": seed,
                "tool": "anomalib",
                "head": name if name == "padim" else f"patchcore@{coreset:g}",
                "target": "torch",
                "runtime": "torch eager",
                "precision": "fp32",
                "image_auroc": round(auroc(y, scores), 4),
                "pixel_auroc": round(auroc(np.stack(masks).ravel(), maps.ravel()), 4),
                "peak_in_mask": None,
                "f1": None,
                "latency_ms": round(float(np.median(lat)), 2),
                "bundle_mb": None,
                "fused_mb": None,
                "parity_rel": None,
                "fit_s": round(t_fit, 1),
            }
        )
        print(_line(rows[-1]), file=sys.stderr, flush=True)
    return rows


# ----- wrong part: crops of packaged photographs, one photograph's crops as the good part ------------
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "motorcycle")
GOOD_KINDS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "motorcycle")


def _photo(name: str) -> np.ndarray:
    from skimage import data as sk

    a = np.asarray(sk.stereo_motorcycle()[0] if name == "motorcycle" else getattr(sk, name)())
    a = np.repeat(a[..., None], 3, 2) if a.ndim == 2 else a[..., :3]
    return np.ascontiguousarray(a.astype(np.uint8))


# where each photograph's "part" is: (centre row, centre column) as fractions of its size
CENTRES = {
    "astronaut": (0.35, 0.45),
    "chelsea": (0.45, 0.45),
    "coffee": (0.45, 0.5),
    "rocket": (0.5, 0.55),
    "camera": (0.4, 0.5),
    "motorcycle": (0.5, 0.5),
}


def _view(a: np.ndarray, cy: float, cx: float, side: int, rng, *, turn: float = 0.0):
    """One camera shot of the square of ``side`` px centred at (cy, cx), as a fixture would give:
    shifted up to 10 % of its side, scaled +-10 %, tilted up to 8 degrees (plus ``turn``),
    brightness and contrast jittered; 224 px."""
    from PIL import Image

    pad = side
    p = np.pad(a, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    cy, cx = cy + pad + rng.uniform(-0.1, 0.1) * side, cx + pad + rng.uniform(-0.1, 0.1) * side
    side = int(side * rng.uniform(0.9, 1.1))
    big = int(side * 1.5)
    y0, x0 = int(cy - big / 2), int(cx - big / 2)
    im = Image.fromarray(p[y0 : y0 + big, x0 : x0 + big]).rotate(
        turn + rng.uniform(-8, 8), resample=Image.Resampling.BILINEAR
    )
    o = (big - side) // 2
    v = np.asarray(im.crop((o, o, o + side, o + side)).resize((224, 224), Image.Resampling.BILINEAR)).astype(np.float32)
    v = (v - v.mean()) * rng.uniform(0.85, 1.15) + v.mean() * rng.uniform(0.9, 1.1)
    return np.clip(v, 0, 255).astype(np.uint8)


def _missing(v: np.ndarray, rng) -> np.ndarray:
    """A component gone: one quadrant replaced by a heavily blurred copy of the shot (what is
    behind it, out of focus)."""
    from PIL import Image, ImageFilter

    blur = np.asarray(Image.fromarray(v).filter(ImageFilter.GaussianBlur(12)))
    i, j = int(rng.integers(2)) * 112, int(rng.integers(2)) * 112
    out = v.copy()
    out[i : i + 112, j : j + 112] = blur[i : i + 112, j : j + 112]
    return out


def _swapped(v: np.ndarray, rng) -> np.ndarray:
    """Assembled wrong: two diagonal quadrants exchanged (every patch is a good one)."""
    out = v.copy()
    if rng.random() < 0.5:
        out[:112, :112], out[112:, 112:] = v[112:, 112:], v[:112, :112]
    else:
        out[:112, 112:], out[112:, :112] = v[112:, :112], v[:112, 112:]
    return out


def make_wrong_part(out: Path, good: str, seed: int, *, n_train: int = 60, n_good: int = 30, n_bad: int = 10) -> Path:
    """An MVTec-style folder from one photograph, no local defect anywhere: the good part is one
    region of it (train/good, test/good: shots of that region); the anomalies are kinds of wrong
    part: ``other`` (another region of the same photograph: the same colours and textures),
    ``upside_down`` (the region turned 180 degrees), ``missing`` (a quarter of it gone, see
    :func:`_missing`) and ``swapped`` (two quarters exchanged)."""
    from PIL import Image

    rng = np.random.default_rng([seed, PHOTOS.index(good)])
    a = _photo(good)
    H, W = a.shape[:2]
    side = int(0.4 * min(H, W))
    cy, cx = CENTRES[good][0] * H, CENTRES[good][1] * W
    sets = {
        "train/good": [_view(a, cy, cx, side, rng) for _ in range(n_train)],
        "test/good": [_view(a, cy, cx, side, rng) for _ in range(n_good)],
        "test/upside_down": [_view(a, cy, cx, side, rng, turn=180) for _ in range(n_bad)],
        "test/missing": [_missing(_view(a, cy, cx, side, rng), rng) for _ in range(n_bad)],
        "test/swapped": [_swapped(_view(a, cy, cx, side, rng), rng) for _ in range(n_bad)],
        "test/other": [],
    }
    while len(sets["test/other"]) < n_bad:
        y, x = rng.uniform(side / 2, H - side / 2), rng.uniform(side / 2, W - side / 2)
        if max(abs(y - cy), abs(x - cx)) > 0.6 * side:
            sets["test/other"].append(_view(a, y, x, side, rng))
    for folder, ims in sets.items():
        (out / folder).mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(ims):
            Image.fromarray(im).save(out / folder / f"{i:03d}.png")
    return out


def make_wrong_digit(out: Path, good: int, seed: int, *, n_train: int = 60, n_good: int = 30, n_bad: int = 5) -> Path:
    """An MVTec-style folder from scikit-learn's handwritten digits (1,797 8 x 8 scans, installed
    with it): one digit is the good part (train/good, test/good: different writers), each other
    digit a wrong part (test/<digit>): no defect on any of them, every stroke a good one could have."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng([seed, good])
    own = rng.permutation(np.flatnonzero(d.target == good))
    sets = {"train/good": own[:n_train], "test/good": own[n_train : n_train + n_good]}
    for other in range(10):
        if other != good:
            sets[f"test/digit_{other}"] = rng.permutation(np.flatnonzero(d.target == other))[:n_bad]
    for folder, idx in sets.items():
        (out / folder).mkdir(parents=True, exist_ok=True)
        for i, k in enumerate(idx):
            ink = (255 - d.images[k] * (255 / 16)).astype(np.uint8)  # dark ink on a light part
            Image.fromarray(ink).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR).save(
                out / folder / f"{i:03d}.png"
            )
    return out


def _feature_rows(backbone, preprocess, samples, width: int) -> np.ndarray:
    """The bundle backbone's feature rows (N, width) of image samples, 16 at a time."""
    from edgetl.core.features import load_input

    return np.concatenate(
        [
            backbone(np.stack([load_input(s.path, preprocess) for s in samples[i : i + 16]])).reshape(-1, width)
            for i in range(0, len(samples), 16)
        ]
    )


def wrong_part_rows(data: Path, cache: str, target: str, seed: int, good: str) -> list[dict]:
    """One combined fit per precision; its patch part, image part and combined score on the test
    images, and the 2-NN reference (FP32 pooled features, no training) on the same images."""
    from edgetl import DefectConfig, FitOptions, fit, load_predictor
    from edgetl.core.metrics import auroc
    from edgetl.core.sessions import bundle_session
    from edgetl.tasks.anomaly.data import load_anomaly_data

    ds = load_anomaly_data(data)
    y = np.array([s.label != "good" for s in ds.test])
    rows, pooled = [], {}
    for precision in ("fp32", "int8"):
        out = Path(cache).parent / f"wp-{good}-{seed}-{precision}.bundle"
        t0 = time.perf_counter()
        r = fit(
            data,
            out,
            force=True,
            options=FitOptions(
                head=DefectConfig(),
                target=target,
                precision=precision,
                cache_dir=cache,
                reference=False,
                allow_drop=True,
                quiet=True,
            ),
        )
        p = load_predictor(out)
        head = p.head
        backbone = bundle_session(p.bundle, p.bundle.model_file("backbone"))
        X_te = _feature_rows(backbone, p.preprocess, ds.test, head.width)
        if precision == "fp32":
            X_tr = _feature_rows(backbone, p.preprocess, ds.train, head.width)
            pooled["train"], pooled["test"] = head.split(X_tr)[1], head.split(X_te)[1]
        chosen = (r.report.get("selection") or {}).get("chosen", "combined")
        for kind in ("patch", "image", "combined"):
            h = head.as_kind(head.image.kind if kind == "image" else kind)
            rows.append(
                {
                    "seed": seed,
                    "good": good,
                    "head": kind if kind != "image" else f"image:{head.image.kind}",
                    "precision": precision,
                    "image_auroc": round(float(auroc(y, h.maps(X_te)[1])), 4),
                    "chosen": chosen,
                    "fit_s": round(time.perf_counter() - t0, 1),
                }
            )
    D = np.sqrt(
        np.maximum(
            (pooled["test"] ** 2).sum(1)[:, None]
            - 2 * pooled["test"] @ pooled["train"].T
            + (pooled["train"] ** 2).sum(1)[None],
            0,
        )
    )
    rows.append(
        {
            "seed": seed,
            "good": good,
            "head": "2-NN reference",
            "precision": "fp32",
            "image_auroc": round(float(auroc(y, np.sort(D, 1)[:, :2].mean(1))), 4),
            "chosen": "",
            "fit_s": 0.0,
        }
    )
    for row in rows[-7:]:
        print(
            f"{row['seed']:>4}  {row['good']:<10} {row['head']:<16} {row['precision']:<5} {row['image_auroc']:.4f}  "
            f"(fit chose {row['chosen'] or '-'})",
            file=sys.stderr,
            flush=True,
        )
    return rows


def wrong_part_summary(rows: list[dict]) -> str:
    """Mean and spread (min-max over seeds) per good kind and head, then over all kinds."""
    lines = [f"{'good kind':<10} {'head':<16} {'prec':<5} {'mean AUROC':>10} {'min':>7} {'max':>7} {'n':>3}"]
    keys = sorted({(r["good"], r["head"], r["precision"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    for good in [*sorted({k[0] for k in keys}), "all"]:
        for head, prec in sorted({(k[1], k[2]) for k in keys}):
            v = [
                r["image_auroc"]
                for r in rows
                if r["head"] == head and r["precision"] == prec and good in ("all", r["good"])
            ]
            if v:
                lines.append(
                    f"{good:<10} {head:<16} {prec:<5} {np.mean(v):>10.4f} "
                    f"{np.min(v):>7.4f} {np.max(v):>7.4f} {len(v):>3}"
                )
    return "\n".join(lines)


def _line(r: dict) -> str:
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    return (
        f"{r['seed']:>4}  {r['tool']:<8} {r['head']:<14} {r['runtime']:<12} {r['precision']:<5} "
        f"{f(r['image_auroc'], '.4f'):>9} {f(r['pixel_auroc'], '.4f'):>9} {f(r['peak_in_mask'], '.2f'):>5} "
        f"{f(r['latency_ms'], '.1f'):>8} {f(r['bundle_mb'], '.2f'):>8}"
    )


HEADER = (
    f"{'seed':>4}  {'tool':<8} {'head':<14} {'runtime':<12} {'prec':<5} {'img AUROC':>9} {'pix AUROC':>9} "
    f"{'peak':>5} {'lat ms':>8} {'bundle MB':>8}"
)


def main() -> None:
    _provenance.stamp()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--targets", nargs="+", default=["cpu-x86", "openvino-cpu"])
    ap.add_argument("--anomalib", help="pip --target folder with anomalib installed (optional)")
    ap.add_argument(
        "--anomalib-coreset",
        type=float,
        default=0.01,
        help="anomalib PatchCore coreset ratio; its 10%% default on its 56 x 56 grid (18,815 greedy "
        "steps for 60 images) was estimated at ~1.7 h on this 2-core machine",
    )
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--wrong-part",
        action="store_true",
        help="the wrong-part benchmark instead: from each of scikit-image's photographs "
        f"{', '.join(GOOD_KINDS)} in turn, shots of one region as the good part, of other "
        "regions and of the region upside down as anomalies",
    )
    ap.add_argument(
        "--source",
        choices=["digits", "photos"],
        default="digits",
        help="wrong-part data: digits (scikit-learn's handwritten digits, each digit in turn the good "
        "part, the other nine the wrong part) or photos (regions of scikit-image's photographs)",
    )
    ap.add_argument("--kinds", nargs="+", help="wrong-part: only these good kinds (digits 0-9 or photograph names)")
    ap.add_argument(
        "--heads",
        nargs="+",
        default=["padim", "patchcore", "combined"],
        help="local-defect heads to fit (any anomaly --head)",
    )
    args = ap.parse_args()
    if args.wrong_part:
        tmp = Path(tempfile.mkdtemp(prefix="edgetl-wrong-part-"))
        rows = []
        kinds = [f"digit_{d}" for d in range(10)] if args.source == "digits" else list(GOOD_KINDS)
        kinds = [k for k in kinds if not args.kinds or k in args.kinds or k.split("_")[-1] in args.kinds]
        for seed in args.seeds:
            for good in kinds:
                data = (
                    make_wrong_digit(tmp / f"{good}-{seed}", int(good[-1]), seed)
                    if args.source == "digits"
                    else make_wrong_part(tmp / f"{good}-{seed}", good, seed)
                )
                rows += wrong_part_rows(data, str(tmp / "cache"), args.targets[0], seed, good)
        print(json.dumps(rows, indent=2) if args.json else wrong_part_summary(rows))
        return

    from edgetl.datasets.images import make_defects

    tmp = Path(tempfile.mkdtemp(prefix="edgetl-anomaly-"))
    cache = str(tmp / "cache")
    rows = []
    print(HEADER, file=sys.stderr)
    for seed in args.seeds:
        data = tmp / f"defects-{seed}"
        make_defects(data, seed=seed)
        rows += edgetl_rows(data, cache, args.targets, seed, tuple(args.heads))
        if args.anomalib:
            rows += anomalib_rows(data, args.anomalib, seed, args.anomalib_coreset)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(HEADER)
        print("\n".join(_line(r) for r in rows))


if __name__ == "__main__":
    main()
