"""What a megapixel frame costs to decode, and whether decoding it sized for the model changes accuracy.

    PYTHONPATH=src .venv/bin/python benchmarks/decode.py [--work /tmp/decode-bench] [--repeats 3]
                                                         [--seeds 0 1 2] [--skip-accuracy] [--json]

Two measurements, both on images made here from scikit-image's shipped photographs:

* **per-frame cost of a 5 MP JPEG over a 256 px one**: ``load_predictor(bundle).predict([folder])``
  on a folder of 40 photographs saved as 2592 x 1944 JPEGs, and on the same 40 saved with a short
  side of 256 px, same bundle (the ``surfaces`` example fitted with the CLI defaults), same process;
  ``(t_5MP - t_256) / 40`` per repeat, reported as median and min..max over ``--repeats``. Run it
  with ``PYTHONPATH`` pointing at another checkout to measure that checkout (it uses only the
  public device API). Also single-thread decode + resize of one 5 MP frame: full decode vs the
  sized decode;
* **accuracy, full decode vs sized decode** (unless ``--skip-accuracy``): per seed, the
  ``surfaces`` example rendered at 1600 px (8 classes of material photographs; validation crops
  from parts of each photograph no training crop touches), written once as JPEG (DCT-scaled by
  the sized decode) and once as PNG (box-reduced); FP32 backbone features of every image decoded
  both ways, edgetl's linear head trained on the training split of each, accuracy on the
  validation split. Reported per seed and as the paired difference (sized - full) with its range;
* with ``--serve``: ``edgetl serve`` throughput with 4 clients uploading the 5 MP JPEGs, and the
  256 px ones (requests per second, p50 / p99 latency);
* with ``--memory``: peak resident memory of ``edgetl predict`` (one process per file) on crafted
  files under the default budget: strips (1 x 10000 ... 1 x 63 M), 64 MP 16-bit, float and RGBA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _provenance  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
import numpy as np
from PIL import Image

FRAME = (2592, 1944)
PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "cat",
    "coins",
)


def _cli(*args) -> str:
    r = subprocess.run([sys.executable, "-m", "edgetl.cli", *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"edgetl {' '.join(map(str, args[:2]))} failed: {r.stderr[-2000:]}")
    return r.stdout


def frames(work: Path, n: int = 40) -> tuple[Path, Path]:
    """``n`` photographs as 5 MP JPEGs and as 256 px JPEGs (different crops of the shipped photos)."""
    from skimage import data as skdata

    big, small = work / "frames-5mp", work / "frames-256"
    if len(list(big.glob("*.jpg"))) == n and len(list(small.glob("*.jpg"))) == n:
        return big, small
    big.mkdir(parents=True, exist_ok=True)
    small.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(n):
        arr = getattr(skdata, PHOTOS[k % len(PHOTOS)])()
        im = Image.fromarray(arr).convert("RGB")
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.7, 1.0)), int(h * rng.uniform(0.7, 1.0))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = im.crop((left, top, left + cw, top + ch))
        crop.resize(FRAME, Image.Resampling.BICUBIC).save(big / f"f{k:02d}.jpg", quality=90)
        crop.resize((round(256 * FRAME[0] / FRAME[1]), 256), Image.Resampling.BICUBIC).save(
            small / f"f{k:02d}.jpg", quality=90
        )
    return big, small


def bundle(work: Path) -> Path:
    data, out = work / "surfaces", work / "surfaces.bundle"
    if not (data / "example.json").exists():
        _cli("example", "surfaces", data, "--force")
    if not (out / "manifest.json").exists():
        _cli("fit", data, "--out", out, "--quiet", "--json")
    return out


def frame_cost(work: Path, repeats: int) -> dict:
    from edgetl import load_predictor

    big, small = frames(work)
    p = load_predictor(bundle(work))
    n = len(list(big.glob("*.jpg")))
    p.predict([small])  # warm: sessions, page cache
    per_frame, t_big, t_small = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        p.predict([small])
        t1 = time.perf_counter()
        p.predict([big])
        t2 = time.perf_counter()
        t_small.append((t1 - t0) / n)
        t_big.append((t2 - t1) / n)
        per_frame.append((t2 - t1 - (t1 - t0)) / n)
    return {
        "frames": n,
        "frame_size": list(FRAME),
        "repeats": repeats,
        "cores": os.cpu_count(),
        "extra_ms_per_5mp_frame": _spread(per_frame),
        "ms_per_5mp_frame": _spread(t_big),
        "ms_per_256px_frame": _spread(t_small),
        "decode_one_frame_single_thread": _decode_once(big),
    }


def _decode_once(folder: Path) -> dict:
    """Single-thread decode + resize + crop of one 5 MP JPEG: full decode against the sized one."""
    from edgetl.core import preprocess as pp

    cfg = pp.PreprocessConfig()
    path = sorted(folder.glob("*.jpg"))[0]
    out = {}
    ways = {"full": 0, "sized": None}
    if "need" not in pp.load_rgb.__code__.co_varnames:  # an older checkout: only the full decode exists
        ways = {"full": None}
    for name, need in ways.items():
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            im = pp.load_rgb(path) if need is None and name == "full" else pp.load_rgb(path, cfg=cfg, need=need)
            pp.to_tensor(pp.resize_crop(im, cfg), cfg)
            times.append(time.perf_counter() - t0)
        out[name] = _spread(times)
    return out


def _spread(values) -> dict:
    ms = [1000 * v for v in values]
    return {"median": round(statistics.median(ms), 1), "min": round(min(ms), 1), "max": round(max(ms), 1)}


def accuracy(work: Path, seeds) -> dict:
    from edgetl.core.features import load_input
    from edgetl.core.preprocess import load_rgb, resize_crop, to_tensor
    from edgetl.datasets.images import make_surfaces
    from edgetl.transfer._stats import train_linear_head

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _shared import backbone_session

    session, cfg = backbone_session("efficientnet_lite0")
    rows = []
    for seed in seeds:
        root = work / f"acc-{seed}"
        if not (root / "example.json").exists():
            make_surfaces(root, seed=seed, per_class=16, val_per_class=8, size=1600)
        res = {"seed": seed}
        for fmt in ("jpg", "png"):
            feats = {}
            split = {}
            for part in ("train", "val"):
                files = sorted((root / part).glob("*/*.png"))
                paths = []
                for f in files:
                    q = f.with_suffix(f".{fmt}") if fmt == "jpg" else f
                    if fmt == "jpg" and not q.exists():
                        Image.open(f).convert("RGB").save(q, quality=90)
                    paths.append(q)
                split[part] = [f.parent.name for f in files]
                full = np.stack([to_tensor(resize_crop(load_rgb(q, cfg=cfg, need=0), cfg), cfg) for q in paths])
                sized = np.stack([load_input(q, cfg) for q in paths])
                feats[part] = {"full": session(full), "sized": session(sized)}
            classes = sorted(set(split["train"]))
            y_tr = np.array([classes.index(c) for c in split["train"]])
            y_va = np.array([classes.index(c) for c in split["val"]])
            for way in ("full", "sized"):
                head = train_linear_head(feats["train"][way], y_tr, len(classes), seed=seed)
                pred = np.argmax(head.proba(feats["val"][way]), axis=1)
                res[f"{fmt}_{way}"] = round(float(np.mean(pred == y_va)), 4)
            res[f"{fmt}_n_val"] = int(len(y_va))
        rows.append(res)
    out = {"per_seed": rows}
    for fmt in ("jpg", "png"):
        d = [r[f"{fmt}_sized"] - r[f"{fmt}_full"] for r in rows]
        out[f"{fmt}_sized_minus_full"] = {
            "mean": round(float(np.mean(d)), 4),
            "min": round(min(d), 4),
            "max": round(max(d), 4),
        }
    out["note"] = (
        f"one validation image is 1/{rows[0]['jpg_n_val']} of accuracy; a paired difference within a few "
        "of those is noise"
    )
    return out


_PEAK = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "
    "(r.stderr.strip().splitlines() or [''])[-1][:160], sep='|')"
)


def crafted(work: Path) -> dict[str, Path]:
    """Files that cost far more than their size or pixel count suggests, under the default budget."""
    d = work / "crafted"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    made = {}

    def once(name, make):
        p = d / name
        if not p.exists():
            make(p)
        made[name] = p

    once("tiny.png", lambda p: Image.new("RGB", (64, 48), (90, 120, 30)).save(p))
    once("strip-1x10000.png", lambda p: Image.new("L", (1, 10_000), 77).save(p))
    once("strip-1x40000.png", lambda p: Image.new("L", (40_000, 1), 77).save(p))
    once("strip-1x63M.png", lambda p: Image.new("L", (63_000_000, 1), 77).save(p))
    once("strip-3x21M-rgb.png", lambda p: Image.new("RGB", (21_000_000, 3), (9, 99, 199)).save(p))
    once(
        "16bit-8000.png",
        lambda p: Image.fromarray(rng.integers(0, 65535, (8000, 8000), dtype=np.uint16)).save(p, compress_level=1),
    )
    once("float-8000.tiff", lambda p: Image.fromarray(rng.random((8000, 8000), dtype=np.float32), mode="F").save(p))
    once(
        "rgba-8000.png",
        lambda p: Image.fromarray(rng.integers(0, 255, (8000, 8000, 4), dtype=np.uint8), "RGBA").save(
            p, compress_level=1
        ),
    )
    once(
        "jpeg-8000.jpg",
        lambda p: Image.fromarray(rng.integers(0, 255, (8000, 8000, 3), dtype=np.uint8)).save(p, quality=90),
    )
    return made


def memory(work: Path) -> dict:
    """Peak resident memory of ``edgetl predict BUNDLE FILE --json`` per crafted file (a process each)."""
    b = bundle(work)
    out = {}
    for name, path in crafted(work).items():
        r = subprocess.run(
            [sys.executable, "-c", _PEAK, sys.executable, "-m", "edgetl.cli", "predict", str(b), str(path), "--json"],
            capture_output=True,
            text=True,
        )
        rc, peak, last = r.stdout.strip().split("|", 2)
        out[name] = {
            "exit": int(rc),
            "peak_mb": round(int(peak) / 1e6),
            "bytes_on_disk": path.stat().st_size,
            "message": last if int(rc) or "warning" in last else "",
        }
    return out


def serve_throughput(work: Path, repeats: int, clients: int = 4, requests: int = 40) -> dict:
    """``edgetl serve`` (batching on, its default) answering ``clients`` clients that upload the 5 MP
    JPEGs, then the 256 px ones: requests per second, median and range over ``repeats``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serve import Service, load_run, summary

    big, small = frames(work)
    svc = Service(bundle(work), work / f"review-{time.time_ns()}", "--max-batch", "8")
    try:
        out = {"clients": clients}
        for name, folder in (("5mp_jpeg", big), ("256px_jpeg", small)):
            payloads = [p.read_bytes() for p in sorted(folder.glob("*.jpg"))]
            load_run(svc, payloads, 8, 1)  # warm-up
            out[name] = summary([load_run(svc, payloads, requests, clients) for _ in range(repeats)])
        return out
    finally:
        svc.stop()


def main() -> None:
    _provenance.stamp()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/decode-bench"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-frames", action="store_true")
    ap.add_argument("--memory", action="store_true", help="also: peak memory of predict on crafted files")
    ap.add_argument("--serve", action="store_true", help="also: edgetl serve's throughput on 5 MP uploads")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    import edgetl

    result = {"edgetl": str(Path(edgetl.__file__).parent)}
    if not a.skip_frames:
        result["frame_cost"] = frame_cost(a.work, a.repeats)
    if not a.skip_accuracy:
        result["accuracy"] = accuracy(a.work, a.seeds)
    if a.serve:
        result["serve"] = serve_throughput(a.work, a.repeats)
    if a.memory:
        result["predict_peak_memory"] = memory(a.work)
    if a.json:
        print(json.dumps(result))
        return
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
