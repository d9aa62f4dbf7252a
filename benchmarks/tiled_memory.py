"""How large a tiled patch memory should be: image AUROC per defect kind of the tiles-alone score
on megapixel frames, for several memory sizes, from one set of tile features per set and seed.

    PYTHONPATH=src .venv/bin/python benchmarks/tiled_memory.py [--sets brick gravel retina] [--seeds 0 1]
        [--memory 2500 5000 10000] [--size 1024] [--keep DIR]

The frames are ``benchmarks/megapixel.py``'s (40 good training frames, 16 good + 8 per defect kind
to test). Features are the FP32 backbone's (ONNX Runtime), cut by the default tile plan for the
frame size, so every memory size is fitted on exactly the same rows and only the memory differs:
``fit`` bounds it with ``TILED_MEMORY_VIEWS`` (2,500 patches for 16 tiles). ``score ms`` is the
numpy head's time per frame (all tiles, nearest neighbours and maps), the part that grows with
the memory. Two cores shared with other jobs: compare rows of one run.
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=["brick", "gravel", "retina"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--memory", nargs="+", type=int, default=[2500, 5000, 10000])
    ap.add_argument("--size", type=int, default=1024, help="frame side in px (textures allow up to 1280)")
    ap.add_argument("--keep", help="write the frames and the feature cache here instead of a temporary folder")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from megapixel import make_set

    from edgetl.core.features import FeatureCache
    from edgetl.core.metrics import auroc
    from edgetl.core.preprocess import PreprocessConfig
    from edgetl.core.sessions import open_session
    from edgetl.export import export_backbone
    from edgetl.heads.patch import AnomalyConfig, fit_patch_head
    from edgetl.tasks.anomaly.data import load_anomaly_data
    from edgetl.tasks.anomaly.task import ANOMALY, PatchExtractor
    from edgetl.tasks.anomaly.tiles import frame_size, plan_tiles

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="edgetl-tiled-memory-"))
    ex = ANOMALY.backbone_view(export_backbone("efficientnet_lite0", kind="image-patch", patch_pooled=True))
    pre = PreprocessConfig.from_dict(ex.preprocess)
    ext = PatchExtractor(open_session(ex.path, runtime="onnxruntime"), pre, ex.path, ex.feature_shape)
    cache = FeatureCache(tmp / "cache", ext.cache_key)
    n = int(np.prod(ext.shape))
    rows = []
    for seed in args.seeds:
        for name in args.sets:
            mega = tmp / f"{name}-{seed}-{args.size}"
            if not (mega / f"{name}-{seed}" / "test").is_dir():
                make_set(mega, name, seed, size=args.size, n_train=40, n_good=16, per_kind=8)
            data = load_anomaly_data(mega / f"{name}-{seed}")
            plan = plan_tiles(frame_size(Path(data.train[0].path), pre), pre.input_size, None)
            if plan is None:
                sys.exit(f"{args.size} px frames are not tiled at the default defect size: give --size >= 300")
            F_tr = ext.tiles(data.train, plan, cache=cache)[:, :n].reshape(-1, *ext.shape)
            F_te = ext.tiles(data.eval_set, plan, cache=cache)[:, :n].reshape(-1, *ext.shape)
            y = np.array([s.label != "good" for s in data.eval_set])
            kinds = np.array([s.label for s in data.eval_set])
            per_kind = {k: (kinds == "good") | (kinds == k) for k in sorted(set(kinds) - {"good"})}
            for memory in args.memory:
                head = fit_patch_head(F_tr, AnomalyConfig(max_memory=memory, seed=seed), size=pre.input_size)
                t0 = time.perf_counter()
                frame_scores = head.maps(F_te)[1].reshape(-1, plan.count).max(axis=1)
                score_ms = 1000 * (time.perf_counter() - t0) / len(data.eval_set)
                row = {
                    "set": name,
                    "seed": seed,
                    "tiles": plan.count,
                    "memory": head.memory_size,
                    "auroc": round(float(auroc(y, frame_scores)), 4),
                    "per_kind": {k: round(float(auroc(y[sel], frame_scores[sel])), 3) for k, sel in per_kind.items()},
                    "score_ms": round(score_ms, 1),
                }
                rows.append(row)
                print(
                    f"{name:<7} seed {seed} {plan.count} tiles, memory {row['memory']:>6}: AUROC {row['auroc']:.3f} "
                    + " ".join(f"{k} {v:.2f}" for k, v in row["per_kind"].items())
                    + f" | score {score_ms:.0f} ms/frame",
                    file=sys.stderr if args.json else sys.stdout,
                    flush=True,
                )
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
