"""Know when transfer works: backbone ranking (LogME vs cross-validated accuracy) and negative transfer.

    .venv/bin/python benchmarks/transfer.py [--work /tmp/transfer-work] [--seeds 5] [--json]

Datasets built from packaged images (deterministic), each with a *pool* to train from and a *test*
set of unseen images:

* ``surfaces``: edgetl's built-in example (8 materials; test crops from parts of each photograph
  no training crop touches);
* ``digits``: scikit-learn's handwritten digits (10 classes), upscaled 8 -> 64 px;
* ``faces``: ``skimage.data.lfw_subset`` (face / non-face, 25 -> 96 px);
* ``photos``: which of 10 scikit-image photographs a small crop comes from (train crops from the
  left 55 % of each photograph, test crops from the right 40 %);
* ``orientation``: crops of 9 upright photographs turned by 0 / 90 / 180 / 270 degrees (4 classes;
  train and test crops from disjoint halves);
* ``spectro``, ``noise``, ``pixnoise``: the synthetic classes of :mod:`edgetl.datasets.synthetic`.

Per dataset and seed, ``--per-class`` images of each class are drawn from the pool. On them:
LogME and 5-fold cross-validated accuracy (edgetl's linear head) for EfficientNet-Lite0/1/2 (FP32
ONNX Runtime features), the held-out accuracy of a head trained on all of them on the test set,
Kendall's tau-b between each score's ranking and the held-out ranking, and the "auto" choice
(:func:`edgetl.transfer.rank.choose_backbone`, with and without a latency budget that excludes
Lite2) with its regret against the best held-out backbone within the budget. The negative-transfer
check compares Lite0's head with the pixel baseline's head on the same split; and on edgetl's
built-in example exactly as ``edgetl example surfaces DIR`` writes it (three example seeds, the
train / val split ``fit`` uses).

Features are cached as .npy under ``--work`` (and in edgetl's feature cache), so a rerun runs no
backbone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import _provenance  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
import _shared as F
import numpy as np
from PIL import Image

from edgetl.datasets.images import make_surfaces
from edgetl.datasets.synthetic import noise_textures, pixel_noise, spectrograms
from edgetl.transfer._stats import kendall_tau_b
from edgetl.transfer.negative import compare_to_baseline, pixel_baseline_features
from edgetl.transfer.rank import choose_backbone, cv_accuracy, score_backbones

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
SHORT = {"efficientnet_lite0": "lite0", "efficientnet_lite1": "lite1", "efficientnet_lite2": "lite2"}


# ----- datasets ------------------------------------------------------------------------------------


def _save(arr: np.ndarray, path: Path, size: int | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.ascontiguousarray(arr))
    if im.mode != "RGB":
        im = im.convert("RGB")
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    im.save(path)
    return str(path)


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8) if a.max() <= 1.0 else a.astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return a[..., :3]


def _skimage(name: str) -> np.ndarray:
    from skimage import data as skdata

    if name == "motorcycle":
        return _rgb(skdata.stereo_motorcycle()[0])
    return _rgb(getattr(skdata, name)())


def _crop(img: np.ndarray, rng, x_range: tuple[float, float], frac: tuple[float, float]) -> tuple[np.ndarray, int]:
    """A random square crop inside the horizontal band ``x_range`` (fractions of the width), and
    which third of that band its centre lies in."""
    H, W = img.shape[:2]
    w = int(rng.uniform(*frac) * min(H, W))
    x0, x1 = int(x_range[0] * W), int(x_range[1] * W) - w
    x = int(rng.integers(x0, max(x0, x1) + 1))
    y = int(rng.integers(0, H - w + 1))
    band = (x + w / 2 - x_range[0] * W) / ((x_range[1] - x_range[0]) * W)
    return img[y : y + w, x : x + w], min(2, max(0, int(3 * band)))


def build_surfaces(root: Path) -> dict:
    """The built-in example; group = which third of its source region (along the longer side) a
    training crop's centre lies in, so grouped folds hold out a part of the photograph, as the test does."""
    if not (root / "raw" / "example.json").is_file():
        make_surfaces(root / "raw", seed=0, per_class=48, val_per_class=48)
    meta = json.loads((root / "raw" / "example.json").read_text())
    classes = list(meta["classes"])
    out = {"classes": classes, "pool": [], "test": []}
    for item in meta["items"]:
        label = classes.index(item["label"])
        path = str(root / "raw" / item["file"])
        if item["split"] == "val":
            out["test"].append((path, label))
            continue
        x0, y0, x1, y1 = meta["sources"][item["label"]]["train_region"]
        bx0, by0, bx1, by1 = item["box"]
        if x1 - x0 >= y1 - y0:
            t = ((bx0 + bx1) / 2 - x0) / (x1 - x0)
        else:
            t = ((by0 + by1) / 2 - y0) / (y1 - y0)
        out["pool"].append((path, label, f"{item['label']}/tile{min(2, max(0, int(3 * t)))}"))
    out["pool"].sort()
    out["test"].sort()
    return out


