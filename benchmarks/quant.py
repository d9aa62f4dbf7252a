"""FP32 vs INT8 per runtime: size, batch-1 latency, batch-32 throughput, feature cosine, accuracy drop.

All figures come from one run on the built-in `surfaces` example, so ratios compare like with like:

    .venv/bin/python benchmarks/quant.py [--per-class 48] [--json]

Targets (issue 3), on this CPU: INT8 >= 1.8x FP32 throughput on the same runtime, INT8 size <= 30%
of FP32, accuracy drop <= 1 percentage point.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _provenance  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
import numpy as np


def throughput(session, size: int, batch: int, reps: int = 3) -> float:
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    session(x)
    best = min(_timed(lambda: session(x)) for _ in range(reps))
    return batch / best


def latency_ms(session, size: int, runs: int = 30) -> float:
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    for _ in range(3):
        session(x)
    return float(np.median([_timed(lambda: session(x)) for _ in range(runs)]) * 1000)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    _provenance.stamp()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=48)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from edgetl.datasets.images import make_surfaces
    from edgetl.device.predict import open_backbone
    from edgetl.pipeline.fit import FitOptions, fit

    tmp = Path(tempfile.mkdtemp(prefix="edgetl-quant-"))
    data = tmp / "surfaces"
    make_surfaces(data, seed=0, per_class=args.per_class, val_per_class=16)
    cache = str(tmp / "cache")
    rows = []
    for runtime, target in (("onnxruntime", "cpu-x86"), ("openvino", "openvino-cpu")):
        res = {}
        for precision in ("fp32", "int8"):
            opts = FitOptions(target=target, precision=precision, cache_dir=cache, quiet=True, allow_drop=True)
            r = fit(data, tmp / f"{target}-{precision}.bundle", options=opts)
            sess = open_backbone(r.bundle)
            size = r.bundle.preprocess.input_size
            res[precision] = {
                "bytes": r.report["size"]["backbone_bytes"],
                "latency_ms": latency_ms(sess, size),
                "throughput_b32": throughput(sess, size, 32),
                "val_accuracy": r.metrics["accuracy"],
                "reference": r.report["reference"],
                "convert_s": r.report["conversion"].get("seconds"),
            }
        f, q = res["fp32"], res["int8"]
        rows.append(
            {
                "runtime": runtime,
                "target": target,
                "size_mb": {
                    "fp32": round(f["bytes"] / 1e6, 2),
                    "int8": round(q["bytes"] / 1e6, 2),
                    "int8_percent_of_fp32": round(100 * q["bytes"] / f["bytes"], 1),
                },
                "latency_b1_ms": {
                    "fp32": round(f["latency_ms"], 2),
                    "int8": round(q["latency_ms"], 2),
                    "speedup": round(f["latency_ms"] / q["latency_ms"], 2),
                },
                "throughput_b32": {
                    "fp32": round(f["throughput_b32"], 1),
                    "int8": round(q["throughput_b32"], 1),
                    "speedup": round(q["throughput_b32"] / f["throughput_b32"], 2),
                },
                "feature_cosine": {
                    "mean": q["reference"].get("feature_cosine_mean"),
                    "min": q["reference"].get("feature_cosine_min"),
                },
                "val_accuracy": {
                    "fp32": q["reference"].get("fp32_val_accuracy"),
                    "int8": q["val_accuracy"],
                    "drop_pp": q["reference"].get("accuracy_drop_pp"),
                },
                "quantize_seconds": q["convert_s"],
            }
        )
    if args.json:
        print(json.dumps({"rows": rows}, indent=2))
        return
    print(f"edgetl quant — efficientnet_lite0 on the surfaces example ({args.per_class} train images/class)")
    print(
        f"{'runtime':<12} {'size MB fp32/int8':>18} {'b1 ms fp32/int8':>18} "
        f"{'b32 img/s fp32/int8':>22} {'cosine':>14} {'acc fp32/int8 (drop)':>26}"
    )
    for r in rows:
        s, l, t, c, a = r["size_mb"], r["latency_b1_ms"], r["throughput_b32"], r["feature_cosine"], r["val_accuracy"]
        print(
            f"{r['runtime']:<12} {s['fp32']:>7.2f}/{s['int8']:<5.2f}({s['int8_percent_of_fp32']:>4.1f}%) "
            f"{l['fp32']:>6.1f}/{l['int8']:<5.1f}(x{l['speedup']:<4}) "
            f"{t['fp32']:>7.1f}/{t['int8']:<6.1f}(x{t['speedup']:<4}) "
            f"{c['mean']:.4f}/{c['min']:.3f} {a['fp32'] * 100:>6.2f}/{a['int8'] * 100:<6.2f}({a['drop_pp']:+.2f} pp)"
        )


if __name__ == "__main__":
    main()
