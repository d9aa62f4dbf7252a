"""Which INT8 settings keep EfficientNet-Lite0's features: one row per recipe, all in one run.

For each recipe the FP32 backbone is quantized through edgetl's own ``convert`` (calibrated on the
same training images), then the feature cosine to FP32 is measured on validation images twice:

* **exact**: INT8 arithmetic emulated in float (ONNX Runtime with the QDQ graph unfused; OpenVINO
  with its low-precision passes off), i.e. what an int32-accumulating device (ARM dot products,
  TensorRT, an NPU, a VNNI CPU) computes;
* **this CPU**: the runtime's own INT8 kernels on the machine running the script (an AVX2 CPU
  without VNNI saturates full 8-bit weights here).

    .venv/bin/python benchmarks/quant_ablation.py [--per-class 16] [--calibration 128] [--json]

The shipped profiles are the rows marked with their names; the other rows are the steps between
NNCF's defaults and them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import _provenance  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
import numpy as np

# (row label, base profile, quantization overrides)
RECIPES = [
    (
        "NNCF defaults (per-image min/max averaged, fast bias corr.), 8-bit w",
        "intel-npu",
        {"calibration_method": "mean_minmax", "fast_bias_correction": True, "overflow_fix": "disable"},
    ),
    ("+ global min/max activation ranges", "intel-npu", {"fast_bias_correction": True, "overflow_fix": "disable"}),
    ("+ full bias correction = intel-npu", "intel-npu", {}),
    ("+ 7-bit weights (no AVX2 saturation) = openvino-cpu", "openvino-cpu", {}),
    ("ORT quantizer, U8 x S8 8-bit per-channel = cpu-arm64", "cpu-arm64", {}),
    ("ORT quantizer, U8 x S8 7-bit = cpu-x86", "cpu-x86", {}),
    ("ORT quantizer, S8 x S8 symmetric = jetson-orin", "jetson-orin", {}),
]


def main() -> None:
    _provenance.stamp()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=16)
    ap.add_argument("--calibration", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from edgetl.core.features import load_input
    from edgetl.core.sessions import open_session
    from edgetl.core.targets import load_target
    from edgetl.datasets.images import make_surfaces
    from edgetl.export import export_backbone
    from edgetl.pipeline.convert import convert, feature_cosine

    tmp = Path(tempfile.mkdtemp(prefix="edgetl-ablation-"))
    data = tmp / "surfaces"
    make_surfaces(data, seed=0, per_class=args.per_class, val_per_class=8)
    exported = export_backbone("efficientnet_lite0", cache_dir=tmp / "cache")
    pre = exported.preprocess
    train = sorted((data / "train").rglob("*.png"))
    calib = np.stack([load_input(p, pre) for p in train[: args.calibration]])
    x = np.stack([load_input(p, pre) for p in sorted((data / "val").rglob("*.png"))])
    ref = open_session(exported.path)(x)

    def cos(features: np.ndarray) -> dict:
        c = feature_cosine(ref, features)
        return {"mean": round(float(c.mean()), 4), "min": round(float(c.min()), 3)}

    def throughput(session) -> float:
        batch = x[:16]
        session(batch)
        t0 = time.perf_counter()
        for _ in range(3):
            session(batch)
        return round(3 * len(batch) / (time.perf_counter() - t0), 1)

    rows = []
    for label, base, overrides in RECIPES:
        target = load_target(base)
        # the static batch of NPU/TensorRT profiles is a deployment detail; keep batches comparable
        target = dataclasses.replace(
            target,
            batch=0,
            tensorrt=None,
            device="CPU",
            quantization=dataclasses.replace(target.quantization, **overrides),
        )
        out = tmp / f"m{len(rows)}"
        model = convert(exported.path, target=target, out_dir=out, calibration=calib)
        native = open_session(model.path, runtime=target.runtime)
        exact = open_session(model.path, runtime=target.runtime, simulate=True)
        rows.append(
            {
                "recipe": label,
                "runtime": target.runtime,
                "exact": cos(exact(x)),
                "this_cpu": cos(native(x)),
                "images_per_s": throughput(native),
                "convert_s": model.info.get("seconds"),
            }
        )
    fp32 = {"recipe": "FP32 (ONNX Runtime)", "images_per_s": throughput(open_session(exported.path))}
    if args.json:
        print(json.dumps({"rows": rows, "fp32": fp32}, indent=2))
        return
    print(
        f"INT8 recipes on efficientnet_lite0: {len(calib)} calibration / {len(x)} validation images, "
        "feature cosine to FP32 (mean / min)"
    )
    print(f"{'recipe':<68} {'runtime':<12} {'exact':>14} {'this CPU':>14} {'img/s':>7}")
    for r in rows:
        e, n = r["exact"], r["this_cpu"]
        print(
            f"{r['recipe']:<68} {r['runtime']:<12} "
            f"{e['mean']:>7.4f}/{e['min']:<6.3f} {n['mean']:>7.4f}/{n['min']:<6.3f} "
            f"{r['images_per_s']:>7.1f}"
        )
    print(f"{fp32['recipe']:<68} {'onnxruntime':<12} {'':>14} {'':>14} {fp32['images_per_s']:>7.1f}")


if __name__ == "__main__":
    main()
