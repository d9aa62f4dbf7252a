"""Fleet learning on non-IID devices: fleet heads vs a central head vs each device alone vs plain
FedAvg of the device heads.

Data: scikit-learn's digits (1,797 images, 10 classes) as 64x64 RGB PNGs. A "factory" bundle is
fitted on 12 images per digit (FP32, ONNX Runtime, efficientnet_lite0); every other image goes
through that bundle's backbone once. Per seed: 30 % of the rest (stratified) is the test set,
the remainder is dealt to 8 devices with 2 of the 10 digits each (a digit on two devices is
split between them). Heads (accuracy on the test set):

* central linear / prototype: edgetl's own trainer on the union of the devices' images;
* fleet linear: FedNCM start + 30 rounds of FedAvg with one local step and a server Adam step;
* fleet ridge / prototype: the exact merges (equal to their central fits);
* device alone: each device's own edgetl linear head (mean and best of the 8);
* plain FedAvg: the 8 device heads' arrays averaged, weighted by rows.

Merges run in process (edgetl.fleet.merger); Flower moves the same summaries and does not
change the numbers. Usage: .venv/bin/python benchmarks/fleet.py [--seeds 0 1 2 3 4]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fleet"))
import _digits
import _provenance  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

from edgetl.fleet import _edgetl as et
from edgetl.fleet.cli import split_dataset
from edgetl.fleet.merger import Merger, run_local
from edgetl.fleet.summaries import LocalData

NAMES = [f"d{i}" for i in range(10)]


def main() -> None:
    _provenance.stamp()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    images, labels = _digits.digits_arrays()
    factory, rest = _digits.factory_split(labels, 12, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = _digits.write_folder(tmp / "factory", images, labels, factory)
        edgetl = str(Path(sys.executable).parent / "edgetl")
        subprocess.run(
            [
                edgetl,
                "fit",
                str(data),
                "--out",
                str(tmp / "b"),
                "--precision",
                "fp32",
                "--runtime",
                "onnxruntime",
                "--target",
                "cpu-x86",
                "--quiet",
            ],
            check=True,
            capture_output=True,
        )
        _digits.write_folder(tmp / "all", images, labels, np.arange(len(labels)))
        paths = [tmp / "all" / f"d{labels[i]}" / f"{i:04d}.png" for i in range(len(labels))]
        X = et.image_features(et.load_bundle(tmp / "b"), paths)
    rows = {}
    times = {}
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        test = np.concatenate(
            [
                rng.choice(rest[labels[rest] == c], int(0.3 * np.sum(labels[rest] == c)), replace=False)
                for c in range(10)
            ]
        )
        pool = np.setdiff1d(rest, test)
        parts = split_dataset(
            [NAMES[c] for c in labels[pool]], args.devices, split="class", classes_per_device=2, alpha=0.5, seed=seed
        )
        devs = [pool[p] for p in parts if len(p)]
        union = np.concatenate(devs)
        local = {f"cam{i}": LocalData.classify(X[d], [NAMES[c] for c in labels[d]]) for i, d in enumerate(devs)}
        acc = lambda h: float(np.mean(h.predict(X[test]) == labels[test]))

        def timed(name, fn):
            t = time.perf_counter()
            h = fn()
            times.setdefault(name, []).append(time.perf_counter() - t)
            return h

        alone = [et.train_head(X[d], labels[d], NAMES, kind="linear") for d in devs]
        w = np.array([len(d) for d in devs], float) / len(union)
        fedavg = et.head_from_arrays(
            "linear",
            NAMES,
            {k: sum(wi * h.arrays[k].astype(np.float64) for wi, h in zip(w, alone)) for k in alone[0].arrays},
        )
        r = {
            "central linear (edgetl, all images)": acc(
                timed("central linear", lambda: et.train_head(X[union], labels[union], NAMES, kind="linear"))
            ),
            "fleet linear (FedNCM + 30 FedAdam rounds)": acc(
                timed("fleet linear", lambda: run_local(Merger("linear", labels=NAMES), local).head)
            ),
            "fleet ridge (exact, 3 steps)": acc(
                timed("fleet ridge", lambda: run_local(Merger("ridge", labels=NAMES), local).head)
            ),
            "central prototype": acc(et.train_head(X[union], labels[union], NAMES, kind="prototype")),
            "fleet prototype (exact, 4 steps)": acc(
                timed("fleet prototype", lambda: run_local(Merger("prototype", labels=NAMES), local).head)
            ),
            "device alone (mean of 8)": float(np.mean([acc(h) for h in alone])),
            "device alone (best of 8)": float(max(acc(h) for h in alone)),
            "plain FedAvg of the device heads": acc(fedavg),
        }
        for k, v in r.items():
            rows.setdefault(k, []).append(v)
        print(f"seed {seed}: {len(union)} device images, {len(test)} test images", file=sys.stderr)
    if args.json:
        print(json.dumps({"seeds": args.seeds, "accuracy": rows, "merge_seconds": times}))
        return
    print(f"| head | accuracy, mean +- sd over seeds {args.seeds} | min - max |")
    print("|---|---|---|")
    for k, v in rows.items():
        v = np.array(v) * 100
        print(f"| {k} | {v.mean():.1f} +- {v.std(ddof=1) if len(v) > 1 else 0:.1f} | {v.min():.1f} - {v.max():.1f} |")
    print()
    for k, v in times.items():
        print(f"{k}: {np.mean(v):.2f} s per fit (in process, 2-core VM)")


if __name__ == "__main__":
    main()
