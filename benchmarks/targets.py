"""One bundle per shipped target profile, benchmarked on this machine: a table of every profile.

    .venv/bin/python benchmarks/targets.py [--per-class 16] [--json]

Besides each profile as shipped, the x86 profiles are also fitted at the other precisions a user
can ask for (``--precision bf16 / fp32``), so the table shows which precision is fastest and which
keeps FP32's features on this CPU family (printed first: INT8 accumulation, native bf16).

Profiles for hardware that is not here still run: intel-npu falls back to OpenVINO's CPU device,
jetson-orin runs its QDQ graph with ONNX Runtime's CPU provider (the TensorRT engine is built on
the Jetson from the bundle's build_engine.sh). Their latencies are this CPU's, not the device's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import _provenance  # noqa: E402  (benchmarks/ is on sys.path when a script runs)


def main() -> None:
    _provenance.stamp()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=16)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from edgetl.core.targets import list_targets, load_target
    from edgetl.datasets.images import make_surfaces
    from edgetl.device.bench import bench_bundle
    from edgetl.pipeline.fit import FitOptions, fit

    tmp = Path(tempfile.mkdtemp(prefix="edgetl-targets-"))
    data = tmp / "surfaces"
    make_surfaces(data, seed=0, per_class=args.per_class, val_per_class=8)
    from edgetl.core.sessions import cpu_family

    rows = []
    runs = [(t.name, None) for t in list_targets()]
    runs += [("openvino-cpu", "bf16"), ("openvino-cpu", "fp32"), ("cpu-x86", "fp32")]
    for name, precision in runs:
        t = load_target(name).with_overrides(precision=precision)
        r = fit(
            data,
            tmp / f"{t.name}-{t.precision}.bundle",
            options=FitOptions(
                target=t.name,
                precision=precision,
                cache_dir=str(tmp / "cache"),
                quiet=True,
                allow_drop=True,
                calibration_size=100,
            ),
        )
        b = bench_bundle(r.bundle.path, runs=20)
        ref = r.report["reference"]
        rows.append(
            {
                "target": t.name,
                "runtime": t.runtime,
                "device": b["device"],
                "precision": t.precision,
                "float_precision": b["float_precision"],
                "batch": t.batch or "dynamic",
                "p50_ms": b["latency_ms"]["p50"],
                "p90_ms": b["latency_ms"]["p90"],
                "throughput": b["throughput"],
                "peak_rss_mb": b["peak_rss_mb"],
                "backbone_mb": b["backbone_mb"],
                "val_accuracy": r.metrics["accuracy"],
                "drop_pp": ref.get("accuracy_drop_pp"),
                "cosine": ref.get("feature_cosine_mean", 1.0),
            }
        )
    cpu = cpu_family()
    if args.json:
        print(json.dumps({"cpu": cpu, "rows": rows}, indent=2))
        return
    print(f"CPU: {cpu['machine']}, INT8 accumulates in {cpu['int8']}, native bf16: {cpu['native_bf16']}")
    print(
        f"{'target':<13} {'runtime/device':<34} {'prec':<5} {'float':<5} {'batch':<8} {'p50 ms':>7} {'p90 ms':>7} "
        f"{'img/s@b':>11} {'MB':>5} {'acc':>7} {'drop':>6} {'cosine':>7}"
    )
    for r in rows:
        tp = f"{r['throughput']['images_per_s']:.0f}@{r['throughput']['batch']}"
        print(
            f"{r['target']:<13} {r['runtime'] + '/' + r['device']:<34} {r['precision']:<5} {r['float_precision']:<5} "
            f"{str(r['batch']):<8} {r['p50_ms']:>7.1f} {r['p90_ms']:>7.1f} {tp:>11} {r['backbone_mb']:>5.1f} "
            f"{r['val_accuracy'] * 100:>6.1f}% {(r['drop_pp'] or 0.0):>+6.2f} {r['cosine']:>7.4f}"
        )


if __name__ == "__main__":
    main()
