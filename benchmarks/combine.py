"""How the combined defect detector joins its patch part and its image part: the mean of the two
normalised parts (z-scores against held-out good images) against their maximum, the length of their
positive parts (l2) and a soft maximum (lse: log(exp zp + exp zi)), each part alone, and a plain 2-NN
on pooled features, on held-out one-class data nobody tuned to.

    .venv/bin/python benchmarks/combine.py [--seeds 0 1] [--json]

Data, all 224 px, FP32 features of the default backbone (EfficientNet-Lite0, patch + pooled export;
the heads are fitted in numpy exactly as ``fit`` fits them, without conversion or a bundle):
- ``photos``: a multi-class photo set made from six scikit-image photographs (astronaut, chelsea,
  coffee, rocket, camera, motorcycle): shots of each one's subject, shifted, scaled, tilted and
  exposure-jittered (benchmarks/anomaly.py ``_view``). One photograph is the good part (40 train, 20
  test shots), shots of the five others the wrong parts (6 each); each photograph in turn.
- ``digits``: scikit-learn's handwritten digits, one digit good (40 / 20), five of each other digit
  wrong (benchmarks/anomaly.py ``make_wrong_digit``); digits 0, 3, 5, 8.
- ``defects``: local defects, edgetl's defects example (brick and gravel, 40 train, 20 good + 40
  defective test images).
Threshold-free image AUROC on the test images; spread = min / max over good classes and seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import _provenance  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

PHOTO_CLASSES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "motorcycle")
RULES = ("patch", "image", "mean", "max", "l2", "lse", "2-NN pooled")


def make_photo_classes(out: Path, good: str, seed: int, *, n_train=40, n_good=20, n_bad=6) -> Path:
    from anomaly import CENTRES, _photo, _view
    from PIL import Image

    rng = np.random.default_rng([seed, PHOTO_CLASSES.index(good), 7])

    def shots(name, n):
        a = _photo(name)
        H, W = a.shape[:2]
        return [_view(a, CENTRES[name][0] * H, CENTRES[name][1] * W, int(0.4 * min(H, W)), rng) for _ in range(n)]

    sets = {"train/good": shots(good, n_train), "test/good": shots(good, n_good)}
    for other in PHOTO_CLASSES:
        if other != good:
            sets[f"test/{other}"] = shots(other, n_bad)
    for folder, ims in sets.items():
        (out / folder).mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(ims):
            Image.fromarray(im).save(out / folder / f"{i:03d}.png")
    return out


def part_scores(data: Path, extractor, cache, seed: int) -> dict:
    """Per rule, the test images' scores, from heads fitted on the training rows."""
    from edgetl.heads.defect import DefectConfig, fit_defect_head
    from edgetl.tasks.anomaly.data import load_anomaly_data

    ds = load_anomaly_data(data)
    X_tr = extractor.patches(ds.train, cache=cache)
    X_te = extractor.patches(ds.test, cache=cache)
    head = fit_defect_head(X_tr, DefectConfig.from_dict({"seed": seed}), patch_shape=extractor.shape, size=224)
    p = head.part_scores(X_te)
    (mp, sp), (mi, si) = head.norm["patch"], head.norm["image"]
    zp, zi = (p["patch"] - mp) / sp, (p["image"] - mi) / si
    Ztr, Zte = head.split(X_tr)[1], head.split(X_te)[1]
    D = np.sqrt(np.maximum((Zte**2).sum(1)[:, None] - 2 * Zte @ Ztr.T + (Ztr**2).sum(1)[None], 0))
    y = np.array([s.label != "good" for s in ds.test])
    return {
        "y": y,
        "patch": zp,
        "image": zi,
        "mean": 0.5 * (zp + zi),
        "max": np.maximum(zp, zi),
        "l2": np.hypot(np.maximum(zp, 0), np.maximum(zi, 0)),
        "lse": np.logaddexp(zp, zi),
        "2-NN pooled": np.sort(D, 1)[:, :2].mean(1),
        "shipped": head.maps(X_te)[1],
    }


def main() -> None:
    _provenance.stamp()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--sets", nargs="+", default=["photos", "digits", "defects"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from anomaly import make_wrong_digit

    from edgetl.core.features import FeatureCache
    from edgetl.core.metrics import auroc
    from edgetl.core.preprocess import PreprocessConfig
    from edgetl.core.sessions import open_session
    from edgetl.datasets.images import make_defects
    from edgetl.export import export_backbone
    from edgetl.tasks.anomaly.task import ANOMALY, PatchExtractor

    tmp = Path(tempfile.mkdtemp(prefix="edgetl-combine-"))
    ex = ANOMALY.backbone_view(export_backbone("efficientnet_lite0", kind="image-patch", patch_pooled=True))
    ext = PatchExtractor(
        open_session(ex.path, runtime="onnxruntime"),
        PreprocessConfig.from_dict(ex.preprocess),
        ex.path,
        ex.feature_shape,
    )
    cache = FeatureCache(tmp / "cache", ext.cache_key)
    rows = []
    for seed in args.seeds:
        jobs = []
        if "photos" in args.sets:
            jobs += [("photos", g, lambda o, g=g: make_photo_classes(o, g, seed)) for g in PHOTO_CLASSES]
        if "digits" in args.sets:
            jobs += [
                ("digits", str(d), lambda o, d=d: make_wrong_digit(o, d, seed, n_train=40, n_good=20))
                for d in (0, 3, 5, 8)
            ]
        if "defects" in args.sets:
            jobs += [
                ("defects", t, lambda o, t=t: make_defects(o, seed=seed, texture=t, n_train_good=40) and o)
                for t in ("brick", "gravel")
            ]
        for kind, good, make in jobs:
            out = tmp / f"{kind}-{good}-{seed}"
            make(out)
            s = part_scores(out, ext, cache, seed)
            row = {
                "set": kind,
                "good": good,
                "seed": seed,
                **{r: round(float(auroc(s["y"], s[r])), 4) for r in (*RULES, "shipped")},
            }
            rows.append(row)
            print(" ".join(f"{k} {v}" for k, v in row.items()), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'set':<8} " + " ".join(f"{r:>12}" for r in (*RULES, "shipped")))
    for kind in [*dict.fromkeys(r["set"] for r in rows), "all"]:
        sel = [r for r in rows if kind in ("all", r["set"])]
        print(f"{kind:<8} " + " ".join(f"{np.mean([r[k] for r in sel]):>12.4f}" for k in (*RULES, "shipped")))
        print(f"{'  min':<8} " + " ".join(f"{np.min([r[k] for r in sel]):>12.4f}" for k in (*RULES, "shipped")))
    worse = [
        (r["set"], r["good"], r["seed"], r["shipped"], max(r["patch"], r["image"]))
        for r in rows
        if r["shipped"] < max(r["patch"], r["image"]) - 0.02
    ]
    print(f"shipped more than 0.02 below its better part: {worse or 'never'}")


if __name__ == "__main__":
    main()