def build_digits(root: Path) -> dict:
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(d.target))
    pool_idx, test_idx = order[:800], order[800:1300]
    out = {"classes": [str(c) for c in range(10)], "pool": [], "test": []}
    for side, idx in (("pool", pool_idx), ("test", test_idx)):
        for i in idx:
            arr = (d.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
            out[side].append((_save(arr, root / side / f"{d.target[i]}" / f"d{i:04d}.png", 64), int(d.target[i])))
    return out


def build_faces(root: Path) -> dict:
    from skimage import data as skdata

    imgs = skdata.lfw_subset()  # 100 faces, then 100 non-faces
    labels = np.array([0] * 100 + [1] * 100)
    rng = np.random.default_rng(0)
    out = {"classes": ["face", "nonface"], "pool": [], "test": []}
    for c in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for side, part in (("pool", idx[:50]), ("test", idx[50:])):
            for i in part:
                out[side].append((_save(_rgb(imgs[i]), root / side / str(c) / f"f{i:03d}.png", 96), c))
    return out


PHOTOS = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "rocket",
    "motorcycle",
    "hubble_deep_field",
    "retina",
    "cell",
    "coins",
)
UPRIGHT = ("astronaut", "camera", "chelsea", "coffee", "rocket", "motorcycle", "page", "text", "clock")


def build_photos(root: Path) -> dict:
    rng = np.random.default_rng(0)
    out = {"classes": list(PHOTOS), "pool": [], "test": []}
    for c, name in enumerate(PHOTOS):
        img = _skimage(name)
        for side, xr in (("pool", (0.0, 0.55)), ("test", (0.6, 1.0))):
            for i in range(30):
                crop, tile = _crop(img, rng, xr, (0.12, 0.25))
                entry = (_save(crop, root / side / name / f"{i:03d}.png", 96), c)
                out[side].append(entry + ((f"{name}/tile{tile}",) if side == "pool" else ()))
    return out


def build_orientation(root: Path) -> dict:
    rng = np.random.default_rng(0)
    out = {"classes": ["rot0", "rot90", "rot180", "rot270"], "pool": [], "test": []}
    for name in UPRIGHT:
        img = _skimage(name)
        for side, xr in (("pool", (0.0, 0.55)), ("test", (0.55, 1.0))):
            for i in range(16):
                k = i % 4
                crop = np.rot90(_crop(img, rng, xr, (0.35, 0.55))[0], k)
                entry = (_save(crop, root / side / f"rot{90 * k}" / f"{name}_{i:02d}.png", 96), k)
                out[side].append(entry + ((name,) if side == "pool" else ()))
    return out


def _synthetic(fn, names):
    def build(root: Path) -> dict:
        out = {"classes": list(names), "pool": [], "test": []}
        for side, seed in (("pool", 0), ("test", 1)):
            imgs, y = fn(40, seed=seed)
            for i, (a, c) in enumerate(zip(imgs, y)):
                out[side].append((_save(a, root / side / str(int(c)) / f"{i:04d}.png"), int(c)))
        return out

    return build


DATASETS = {
    "surfaces": (build_surfaces, 24),
    "digits": (build_digits, 20),
    "faces": (build_faces, 20),
    "photos": (build_photos, 15),
    "orientation": (build_orientation, 24),
    "spectro": (_synthetic(spectrograms, [f"tone{i}" for i in range(8)]), 20),
    "noise": (_synthetic(noise_textures, [f"band{i}" for i in range(6)]), 20),
    "pixnoise": (_synthetic(pixel_noise, ["normal", "uniform", "laplace", "twolevel", "skew+", "skew-"]), 20),
}


