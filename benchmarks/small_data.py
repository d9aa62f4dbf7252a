"""Honest numbers on small data: ``edgetl fit`` with defaults against the script a user would write.

    .venv/bin/python benchmarks/small_data.py [--seeds 3] [--per-class 20] [--test 1000] [--json]

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
    fit = subprocess.run([*cli, "fit", str(data), "--out", str(work / "b"), "--force", "--json", "--quiet", *extra],
                         capture_output=True, text=True, env=env)
    t_fit = time.perf_counter() - t0
    if fit.returncode not in (0,):
        return {"error": fit.stderr.strip().splitlines()[-1] if fit.stderr.strip() else f"exit {fit.returncode}",
                "exit": fit.returncode, "fit_s": t_fit}
    ev = subprocess.run([*cli, "eval", str(work / "b"), str(test), "--json", "--quiet"], capture_output=True, text=True,
                        env=env)
    out = json.loads(fit.stdout)
    return {"test_accuracy": json.loads(ev.stdout)["accuracy"], "fit_s": t_fit, "stages_s": out["timings_s"],
            "gate": out["gate"]["verdict"], "val_accuracy": out["val"]["accuracy"], "val_n": out["val"]["n"]}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--edgetl-args", default="", help="extra arguments for edgetl fit, e.g. '--calibration-size 300'")
    ap.add_argument("--no-user-script", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

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
        row = {"seed": seed, "edgetl": edgetl_run(data, test, work / f"s{seed}" / "e", cache,
                                                   args.edgetl_args.split())}
        if not args.no_user_script:
            row["user"] = user_script(data, test, work / f"s{seed}")
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    def summary(key: str) -> dict:
        accs = [r[key]["test_accuracy"] for r in rows if "test_accuracy" in r.get(key, {})]
        times = [r[key]["fit_s"] for r in rows if key in r]
        return {"test_accuracy_mean": round(float(np.mean(accs)), 4) if accs else None,
                "test_accuracy_range": [min(accs), max(accs)] if accs else None,
                "fit_s_mean": round(float(np.mean(times)), 1) if times else None, "runs": len(accs)}

    result = {"edgetl": summary("edgetl"), "rows": rows}
    if not args.no_user_script:
        result["user"] = summary("user")
    if args.json:
        print(json.dumps(result, indent=2))
        return
    n_fit = 10 * args.per_class
    print(f"digits, {n_fit} images to fit ({args.per_class}/class), {args.test} unseen test images, "
          f"{args.seeds} seeds, warm FP32 export")
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
