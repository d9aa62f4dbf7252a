"""Feature-extraction speed vs PyTorch eager, head-training time, and cold vs warm ``fit``.

Prints figures measured in ONE run, so ratios compare like with like on this (noisy, shared)
machine. Usage:

    .venv/bin/python benchmarks/fit_speed.py [--per-class 48] [--json]

Targets: extraction at least as fast as torch eager; a second fit with a new head in under 5% of
the first fit's time; the first fit of 200 images with the FP32 export already cached in at most
45 s on 2 cores (its stages are printed).
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


def main() -> None:
    _provenance.stamp()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=48)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from edgetl.core.features import extract_features, load_input
    from edgetl.core.sessions import default_threads, open_session
    from edgetl.datasets.images import make_surfaces
    from edgetl.export import export_backbone, resolve
    from edgetl.export.image import build_model, weight_source
    from edgetl.heads.classification import HeadConfig
    from edgetl.heads.training import train_head
    from edgetl.pipeline.fit import FitOptions, fit
    from edgetl.tasks.classify.data import load_dataset

    threads = default_threads()
    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="edgetl-bench-"))
    data = tmp / "surfaces"
    make_surfaces(data, seed=0, per_class=args.per_class, val_per_class=16)
    ds = load_dataset(data)
    samples = ds.train + ds.val
    paths = [s.path for s in samples]
    cache = tmp / "cache"
    exported = export_backbone("efficientnet_lite0", cache_dir=cache)
    pre = exported.preprocess
    out: dict = {"images": len(paths), "threads": threads}

    # --- model-only throughput, batch 32, same preprocessed tensors for both
    x = np.stack([load_input(p, pre) for p in paths[:64]])
    spec = resolve("efficientnet_lite0")
    model = build_model(spec, weight_source(spec))
    sess = open_session(exported.path, runtime="onnxruntime")

    def rate(fn, reps=3) -> float:
        fn(x[:32])
        best = min(_timed(lambda: [fn(x[i : i + 32]) for i in range(0, len(x), 32)]) for _ in range(reps))
        return len(x) / best

    with torch.inference_mode():
        torch_ips = rate(lambda b: model(torch.from_numpy(b)))
    ort_ips = rate(lambda b: sess(b))
    out["model_only_images_per_s"] = {
        "torch_eager_fp32": round(torch_ips, 1),
        "onnxruntime_fp32": round(ort_ips, 1),
        "ratio": round(ort_ips / torch_ips, 2),
    }

    # --- end to end (decode + preprocess + model) over the whole dataset, no cache
    def torch_e2e():
        with torch.inference_mode():
            for i in range(0, len(paths), 32):
                model(torch.from_numpy(np.stack([load_input(p, pre) for p in paths[i : i + 32]])))

    t_torch = _timed(torch_e2e)
    t_ort = _timed(lambda: extract_features(paths, session=sess, preprocess=pre, quiet=True))
    out["end_to_end_images_per_s"] = {
        "torch_eager_fp32": round(len(paths) / t_torch, 1),
        "edgetl_onnxruntime_fp32": round(len(paths) / t_ort, 1),
        "ratio": round(t_torch / t_ort, 2),
    }

    # --- cold fit (INT8, default target) vs warm fit with another head, same cache
    opts = FitOptions(cache_dir=str(cache / "fits"), quiet=True, allow_drop=True)
    t_cold = _timed(lambda: fit(data, tmp / "cold.bundle", options=opts))
    out["fit_seconds"] = {"first_int8_fit_linear": round(t_cold, 2)}
    for kind in ("prototype", "mlp"):
        warm_opts = FitOptions(cache_dir=str(cache / "fits"), quiet=True, allow_drop=True, head=HeadConfig(kind=kind))
        res = {}
        t_warm = _timed(lambda: res.setdefault("r", fit(data, tmp / f"warm-{kind}.bundle", options=warm_opts)))
        out["fit_seconds"][f"second_fit_{kind}"] = round(t_warm, 2)
        out["fit_seconds"][f"second_fit_{kind}_percent"] = round(100 * t_warm / t_cold, 1)
        out["fit_seconds"][f"second_fit_{kind}_backbone_images"] = res["r"].timings["backbone_images"]

    # --- the first fit of a 200-image dataset, FP32 export cached (what a user's first run costs
    # once the backbone is exported): nothing else cached, default target and head
    import shutil

    s200 = tmp / "s200"
    make_surfaces(s200, seed=5, per_class=20, val_per_class=5)
    warm = tmp / "warm-export"
    shutil.copytree(cache / "backbones", warm / "backbones")
    res200 = {}
    t200 = _timed(
        lambda: res200.setdefault(
            "r", fit(s200, tmp / "s200.bundle", options=FitOptions(cache_dir=str(warm), quiet=True, allow_drop=True))
        )
    )
    out["first_fit_200"] = {
        "seconds": round(t200, 2),
        "stages_s": {k: v for k, v in res200["r"].timings.items() if k != "backbone_images"},
        "backbone_images": res200["r"].timings["backbone_images"],
    }

    # --- head training on cached features
    X = extract_features([s.path for s in ds.train], session=sess, preprocess=pre, quiet=True)
    index = {c: i for i, c in enumerate(ds.classes)}
    y = np.array([index[s.label] for s in ds.train])
    Xv = extract_features([s.path for s in ds.val], session=sess, preprocess=pre, quiet=True)
    yv = np.array([index[s.label] for s in ds.val])
    heads = {}
    for kind in ("linear", "mlp", "prototype"):
        t = _timed(lambda: train_head(X, y, ds.classes, cfg=HeadConfig(kind=kind), X_val=Xv, y_val=yv))
        heads[kind] = round(t, 3)
    out["head_training_seconds"] = {"rows": int(len(X)), "features": int(X.shape[1]), **heads}

    if args.json:
        print(json.dumps(out, indent=2))
        return
    m, e, f, h = (
        out["model_only_images_per_s"],
        out["end_to_end_images_per_s"],
        out["fit_seconds"],
        out["head_training_seconds"],
    )
    print(f"edgetl fit_speed — {out['images']} images, efficientnet_lite0, {threads} threads")
    print(
        f"model only, batch 32     torch eager {m['torch_eager_fp32']:7.1f} img/s "
        f"| ONNX Runtime FP32 {m['onnxruntime_fp32']:7.1f} img/s | x{m['ratio']}"
    )
    print(
        f"decode+preprocess+model  torch eager {e['torch_eager_fp32']:7.1f} img/s | "
        f"edgetl extract   {e['edgetl_onnxruntime_fp32']:7.1f} img/s | x{e['ratio']}"
    )
    print(
        "fit                      first (INT8, linear, cold cache) "
        f"{f['first_int8_fit_linear']:.1f} s | second, prototype head "
        f"{f['second_fit_prototype']:.2f} s = {f['second_fit_prototype_percent']}% "
        f"| second, mlp head {f['second_fit_mlp']:.2f} s "
        f"= {f['second_fit_mlp_percent']}% ({f['second_fit_mlp_backbone_images']} backbone runs)"
    )
    ff = out["first_fit_200"]
    print(
        f"first fit, 200 images, FP32 export cached: {ff['seconds']:.1f} s ("
        + ", ".join(f"{k} {v:.1f}" for k, v in ff["stages_s"].items())
        + f"; {ff['backbone_images']} backbone runs)"
    )
    print(
        f"head training ({h['rows']} x {h['features']}, auto L2)  linear "
        f"{h['linear']:.3f} s | mlp {h['mlp']:.3f} s | prototype {h['prototype']:.3f} s"
    )


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    sys.exit(main())