def dataset(work: Path, name: str) -> dict:
    root = work / "data" / name
    index = root / "index.json"
    if index.is_file():
        return json.loads(index.read_text())
    t0 = time.perf_counter()
    d = DATASETS[name][0](root)
    index.write_text(json.dumps(d))
    print(
        f"[{name}] built {len(d['pool'])} pool + {len(d['test'])} test images in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    return d


# ----- features ------------------------------------------------------------------------------------


def _digest(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()[:12]


def cached(work: Path, tag: str, paths: list[str], compute) -> np.ndarray:
    f = work / "features" / f"{tag}-{_digest(paths)}.npy"
    if f.is_file():
        return np.load(f, allow_pickle=False)
    t0 = time.perf_counter()
    X = compute(paths)
    f.parent.mkdir(parents=True, exist_ok=True)
    np.save(f, X, allow_pickle=False)
    print(f"[{tag}] {len(paths)} images in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return X


def features(work: Path, name: str, d: dict, backbone: str) -> tuple[np.ndarray, np.ndarray]:
    paths = [e[0] for e in d["pool"]] + [e[0] for e in d["test"]]
    X = cached(work, f"{name}-{backbone}", paths, lambda ps: F.backbone_features(ps, backbone))
    return X[: len(d["pool"])], X[len(d["pool"]) :]


def baseline_features(work: Path, name: str, d: dict) -> tuple[np.ndarray, np.ndarray]:
    paths = [e[0] for e in d["pool"]] + [e[0] for e in d["test"]]
    X = cached(work, f"{name}-pixels", paths, lambda ps: pixel_baseline_features(F.read_rgb(p) for p in ps))
    return X[: len(d["pool"])], X[len(d["pool"]) :]


def latencies(work: Path, remeasure: bool = False) -> dict:
    """Batch-1 FP32 ONNX Runtime latency of each backbone on this machine (model only, median)."""
    f = work / "latency.json"
    if f.is_file() and not remeasure:
        return json.loads(f.read_text())
    out = {}
    for b in BACKBONES:
        session, pre = F.backbone_session(b)
        x = np.zeros((1, 3, pre.input_size, pre.input_size), np.float32)
        for _ in range(5):
            session(x)
        times = []
        for _ in range(40):
            t0 = time.perf_counter()
            session(x)
            times.append(1000 * (time.perf_counter() - t0))
        out[b] = round(float(np.median(times)), 2)
    f.write_text(json.dumps(out))
    return out


# ----- experiments ---------------------------------------------------------------------------------


def draw(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(
        np.concatenate(
            [
                rng.choice(np.flatnonzero(y == c), min(per_class, int(np.sum(y == c))), replace=False)
                for c in np.unique(y)
            ]
        )
    )


def heldout_accuracy(Xtr, ytr, Xte, yte, k: int, seed: int) -> float:
    head = F.train_linear_head(Xtr, ytr, k, seed=seed)
    return float(np.mean(head.predict(Xte) == yte))


def run_dataset(work: Path, name: str, seeds: int, lat: dict, budget: float) -> dict:
    d = dataset(work, name)
    k = len(d["classes"])
    y_pool = np.array([e[1] for e in d["pool"]])
    y_test = np.array([e[1] for e in d["test"]])
    g_pool = np.array([e[2] for e in d["pool"]]) if len(d["pool"][0]) > 2 else None
    feats = {b: features(work, name, d, b) for b in BACKBONES}
    base_pool, base_test = baseline_features(work, name, d)
    per_class = DATASETS[name][1]
    runs = []
    for seed in range(seeds):
        idx = draw(y_pool, per_class, seed)
        ytr = y_pool[idx]
        t0 = time.perf_counter()
        groups = None if g_pool is None else g_pool[idx]
        scores = score_backbones(
            {b: feats[b][0][idx] for b in BACKBONES}, ytr, groups, latency_ms=lat, seed=seed, bootstrap=30
        )
        t_score = time.perf_counter() - t0
        plain_cv = (
            {b: cv_accuracy(feats[b][0][idx], ytr, seed=seed).accuracy for b in BACKBONES}
            if groups is not None
            else None
        )
        held = {b: heldout_accuracy(feats[b][0][idx], ytr, feats[b][1], y_test, k, seed) for b in BACKBONES}
        run = {
            "seed": seed,
            "n_train": len(idx),
            "n_test": len(y_test),
            "score_seconds": round(t_score, 2),
            "logme": {s.name: s.logme for s in scores},
            "logme_sd": {s.name: s.logme_sd for s in scores},
            "cv": {s.name: s.cv.accuracy for s in scores},
            "cv_interval": {s.name: [s.cv.lower, s.cv.upper] for s in scores},
            "heldout": held,
            "tau_logme": kendall_tau_b([s.logme for s in scores], [held[s.name] for s in scores]),
            "tau_cv": kendall_tau_b([s.cv.accuracy for s in scores], [held[s.name] for s in scores]),
            "grouped": groups is not None,
            "choices": {},
        }
        if plain_cv is not None:
            run["cv_ungrouped"] = plain_cv
            run["tau_cv_ungrouped"] = kendall_tau_b([plain_cv[b] for b in BACKBONES], [held[b] for b in BACKBONES])
        for by in ("cv", "logme"):
            for label, b_ms in (("none", None), ("budget", budget)):
                r = choose_backbone(scores, by=by, budget_ms=b_ms)
                allowed = [b for b in BACKBONES if b_ms is None or lat[b] <= b_ms]
                best = max(held[b] for b in allowed)
                run["choices"][f"{by}/{label}"] = {
                    "choice": r.choice,
                    "leader": r.leader,
                    "regret_pp": round(100 * (best - held[r.choice]), 2),
                    "leader_regret_pp": round(100 * (best - held[r.leader]), 2),
                    "regret_vs_overall_best_pp": round(100 * (max(held.values()) - held[r.choice]), 2),
                }
        chk = compare_to_baseline(
            feats[BACKBONES[0]][0][idx],
            feats[BACKBONES[0]][1],
            base_pool[idx],
            base_test,
            ytr,
            y_test,
            seed=seed,
            backbone="efficientnet_lite0",
        )
        run["negative"] = chk.to_dict()
        runs.append(run)
        print(
            f"[{name}] seed {seed}: held-out "
            + ", ".join(f"{SHORT[b]} {100 * held[b]:.1f}" for b in BACKBONES)
            + f"; tau LogME {run['tau_logme']:.2f} CV {run['tau_cv']:.2f}; transfer {chk.verdict}",
            file=sys.stderr,
        )
    return {"dataset": name, "classes": d["classes"], "per_class": per_class, "runs": runs}


def example_check(work: Path, seeds: int = 3) -> list[dict]:
    """The negative-transfer check on edgetl's built-in example, as `edgetl example surfaces DIR` writes it."""
    out = []
    for seed in range(seeds):
        root = work / "data" / f"example-surfaces-s{seed}"
        if not (root / "example.json").is_file():
            make_surfaces(root, seed=seed)  # the CLI's defaults: 48 train + 16 val per class
        ds = F.image_folder(root)
        tr = [str(p) for p in ds["train_paths"]]
        va = [str(p) for p in ds["val_paths"]]
        X = cached(
            work,
            f"example-s{seed}-efficientnet_lite0",
            tr + va,
            lambda ps: F.backbone_features(ps, "efficientnet_lite0"),
        )
        B = cached(
            work, f"example-s{seed}-pixels", tr + va, lambda ps: pixel_baseline_features(F.read_rgb(p) for p in ps)
        )
        n = len(tr)
        chk = compare_to_baseline(X[:n], X[n:], B[:n], B[n:], ds["y_train"], ds["y_val"], backbone="efficientnet_lite0")
        out.append({"example_seed": seed, "n_train": n, "n_val": len(va), **chk.to_dict()})
        print(
            f"[example surfaces seed {seed}] {chk.verdict}: {100 * chk.transfer_accuracy:.1f} vs "
            f"{100 * chk.baseline_accuracy:.1f}",
            file=sys.stderr,
        )
    return out


# ----- report --------------------------------------------------------------------------------------


def _ms(values) -> str:
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], float)
    if not len(v):
        return "n/a"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def _pct(values) -> str:
    v = 100 * np.asarray(values, float)
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def _tau(values) -> str:
    v = np.asarray(values, float)
    ok = v[~np.isnan(v)]
    if not len(ok):
        return "n/a (held-out ties)"
    return f"{ok.mean():+.2f} ({len(ok)}/{len(v)} defined)"


def report(results: list[dict], lat: dict, budget: float, example: list[dict]) -> str:
    L = []
    L.append(
        "Latency (FP32 ONNX Runtime, batch 1, model only, median ms): "
        + ", ".join(f"{SHORT[b]} {lat[b]}" for b in BACKBONES)
        + f"; budget for the budgeted choice {budget:.1f} ms"
    )
    L.append("")
    L.append(
        "Mean ± sd over seeds (each seed draws other training images from the pool; the test set is fixed). "
        "CV: 5-fold, grouped where the dataset has groups (ungrouped CV in brackets)."
    )
    L.append("")
    L.append("| dataset | n train / test | backbone | LogME | CV accuracy % | held-out accuracy % |")
    L.append("|---|---|---|---|---|---|")
    for r in results:
        runs = r["runs"]
        for b in BACKBONES:
            cv = _pct([x["cv"][b] for x in runs])
            if runs[0]["grouped"]:
                cv = f"{cv} (grouped) [{_pct([x['cv_ungrouped'][b] for x in runs])}]"
            L.append(
                f"| {r['dataset']} | {runs[0]['n_train']} / {runs[0]['n_test']} | {SHORT[b]} | "
                f"{_ms([x['logme'][b] for x in runs])} | {cv} | "
                f"{_pct([x['heldout'][b] for x in runs])} |"
            )
    L.append("")
    L.append(
        "| dataset | Kendall tau LogME vs held-out | Kendall tau CV vs held-out | auto (cv) choices "
        "| max regret pp (cv / cv+budget) | auto (logme) choices | max regret pp (logme / logme+budget) "
        "| leader-only max regret pp (cv / logme) |"
    )
    L.append("|---|---|---|---|---|---|---|---|")
    for r in results:
        runs = r["runs"]

        def counts(key, runs=runs):
            c = Counter(SHORT[x["choices"][key]["choice"]] for x in runs)
            return " ".join(f"{k}x{v}" for k, v in sorted(c.items()))

        def mx(key, field="regret_pp", runs=runs):
            return max(x["choices"][key][field] for x in runs)

        tcv = _tau([x["tau_cv"] for x in runs])
        if runs[0]["grouped"]:
            tcv += f" grouped [{_tau([x['tau_cv_ungrouped'] for x in runs])} ungrouped]"
        L.append(
            f"| {r['dataset']} | {_tau([x['tau_logme'] for x in runs])} | {tcv} | "
            f"{counts('cv/none')} | {mx('cv/none'):.1f} / {mx('cv/budget'):.1f} | {counts('logme/none')} | "
            f"{mx('logme/none'):.1f} / {mx('logme/budget'):.1f} | "
            f"{max(mx('cv/none', 'leader_regret_pp'), mx('cv/budget', 'leader_regret_pp')):.1f} / "
            f"{max(mx('logme/none', 'leader_regret_pp'), mx('logme/budget', 'leader_regret_pp')):.1f} |"
        )
    L.append("")
    L.append(
        "| dataset | lite0 held-out % | pixel baseline % | difference pp (mean, seed-0 bounds) | verdicts over seeds |"
    )
    L.append("|---|---|---|---|---|")
    for r in results:
        runs = r["runs"]
        v = Counter(x["negative"]["verdict"] for x in runs)
        n0 = runs[0]["negative"]
        L.append(
            f"| {r['dataset']} | {_pct([x['negative']['transfer_accuracy'] for x in runs])} | "
            f"{_pct([x['negative']['baseline_accuracy'] for x in runs])} | "
            f"{np.mean([x['negative']['difference_pp'] for x in runs]):+.1f} "
            f"[{n0['lower_pp']:+.1f}, {n0['upper_pp']:+.1f}] | " + ", ".join(f"{k} x{c}" for k, c in v.items()) + " |"
        )
    for e in example:
        L.append(
            f"| example surfaces (seed {e['example_seed']}, {e['n_train']} train / {e['n_val']} val) | "
            f"{100 * e['transfer_accuracy']:.1f} | {100 * e['baseline_accuracy']:.1f} | "
            f"{e['difference_pp']:+.1f} [{e['lower_pp']:+.1f}, {e['upper_pp']:+.1f}] | {e['verdict']} |"
        )
    return "\n".join(L)


def main(argv=None) -> int:
    _provenance.stamp()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/transfer-work"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--remeasure-latency", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the full results as one JSON object")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    lat = latencies(args.work, args.remeasure_latency)
    budget = 0.5 * (lat[BACKBONES[1]] + lat[BACKBONES[2]])  # Lite0 and Lite1 fit, Lite2 does not
    results = [run_dataset(args.work, n, args.seeds, lat, budget) for n in args.datasets.split(",") if n]
    example = example_check(args.work)
    text = report(results, lat, budget, example)
    payload = {"latency_ms": lat, "budget_ms": budget, "datasets": results, "example": example}
    (args.work / "transfer-results.json").write_text(json.dumps(payload, indent=1, default=float))
    (args.work / "transfer-results.md").write_text(text + "\n")
    print(json.dumps(payload, default=float) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
