"""Drift on the device, measured: controlled shifts, folder-level AUROC, false alarms, cost per frame.

    .venv/bin/python benchmarks/drift.py [--work /tmp/transfer-work] [--folders 200] [--json]

Two datasets, EfficientNet-Lite0 FP32 ONNX Runtime features:

* ``surfaces``: edgetl's built-in example with 48 training and 64 held-out crops per class; the
  held-out crops (from parts of each photograph no training crop touches) are split into 16 per
  class of *reference* images (what ``fit``'s validation split would be) and 48 per class of
  unshifted "production" images;
* ``digits``: 30 training and 15 reference digits per class, and 500 other digits as production.

Production images are then shifted: brightness x0.7 / x0.5 / x1.4, contrast x0.6 / x0.4, Gaussian
blur radius 1 / 2, pixel noise (sigma 12 grey levels), JPEG quality 10, a new texture (cat fur
crops; letters for the digits) and a folder mixing 25 % new texture into unshifted images.

Measured: per-image ood rate (p < 0.01) and the per-image drift score's AUROC (shifted vs
unshifted images); folders of 20 and 50 images drawn at random: the folder test's false-alarm rate
at p < 0.05 on ``--folders`` unshifted folders, its AUROC separating shifted from unshifted folders
(statistic: the p-value), the shift size and the verdicts; the false-alarm rate again with the
reference images re-drawn per folder (the level the test guarantees); the head's accuracy per condition with
:func:`edgetl.transfer.groups.group_accuracy` (group = condition), and a null check with random
groups; and the cost of per-image drift scoring as a fraction of the predict path (decode,
preprocess, backbone, head) at batch 1.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections import Counter
from pathlib import Path

import _provenance  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
import _shared as F
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from edgetl.datasets.images import make_surfaces
from edgetl.transfer.drift import DriftReference, drift_summary, fit_drift_reference, save_drift_reference
from edgetl.transfer.groups import group_accuracy

BACKBONE = "efficientnet_lite0"


def _jpeg(im: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=q)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _noise(im: Image.Image, sigma: float, seed: int) -> Image.Image:
    a = np.asarray(im, np.float32) + np.random.default_rng(seed).normal(0, sigma, (im.size[1], im.size[0], 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


SHIFTS = {
    "brightness x0.7": lambda im, s: ImageEnhance.Brightness(im).enhance(0.7),
    "brightness x0.5": lambda im, s: ImageEnhance.Brightness(im).enhance(0.5),
    "brightness x1.4": lambda im, s: ImageEnhance.Brightness(im).enhance(1.4),
    "contrast x0.6": lambda im, s: ImageEnhance.Contrast(im).enhance(0.6),
    "contrast x0.4": lambda im, s: ImageEnhance.Contrast(im).enhance(0.4),
    "blur r1": lambda im, s: im.filter(ImageFilter.GaussianBlur(1.0)),
    "blur r2": lambda im, s: im.filter(ImageFilter.GaussianBlur(2.0)),
    "noise s12": lambda im, s: _noise(im, 12.0, s),
    "jpeg q10": lambda im, s: _jpeg(im, 10),
}


def _new_texture_images(name: str, n: int, size: int, out: Path) -> list[str]:
    """Images of something the training data never showed: cat fur (surfaces) or letters (digits)."""
    from skimage import data as skdata

    rng = np.random.default_rng(7)
    paths = []
    if name == "surfaces":
        src = np.asarray(skdata.chelsea())[:, 60:360]  # mostly fur
        frac = (0.25, 0.5)
    else:
        src = np.asarray(skdata.text())
        src = np.repeat(src[..., None], 3, axis=2)
        frac = (0.15, 0.3)
    H, W = src.shape[:2]
    for i in range(n):
        w = int(rng.uniform(*frac) * min(H, W))
        y, x = int(rng.integers(0, H - w + 1)), int(rng.integers(0, W - w + 1))
        crop = Image.fromarray(np.ascontiguousarray(src[y : y + w, x : x + w])).convert("RGB").resize((size, size))
        if name == "digits":  # the digits are bright strokes on black
            crop = Image.fromarray(255 - np.asarray(crop))
        p = out / f"new_{i:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        crop.save(p)
        paths.append(str(p))
    return paths


def build(work: Path, name: str) -> dict:
    root = work / "data" / f"drift-{name}"
    index = root / "index.json"
    if index.is_file():
        return json.loads(index.read_text())
    if name == "surfaces":
        make_surfaces(root / "raw", seed=0, per_class=48, val_per_class=64)
        classes = sorted(p.name for p in (root / "raw" / "train").iterdir() if p.is_dir())
        side = lambda d: [
            (str(p), classes.index(c.name)) for c in sorted(d.iterdir()) if c.is_dir() for p in sorted(c.glob("*.png"))
        ]
        train, held = side(root / "raw" / "train"), side(root / "raw" / "val")
        ref = [t for t in held if int(Path(t[0]).stem.split("_")[-1]) < 16]
        prod = [t for t in held if int(Path(t[0]).stem.split("_")[-1]) >= 16]
        size = 160
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        rng = np.random.default_rng(0)
        classes = [str(c) for c in range(10)]
        picks = {c: rng.permutation(np.flatnonzero(d.target == c)) for c in range(10)}
        tr_idx = np.concatenate([picks[c][:30] for c in range(10)])
        ref_idx = np.concatenate([picks[c][30:45] for c in range(10)])
        rest = np.setdiff1d(np.arange(len(d.target)), np.concatenate([tr_idx, ref_idx]))
        prod_idx = rng.choice(rest, 500, replace=False)

        def write(idx, split):
            out = []
            for i in idx:
                arr = (d.images[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
                p = root / split / str(d.target[i]) / f"d{i:04d}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).resize((64, 64), Image.BILINEAR).convert("RGB").save(p)
                out.append((str(p), int(d.target[i])))
            return out

        train, ref, prod = write(tr_idx, "train"), write(ref_idx, "reference"), write(prod_idx, "production")
        size = 64
    shifted = {}
    for si, (shift, fn) in enumerate(SHIFTS.items()):
        paths = []
        for j, (p, _) in enumerate(prod):
            out = root / "shifted" / shift.replace(" ", "_") / f"{j:04d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            fn(Image.open(p).convert("RGB"), 1000 * si + j).save(out)
            paths.append(str(out))
        shifted[shift] = paths
    new = _new_texture_images(name, len(prod), size, root / "shifted" / "new_texture")
    d = {
        "classes": classes,
        "train": train,
        "reference": ref,
        "production": prod,
        "shifted": shifted,
        "new_texture": new,
    }
    index.write_text(json.dumps(d))
    return d


def feats(work: Path, tag: str, paths: list[str]) -> np.ndarray:
    import hashlib

    f = work / "features" / f"drift-{tag}-{hashlib.sha256(chr(10).join(paths).encode()).hexdigest()[:12]}.npy"
    if f.is_file():
        return np.load(f, allow_pickle=False)
    X = F.backbone_features(paths, BACKBONE)
    f.parent.mkdir(parents=True, exist_ok=True)
    np.save(f, X, allow_pickle=False)
    return X


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(pos > neg) + 0.5 P(tie): the Mann-Whitney form of the ROC area."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def run(work: Path, name: str, n_folders: int, n_shifted: int, permutations: int) -> dict:
    d = build(work, name)
    k = len(d["classes"])
    Xtr = feats(work, f"{name}-train", [p for p, _ in d["train"]])
    ytr = np.array([c for _, c in d["train"]])
    Xref = feats(work, f"{name}-ref", [p for p, _ in d["reference"]])
    yref = np.array([c for _, c in d["reference"]])
    Xp = feats(work, f"{name}-prod", [p for p, _ in d["production"]])
    yp = np.array([c for _, c in d["production"]])
    conds = {"unshifted": Xp}
    for s, paths in d["shifted"].items():
        conds[s] = feats(work, f"{name}-{s.replace(' ', '_')}", paths)
    Xnew = feats(work, f"{name}-new", d["new_texture"])
    conds["new texture"] = Xnew
    t0 = time.perf_counter()
    ref = fit_drift_reference(Xtr, ytr, X_cal=Xref, y_cal=yref, n_classes=k, rank=32)
    fit_s = time.perf_counter() - t0
    size_bytes = save_drift_reference(ref, work / f"drift-{name}.npz").stat().st_size
    head = F.train_linear_head(Xtr, ytr, k)

    rng = np.random.default_rng(0)
    base = ref.score(Xp)
    out = {
        "dataset": name,
        "n_train": len(ytr),
        "n_reference": len(yref),
        "n_production": len(yp),
        "fit_seconds": round(fit_s, 3),
        "npz_bytes": int(size_bytes),
        "rank": ref.rank,
        "conditions": {},
    }
    folder_sizes = (20, 50)
    null_p = {}
    for fs in folder_sizes:
        ps = []
        for i in range(n_folders):
            idx = rng.choice(len(Xp), fs, replace=False)
            ps.append(drift_summary(ref, Xp[idx], permutations=permutations, seed=i).p_value)
        null_p[fs] = np.array(ps)
    mixed = None
    for cond, X in list(conds.items()) + [("25% new texture", None)]:
        if cond == "25% new texture":
            mixed = True
        sc = ref.score(X) if X is not None else None
        row = {}
        if X is not None:
            row["image_ood_rate"] = round(float(sc.ood.mean()), 4)
            row["image_ood_rate_05"] = round(float(ref.score(X, image_alpha=0.05).ood.mean()), 4)
            if cond != "unshifted":
                row["image_auroc"] = round(auroc(sc.score, base.score), 4)
            if cond != "new texture":
                row["accuracy"] = round(float(np.mean(head.predict(X) == yp)), 4)
        for fs in folder_sizes:
            if cond == "unshifted":
                p = null_p[fs]
                verdicts, effects = [], []
                for i in range(min(n_shifted, n_folders)):
                    idx = np.random.default_rng(10_000 + i).choice(len(Xp), fs, replace=False)
                    s = drift_summary(ref, Xp[idx], permutations=permutations, seed=i)
                    verdicts.append(s.verdict)
                    effects.append(s.mmd2_excess)
                row[f"folder{fs}"] = {
                    "false_alarm_rate": round(float(np.mean(p < 0.05)), 4),
                    "false_alarm_rate_01": round(float(np.mean(p < 0.01)), 4),
                    "folders": len(p),
                    "verdicts": dict(Counter(verdicts)),
                    "effect": round(float(np.mean(effects)), 4),
                }
                continue
            ps, verdicts, effects = [], [], []
            for i in range(n_shifted):
                r = np.random.default_rng(20_000 + i)
                if mixed:
                    n_new = fs // 4
                    Xf = np.concatenate(
                        [
                            Xnew[r.choice(len(Xnew), n_new, replace=False)],
                            Xp[r.choice(len(Xp), fs - n_new, replace=False)],
                        ]
                    )
                else:
                    Xf = X[r.choice(len(X), fs, replace=False)]
                s = drift_summary(ref, Xf, permutations=permutations, seed=i)
                ps.append(s.p_value)
                verdicts.append(s.verdict)
                effects.append(s.mmd2_excess)
            ps = np.array(ps)
            row[f"folder{fs}"] = {
                "auroc": round(auroc(-ps, -null_p[fs]), 4),
                "detected_05": round(float(np.mean(ps < 0.05)), 4),
                "verdicts": dict(Counter(verdicts)),
                "effect": round(float(np.mean(effects)), 4),
            }
        out["conditions"][cond] = row

    # per-group accuracy: the production images under every label-preserving condition, group = condition
    y_all, pred_all, g_all = [], [], []
    for cond, X in conds.items():
        if cond == "new texture":
            continue
        y_all.append(yp)
        pred_all.append(head.predict(X))
        g_all += [cond] * len(yp)
    gr = group_accuracy(np.concatenate(y_all), np.concatenate(pred_all), g_all)
    rand_groups = np.random.default_rng(1).choice(["camA", "camB", "camC", "camD"], len(yp))
    null = group_accuracy(yp, head.predict(Xp), rand_groups)
    out["groups"] = {"by_condition": gr.to_dict(), "random_cameras": null.to_dict()}

    # per-class: one class blurred in a labelled folder of 160 production images
    r = np.random.default_rng(3)
    idx = r.choice(len(Xp), 160, replace=False)
    Xf = Xp[idx].copy()
    yf = yp[idx]
    hit = yf == 0
    Xf[hit] = conds["blur r2"][idx][hit]
    s = drift_summary(ref, Xf, yf, permutations=permutations)
    out["per_class_demo"] = {"shifted_class": 0, "p_value": s.p_value, "verdict": s.verdict, "per_class": s.per_class}
    out["marginal_false_alarms"] = marginal_far(
        ref, np.concatenate([Xref, Xp]), np.concatenate([yref, yp]), len(yref), n_folders, permutations
    )
    out["cost"] = cost(work, d, ref, head)
    return out


def marginal_far(ref, X_held: np.ndarray, y_held: np.ndarray, m: int, trials: int, permutations: int) -> dict:
    """False alarms with the reference images re-drawn for every folder from all held-out images: the
    level the permutation test guarantees (one fixed reference set gives a rate scattered around it)."""
    out = {}
    for fs in (20, 50):
        ps, ood = [], []
        for i in range(trials):
            r = np.random.default_rng(50_000 + i)
            perm = r.permutation(len(X_held))
            ref_rows, folder = perm[:m], perm[m : m + fs]
            s, W = ref.coordinates(X_held[ref_rows])
            arrays = dict(
                ref.arrays,
                ref_scores=s.astype(np.float32),
                ref_coords=W.astype(np.float32),
                ref_labels=y_held[ref_rows].astype(np.int32),
            )
            trial = DriftReference(arrays)
            ps.append(drift_summary(trial, X_held[folder], permutations=permutations, seed=i).p_value)
            ood.append(trial.score(X_held[folder]).ood.mean())
        ps = np.array(ps)
        out[f"folder{fs}"] = {
            "false_alarm_rate": round(float(np.mean(ps < 0.05)), 4),
            "false_alarm_rate_01": round(float(np.mean(ps < 0.01)), 4),
            "trials": trials,
            "image_ood_rate": round(float(np.mean(ood)), 4),
        }
    return out


def cost(work: Path, d: dict, ref, head, n: int = 40) -> dict:
    """Per-image predict time (decode + preprocess + backbone at batch 1 + head) vs drift scoring."""
    session, pre = F.backbone_session(BACKBONE)
    paths = [p for p, _ in d["production"][:n]]
    F.predict_features(paths[:5], session, pre)  # warm up
    runs = []
    for _ in range(3):  # the machine is shared: the fastest of three passes
        t0 = time.perf_counter()
        X = F.predict_features(paths, session, pre, batch_size=1)
        head.proba(X)
        runs.append((time.perf_counter() - t0) / n * 1000)
    predict_ms = min(runs)
    x1 = X[:1]
    for _ in range(20):
        ref.score(x1)
    reps = 2000
    t0 = time.perf_counter()
    for i in range(reps):
        ref.score(X[i % n : i % n + 1])
    drift1_ms = (time.perf_counter() - t0) / reps * 1000
    t0 = time.perf_counter()
    for _ in range(200):
        ref.score(X[:32])
    drift32_ms = (time.perf_counter() - t0) / 200 / 32 * 1000
    return {
        "predict_ms_per_image": round(predict_ms, 3),
        "drift_ms_per_image_batch1": round(drift1_ms, 4),
        "drift_ms_per_image_batch32": round(drift32_ms, 5),
        "fraction_batch1": round(drift1_ms / predict_ms, 5),
    }


def report(results: list[dict]) -> str:
    L = []
    for r in results:
        L.append(
            f"### {r['dataset']} ({r['n_train']} train, {r['n_reference']} reference, {r['n_production']} "
            f"production images; rank {r['rank']}, drift.npz {r['npz_bytes'] / 1024:.0f} KB, fit {r['fit_seconds']} s)"
        )
        L.append("")
        L.append(
            "| condition | head accuracy | image ood rate (p<0.01) | image AUROC | folder-20 AUROC / detected | "
            "folder-50 AUROC / detected | folder-50 shift size | folder-50 verdicts |"
        )
        L.append("|---|---|---|---|---|---|---|---|")
        for cond, row in r["conditions"].items():
            acc = f"{100 * row['accuracy']:.1f}%" if "accuracy" in row else "-"
            ood = f"{100 * row['image_ood_rate']:.1f}%" if "image_ood_rate" in row else "-"
            ia = f"{row['image_auroc']:.3f}" if "image_auroc" in row else "-"
            cells = []
            for fs in (20, 50):
                f = row[f"folder{fs}"]
                if cond == "unshifted":
                    cells.append(
                        f"false alarms {100 * f['false_alarm_rate']:.1f}% at 0.05 "
                        f"({100 * f['false_alarm_rate_01']:.1f}% at 0.01; {f['folders']} folders)"
                    )
                else:
                    cells.append(f"{f['auroc']:.3f} / {100 * f['detected_05']:.0f}%")
            verdicts = ", ".join(f"{k} {v}" for k, v in sorted(row["folder50"]["verdicts"].items()))
            eff = row["folder50"].get("effect")
            eff = "-" if eff is None else f"{eff:.3f}"
            L.append(f"| {cond} | {acc} | {ood} | {ia} | {cells[0]} | {cells[1]} | {eff} | {verdicts} |")
        mf = r["marginal_false_alarms"]
        L.append("")
        L.append(
            "Reference re-drawn per folder from all held-out images (the test's guaranteed level): false alarms "
            + "; ".join(
                f"folders of {fs}: {100 * mf[f'folder{fs}']['false_alarm_rate']:.1f}% at 0.05, "
                f"{100 * mf[f'folder{fs}']['false_alarm_rate_01']:.1f}% at 0.01 "
                f"({mf[f'folder{fs}']['trials']} folders; image ood rate "
                f"{100 * mf[f'folder{fs}']['image_ood_rate']:.2f}% at 0.01)"
                for fs in (20, 50)
            )
            + "."
        )
        g = r["groups"]["by_condition"]
        nul = r["groups"]["random_cameras"]
        c = r["cost"]
        L.append("")
        L.append(
            f"Per-group accuracy (group = condition): worst {g['worst']!r}, gap {g['gap_pp']} pp "
            f"[{g['lower_pp']}, {g['upper_pp']}], flagged {g['flagged']}; random 'camera' groups on unshifted "
            f"images: worst {nul['worst']!r}, gap {nul['gap_pp']} pp [{nul['lower_pp']}, {nul['upper_pp']}], "
            f"flagged {nul['flagged']}."
        )
        pc = r["per_class_demo"]
        L.append(
            f"One class (index 0) blurred in a labelled folder of 160: folder p = {pc['p_value']:.3g}, verdict "
            f"{pc['verdict']}; per-class adjusted p: "
            + ", ".join(f"{x['class']}: {x['p_adjusted']:.3g}" for x in pc["per_class"])
            + "."
        )
        L.append(
            f"Cost: predict {c['predict_ms_per_image']:.2f} ms/image (batch 1), drift scoring "
            f"{1000 * c['drift_ms_per_image_batch1']:.1f} us/image at batch 1 "
            f"({100 * c['fraction_batch1']:.2f}% of predict), {1000 * c['drift_ms_per_image_batch32']:.2f} us/image "
            "at batch 32."
        )
        L.append("")
    return "\n".join(L)


def main(argv=None) -> int:
    _provenance.stamp()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/transfer-work"))
    ap.add_argument("--folders", type=int, default=200, help="unshifted folders per size (false-alarm rate)")
    ap.add_argument("--shifted-folders", type=int, default=50, help="folders per shifted condition and size")
    ap.add_argument("--permutations", type=int, default=500)
    ap.add_argument("--datasets", default="surfaces,digits")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    results = [
        run(args.work, n, args.folders, args.shifted_folders, args.permutations) for n in args.datasets.split(",") if n
    ]
    text = report(results)
    (args.work / "drift-results.json").write_text(json.dumps(results, indent=1, default=float))
    (args.work / "drift-results.md").write_text(text + "\n")
    print(json.dumps(results, default=float) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
