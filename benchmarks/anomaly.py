"""Defect detection on the built-in `defects` example: image AUROC, pixel AUROC, latency, bundle size
for each head (padim, patchcore) x precision (fp32, int8) x runtime (ONNX Runtime, OpenVINO).

    .venv/bin/python benchmarks/anomaly.py [--seeds 0 1] [--targets cpu-x86 openvino-cpu] [--json]
    .venv/bin/python benchmarks/anomaly.py --anomalib /path/to/anomalib-site   # + anomalib, side by side

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

import numpy as np


def edgetl_rows(data: Path, cache: str, targets: list[str], seed: int) -> list[dict]:
    from edgetl.anomaly import AnomalyConfig, AnomalyOptions, fit_anomaly

    rows = []
    for target in targets:
        for kind in ("padim", "patchcore"):
            for precision in ("fp32", "int8"):
                out = Path(cache).parent / f"{target}-{kind}-{precision}.bundle"
                t0 = time.perf_counter()
                r = fit_anomaly(data, out, force=True, options=AnomalyOptions(
                    head=AnomalyConfig(kind=kind), target=target, precision=precision, cache_dir=cache,
                    reference=False, allow_drop=True, quiet=True))
                rep, m = r.report, r.report["metrics"]
                rows.append({
                    "seed": seed, "tool": "edgetl", "head": kind, "target": target, "runtime": rep["runtime"],
                    "precision": precision, "image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"],
                    "peak_in_mask": m["peak_in_mask"], "f1": m["f1"],
                    "latency_ms": rep["latency_batch1"]["fused"]["p50_ms"],
                    "bundle_mb": round(rep["size"]["bundle_bytes"] / 1e6, 2),
                    "fused_mb": round(rep["size"]["fused_bytes"] / 1e6, 2),
                    "parity_rel": rep["fused_parity"]["max_rel_score_diff"], "fit_s": round(time.perf_counter() - t0, 1),
                })
                print(_line(rows[-1]), file=sys.stderr, flush=True)
    return rows


def anomalib_rows(data: Path, site: str, seed: int, coreset: float) -> list[dict]:
    """anomalib's PaDiM / PatchCore torch models on the same images, weights and layers (FP32, torch)."""
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # its coreset progress bar
    sys.path.insert(0, site)
    import torch

    from edgetl.anomaly import anomaly_preprocess, auroc, load_anomaly_data, load_mask
    from edgetl.export import resolve
    from edgetl.export.image import build_model, preprocess_config, weight_source
    from edgetl.core.features import load_input

    try:
        from anomalib.models.image.padim.torch_model import PadimModel
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    except Exception as exc:  # anomalib absent or incompatible with this torch
        print(f"anomalib unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
        return []
    spec = resolve("efficientnet_lite0")
    ours = build_model(spec, weight_source(spec))
    pre = anomaly_preprocess(preprocess_config(ours))
    ds = load_anomaly_data(data)
    x_tr = torch.from_numpy(np.stack([load_input(s.path, pre) for s in ds.train]))
    x_te = torch.from_numpy(np.stack([load_input(s.path, pre) for s in ds.test]))
    y = np.array([s.label != "good" for s in ds.test])
    masks = [load_mask(ds.masks.get(str(s.path)), pre) if s.label != "good" else np.zeros((224, 224), bool)
             for s in ds.test]
    rows = []
    for name, make in (("padim", lambda: PadimModel(backbone="tf_efficientnet_lite0", layers=["blocks.1", "blocks.2"],
                                                    pre_trained=False, n_features=64)),
                       ("patchcore", lambda: PatchcoreModel(backbone="tf_efficientnet_lite0", pre_trained=False,
                                                            layers=["blocks.1", "blocks.2"]))):
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
            maps = torch.cat([o.anomaly_map.reshape(len(o.pred_score), *o.anomaly_map.shape[-2:]) for o in outs]).numpy()
            x1 = x_te[:1]
            for _ in range(3):
                model(x1)
            lat = []
            for _ in range(20):
                t = time.perf_counter()
                model(x1)
                lat.append((time.perf_counter() - t) * 1000)
        rows.append({"seed": seed, "tool": "anomalib", "head": name if name == "padim" else f"patchcore@{coreset:g}", "target": "torch", "runtime": "torch eager",
                     "precision": "fp32", "image_auroc": round(auroc(y, scores), 4),
                     "pixel_auroc": round(auroc(np.stack(masks).ravel(), maps.ravel()), 4), "peak_in_mask": None,
                     "f1": None, "latency_ms": round(float(np.median(lat)), 2), "bundle_mb": None, "fused_mb": None,
                     "parity_rel": None, "fit_s": round(t_fit, 1)})
        print(_line(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _line(r: dict) -> str:
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    return (f"{r['seed']:>4}  {r['tool']:<8} {r['head']:<14} {r['runtime']:<12} {r['precision']:<5} "
            f"{f(r['image_auroc'], '.4f'):>9} {f(r['pixel_auroc'], '.4f'):>9} {f(r['peak_in_mask'], '.2f'):>5} "
            f"{f(r['latency_ms'], '.1f'):>8} {f(r['bundle_mb'], '.2f'):>8}")


HEADER = (f"{'seed':>4}  {'tool':<8} {'head':<14} {'runtime':<12} {'prec':<5} {'img AUROC':>9} {'pix AUROC':>9} "
          f"{'peak':>5} {'lat ms':>8} {'bundle MB':>8}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--targets", nargs="+", default=["cpu-x86", "openvino-cpu"])
    ap.add_argument("--anomalib", help="pip --target folder with anomalib installed (optional)")
    ap.add_argument("--anomalib-coreset", type=float, default=0.01,
                    help="anomalib PatchCore coreset ratio; its 10%% default on its 56 x 56 grid (18,815 greedy "
                         "steps for 60 images) was estimated at ~1.7 h on this 2-core machine")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from edgetl.datasets.images import make_defects

    tmp = Path(tempfile.mkdtemp(prefix="edgetl-anomaly-"))
    cache = str(tmp / "cache")
    rows = []
    print(HEADER, file=sys.stderr)
    for seed in args.seeds:
        data = tmp / f"defects-{seed}"
        make_defects(data, seed=seed)
        rows += edgetl_rows(data, cache, args.targets, seed)
        if args.anomalib:
            rows += anomalib_rows(data, args.anomalib, seed, args.anomalib_coreset)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(HEADER)
        print("\n".join(_line(r) for r in rows))


if __name__ == "__main__":
    main()
