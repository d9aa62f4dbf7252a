"""Honest numbers on small data: ``edgetl fit`` with defaults against the script a user would write.

    .venv/bin/python benchmarks/small_data.py [--seeds 3] [--per-class 20] [--test 1000] [--json]
    .venv/bin/python benchmarks/small_data.py --shots 1,3,5,10,20 [--seeds 3] [--test 500] [--int8] [--text]

``--shots``: one fit per (images a class, seed) through the library's default ``fit`` (the head
kind, L2 and temperature chosen out of fold), printing per setting: accuracy on unseen images,
a plain logistic regression (scikit-learn defaults) and a nearest-class-mean (Euclidean) on the
same FP32 features of all the fit's images (the references), the fit's own estimate (out of fold)
with its 95 % interval and whether the interval holds the unseen accuracy, the calibration error
(ECE, 10 bins) on unseen images, and the share flagged ``ood``: of 19 scikit-image photographs
(astronaut, cat, coffee, bricks, rocket ...: nothing like a digit) and of the unseen digits. The
features are FP32 on ONNX Runtime (``cpu-x86 --precision fp32``) so the sweep runs in minutes
(cached across seeds); ``--int8`` fits the default INT8 profile instead (a conversion per draw).
``--text``: the same calibration figure for a text classifier (the tickets generator's held-out
templates as unseen texts).

Data nobody here tuned to: scikit-learn's handwritten digits (1,797 real images, 10 classes),
upscaled to 64 x 64. Per seed, ``--per-class`` images of each class are drawn for fitting (the
default split then holds 20 % out for validation) and ``--test`` *other* images are the unseen
test set. Two pipelines, timed end to end with the FP32 export already cached:

* **edgetl**: ``edgetl fit DATA --out B`` (defaults: openvino-cpu INT8, linear head), then
  ``edgetl eval B TEST``;
* **user script**: what a practitioner writes instead: timm features in torch (FP32), scikit-learn
  ``LogisticRegression`` on the same training images, NNCF's default INT8 to OpenVINO calibrated
  on those images, and the FP32-trained head applied to the INT8 features of the test images.

Printed: test accuracy (mean and range over seeds) and wall time of each, the fit's stage
breakdown, and the gate's verdict. Several seeds, because one 200-image draw moves test accuracy
by a few points.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _provenance  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def write_digits(root: Path, idx: np.ndarray, images: np.ndarray, labels: np.ndarray) -> Path:
    """Digits as 64 x 64 RGB PNGs in ``root/<class>/``: 8 x 8 images at 16 grey levels, upscaled
    bilinearly (nearest neighbour would hand the backbone 8 px blocks)."""
    for i in idx:
        out = root / str(labels[i]) / f"d{i:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        arr = (images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).resize((64, 64), Image.BILINEAR).convert("RGB").save(out)
    return root


def draw(seed: int, per_class: int, n_test: int, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    fit_idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)])
    rest = np.setdiff1d(np.arange(len(labels)), fit_idx)
    return fit_idx, rng.choice(rest, min(n_test, len(rest)), replace=False)


def edgetl_run(data: Path, test: Path, work: Path, cache: Path, extra: list[str]) -> dict:
    cli = [sys.executable, "-m", "edgetl.cli"]
    env = {"EDGETL_CACHE": str(cache), "PATH": "/usr/bin:/bin"}
    t0 = time.perf_counter()
    fit = subprocess.run(
        [*cli, "fit", str(data), "--out", str(work / "b"), "--force", "--json", "--quiet", *extra],
        capture_output=True,
        text=True,
        env=env,
    )
    t_fit = time.perf_counter() - t0
    if fit.returncode not in (0,):
        return {
            "error": fit.stderr.strip().splitlines()[-1] if fit.stderr.strip() else f"exit {fit.returncode}",
            "exit": fit.returncode,
            "fit_s": t_fit,
        }
    ev = subprocess.run(
        [*cli, "eval", str(work / "b"), str(test), "--json", "--quiet"], capture_output=True, text=True, env=env
    )
    out = json.loads(fit.stdout)
    return {
        "test_accuracy": json.loads(ev.stdout)["accuracy"],
        "fit_s": t_fit,
        "stages_s": out["timings_s"],
        "gate": out["gate"]["verdict"],
        "val_accuracy": out["val"]["accuracy"],
        "val_n": out["val"]["n"],
    }


def user_script(data: Path, test: Path, work: Path) -> dict:
    """A practitioner's version, in this process: torch + timm + scikit-learn + NNCF defaults."""
    import nncf
    import openvino as ov
    import timm
    import torch
    from sklearn.linear_model import LogisticRegression

    from edgetl.export import resolve
    from edgetl.export.image import build_model, weight_source

    t0 = time.perf_counter()
    torch.set_num_threads(2)
    spec = resolve("efficientnet_lite0")  # the same weights (their key mapping is edgetl's)
    model = build_model(spec, weight_source(spec)).eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    tf = timm.data.create_transform(**cfg)

    def batch(paths):
        return torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])

    train = sorted(data.rglob("*.png"))
    y = np.array([int(p.parent.name) for p in train])
    with torch.no_grad():
        X = np.concatenate([model(batch(train[i : i + 32])).numpy() for i in range(0, len(train), 32)])
    clf = LogisticRegression(max_iter=2000).fit(X, y)
    ov_model = ov.convert_model(model, example_input=batch(train[:1]))
    calib = [batch([p]).numpy() for p in train]
    q = nncf.quantize(ov_model, nncf.Dataset(calib))
    compiled = ov.Core().compile_model(q, "CPU")
    tests = sorted(test.rglob("*.png"))
    yt = np.array([int(p.parent.name) for p in tests])
    F = np.concatenate([compiled(batch(tests[i : i + 32]).numpy())[0] for i in range(0, len(tests), 32)])
    acc = float(np.mean(clf.predict(F) == yt))
    return {"test_accuracy": round(acc, 4), "fit_s": time.perf_counter() - t0}


PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "brick",
    "rocket",
    "camera",
    "grass",
    "gravel",
    "moon",
    "page",
    "text",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "colorwheel",
    "retina",
    "cell",
    "clock",
    "coins",
)


def write_photos(root: Path) -> list[Path]:
    """scikit-image's sample photographs and textures as PNGs: inputs unlike any digit."""
    import skimage.data as sk

    root.mkdir(parents=True, exist_ok=True)
    out = []
    for name in PHOTOS:
        a = np.asarray(getattr(sk, name)())
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        elif a.dtype != np.uint8:
            a = (255 * (a - a.min()) / max(float(a.max() - a.min()), 1e-9)).astype(np.uint8)
        path = root / f"{name}.png"
        Image.fromarray(a[..., :3] if a.ndim == 3 else a).convert("RGB").save(path)
        out.append(path)
    return out


def ece(P: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    conf, right = P.max(axis=1), P.argmax(axis=1) == y
    which = np.minimum((conf * bins).astype(int), bins - 1)
    return float(
        sum(
            (which == b).sum() * abs(right[which == b].mean() - conf[which == b].mean())
            for b in range(bins)
            if (which == b).any()
        )
        / len(y)
    )


def shot_run(
    digits, per_class: int, seed: int, n_test: int, work: Path, cache: Path, photos: list[Path], int8: bool, exported
) -> dict:
    """One default fit on ``per_class`` digits a class, scored on unseen digits and photographs."""
    from sklearn.linear_model import LogisticRegression

    from edgetl.device.predict import load_predictor
    from edgetl.pipeline.fit import FitOptions, fit

    fit_idx, test_idx = draw(seed, per_class, n_test, digits.target)
    root = work / f"k{per_class}-s{seed}"
    data = write_digits(root / "fit", fit_idx, digits.images, digits.target)
    test = write_digits(root / "test", test_idx, digits.images, digits.target)
    profile = {} if int8 else {"target": "cpu-x86", "precision": "fp32"}
    t0 = time.perf_counter()
    r = fit(
        data,
        root / "b",
        options=FitOptions(cache_dir=str(cache), quiet=True, head_auto=True, allow_drop=True, **profile),
        force=True,
    )
    fit_s = time.perf_counter() - t0
    pred = load_predictor(r.bundle.path)
    tests = sorted(test.rglob("*.png"))
    yt = np.array([pred.labels.index(p.parent.name) for p in tests])
    P = pred.proba(tests)
    unseen = pred.predict(tests)
    far = pred.predict(photos)
    # the references: FP32 features (ONNX Runtime) of all the fit's images; an FP32 bundle's own extractor is that
    feats = (
        pred.extractor
        if not int8
        else r.task.extractor(exported.path, exported, runtime="onnxruntime", device="CPU", providers=None)
    )
    fit_paths = sorted(data.rglob("*.png"))
    X = feats.features(fit_paths)
    y = np.array([pred.labels.index(p.parent.name) for p in fit_paths])
    Xt = feats.features(tests)
    lr = LogisticRegression(max_iter=5000).fit(X, y)
    means = np.stack([X[y == c].mean(axis=0) for c in range(len(pred.labels))])
    ncm = np.argmin(((Xt[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    m = r.metrics
    acc = float(np.mean(P.argmax(axis=1) == yt))
    lo_hi = m.get("accuracy_interval") if m else None
    return {
        "per_class": per_class,
        "seed": seed,
        "unseen": acc,
        "logreg": float(np.mean(lr.predict(Xt) == yt)),
        "ncm": float(np.mean(ncm == yt)),
        "estimate": m.get("accuracy") if m else None,
        "interval": lo_hi,
        "covered": bool(lo_hi and lo_hi[0] <= acc <= lo_hi[1]),
        "estimate_kind": (m or {}).get("estimate"),
        "head": r.bundle.head_entry()["kind"],
        "ece": ece(P, yt),
        "ood_photos": float(np.mean([p.ood for p in far])) if far[0].ood is not None else None,
        "ood_unseen": float(np.mean([p.ood for p in unseen])) if unseen[0].ood is not None else None,
        "fit_s": fit_s,
    }


def sweep(args) -> None:
    from sklearn.datasets import load_digits

    from edgetl.export import export_backbone

    digits = load_digits()
    work = Path(tempfile.mkdtemp(prefix="edgetl-shots-"))
    cache = Path(args.cache) if args.cache else work / "cache"
    exported = export_backbone("efficientnet_lite0", cache_dir=cache)
    photos = write_photos(work / "photos")
    rows = []
    for k in [int(v) for v in args.shots.split(",")]:
        for seed in range(args.seeds):
            row = shot_run(digits, k, seed, args.test, work, cache, photos, args.int8, exported)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    text = text_calibration(work, cache, args.seeds) if args.text else None
    if args.json:
        print(json.dumps({"rows": rows, "text": text}, indent=2))
        return
    print(
        f"digits 64 px, {args.test} unseen digits and {len(PHOTOS)} unrelated photographs per run, "
        f"{args.seeds} seeds, {'INT8 default profile' if args.int8 else 'FP32 features (cpu-x86 fp32)'}"
    )
    print(
        f"{'a class':>7} {'fit unseen':>16} {'logreg':>7} {'ncm':>7} {'estimate (OOF)':>15} {'covers':>7} "
        f"{'ECE':>6} {'ood photos':>10} {'ood unseen':>10} {'heads'}"
    )
    for k in sorted({r["per_class"] for r in rows}):
        g = [r for r in rows if r["per_class"] == k]
        mean = lambda key: (
            float(np.mean([r[key] for r in g if r[key] is not None]))
            if any(  # noqa: E731
                r[key] is not None for r in g
            )
            else float("nan")
        )
        spread = max(r["unseen"] for r in g) - min(r["unseen"] for r in g)
        print(
            f"{k:>7} {mean('unseen'):>9.3f} +-{spread / 2:.3f} {mean('logreg'):>7.3f} {mean('ncm'):>7.3f} "
            f"{mean('estimate'):>15.3f} {sum(r['covered'] for r in g):>4}/{len(g)} {mean('ece'):>6.3f} "
            f"{mean('ood_photos'):>10.2f} {mean('ood_unseen'):>10.3f} {','.join(sorted({r['head'] for r in g}))}"
        )
    if text:
        print(
            f"text (tickets, held-out templates): ECE {np.mean(text['ece']):.3f} (per seed "
            f"{', '.join(f'{v:.3f}' for v in text['ece'])}), accuracy {np.mean(text['accuracy']):.3f}"
        )


def text_calibration(work: Path, cache: Path, seeds: int) -> dict:
    """ECE of a default text fit on unseen texts: the held-out templates' rows are the holdout."""
    from edgetl.datasets.tickets import make_tickets
    from edgetl.pipeline.fit import FitOptions, fit

    out = {"ece": [], "accuracy": []}
    for seed in range(seeds):
        make_tickets(work / f"t{seed}", seed=seed, per_class=20, val_per_class=40, force=True)
        r = fit(
            work / f"t{seed}" / "tickets.csv",
            work / f"t{seed}" / "b",
            force=True,
            options=FitOptions(
                cache_dir=str(cache), quiet=True, head_auto=True, precision="fp32", target="cpu-x86", allow_drop=True
            ),
        )
        out["ece"].append(r.metrics["ece"])
        out["accuracy"].append(r.metrics["accuracy"])
    return out


def main() -> None:
    _provenance.stamp()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shots", help="images a class to sweep, e.g. 1,3,5,10,20 (the default fit per setting)")
    ap.add_argument("--int8", action="store_true", help="--shots: fit the default INT8 profile (slower)")
    ap.add_argument("--text", action="store_true", help="--shots: also a text classifier's calibration error")
    ap.add_argument("--cache", help="a feature cache to reuse")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--edgetl-args", default="", help="extra arguments for edgetl fit, e.g. '--calibration-size 300'")
    ap.add_argument("--no-user-script", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.shots:
        sweep(args)
        return

    from sklearn.datasets import load_digits

    from edgetl.export import export_backbone

    digits = load_digits()
    work = Path(tempfile.mkdtemp(prefix="edgetl-small-data-"))
    cache = work / "cache"
    export_backbone("efficientnet_lite0", cache_dir=cache)  # warm export, as the target is stated
    rows = []
    for seed in range(args.seeds):
        fit_idx, test_idx = draw(seed, args.per_class, args.test, digits.target)
        data = write_digits(work / f"s{seed}" / "fit", fit_idx, digits.images, digits.target)
        test = write_digits(work / f"s{seed}" / "test", test_idx, digits.images, digits.target)
        (work / f"s{seed}" / "e").mkdir(exist_ok=True)
        # each seed's first fit: no converted model or features cached for these images
        row = {"seed": seed, "edgetl": edgetl_run(data, test, work / f"s{seed}" / "e", cache, args.edgetl_args.split())}
        if not args.no_user_script:
            row["user"] = user_script(data, test, work / f"s{seed}")
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    def summary(key: str) -> dict:
        accs = [r[key]["test_accuracy"] for r in rows if "test_accuracy" in r.get(key, {})]
        times = [r[key]["fit_s"] for r in rows if key in r]
        return {
            "test_accuracy_mean": round(float(np.mean(accs)), 4) if accs else None,
            "test_accuracy_range": [min(accs), max(accs)] if accs else None,
            "fit_s_mean": round(float(np.mean(times)), 1) if times else None,
            "runs": len(accs),
        }

    result = {"edgetl": summary("edgetl"), "rows": rows}
    if not args.no_user_script:
        result["user"] = summary("user")
    if args.json:
        print(json.dumps(result, indent=2))
        return
    n_fit = 10 * args.per_class
    print(
        f"digits, {n_fit} images to fit ({args.per_class}/class), {args.test} unseen test images, "
        f"{args.seeds} seeds, warm FP32 export"
    )
    print(f"{'pipeline':<14} {'test accuracy (mean, range)':<30} {'time to a model (mean)':>22}")
    for key, name in (("edgetl", "edgetl fit"), ("user", "user script")):
        if key in result:
            s = result[key]
            rng = f"[{s['test_accuracy_range'][0]:.3f}, {s['test_accuracy_range'][1]:.3f}]" if s["runs"] else "n/a"
            mean = f"{s['test_accuracy_mean']:.3f}" if s["runs"] else "failed"
            print(f"{name:<14} {mean + ' ' + rng:<30} {s['fit_s_mean']:>20.1f} s")
    stages = [r["edgetl"]["stages_s"] for r in rows if "stages_s" in r["edgetl"]]
    if stages:
        keys = [k for k in stages[0] if k != "backbone_images"]
        print("edgetl stages (mean s): " + ", ".join(f"{k} {np.mean([s[k] for s in stages]):.1f}" for k in keys))
        print("gate verdicts: " + ", ".join(r["edgetl"].get("gate", r["edgetl"].get("error", "?")) for r in rows))


if __name__ == "__main__":
    main()
