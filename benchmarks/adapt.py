"""On-device adaptation: time (features vs head training), peak memory, and accuracy under drift.

Drift scenario from real images: the built-in `surfaces` example photographed "under new lighting"
(brightness x0.55, contrast x0.8, slight blur). The bundle is fitted on clean images; the device
then adapts on N drifted, labelled images. Accuracy is measured on held-out drifted and clean
validation images before and after (clean = no forgetting of the original conditions).

    .venv/bin/python benchmarks/adapt.py [--sizes 100 500] [--json]

Each adapt runs as `edgetl adapt` in its own process (as on a device), so its peak RSS is real;
"beyond runtime" subtracts the peak RSS of `edgetl predict` on one image with the same bundle.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _provenance  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
from PIL import Image, ImageEnhance, ImageFilter


def drift(src: Path, dst: Path) -> None:
    for p in sorted(src.rglob("*.png")):
        q = dst / p.relative_to(src)
        q.parent.mkdir(parents=True, exist_ok=True)
        im = Image.open(p).convert("RGB")
        im = ImageEnhance.Brightness(im).enhance(0.55)
        im = ImageEnhance.Contrast(im).enhance(0.8)
        im.filter(ImageFilter.GaussianBlur(1.2)).save(q)


# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of this (torch-laden)
# process would report the parent's size.
_CHILD = (
    "import atexit, sys\n"
    "def _peak():\n"
    "    kb = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
    "    sys.stderr.write('PEAK_KB %s\\n' % kb[0])\n"
    "atexit.register(_peak)\n"
    "from edgetl.cli import main\n"
    "sys.argv = ['edgetl'] + sys.argv[1:]\n"
    "main()\n"
)


def child_peak_mb(cmd: list[str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run a CLI command in a fresh process: (wall seconds, that process's peak RSS in MB, result)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _CHILD, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_kb = max([int(l.split()[1]) for l in r.stderr.splitlines() if l.startswith("PEAK_KB")] or [0])
    return wall, peak_kb / 1024, r


def subset(root: Path, dst: Path, n: int) -> None:
    classes = sorted(p.name for p in root.iterdir())
    files = {c: sorted((root / c).glob("*.png")) for c in classes}
    i = 0
    while i < n:
        for c in classes:
            k = i // len(classes)
            if k < len(files[c]) and i < n:
                (dst / c).mkdir(parents=True, exist_ok=True)
                shutil.copy(files[c][k], dst / c / files[c][k].name)
            i += 1


def main() -> None:
    _provenance.stamp()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 500])
    ap.add_argument("--target", default="openvino-cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from edgetl.datasets.images import make_surfaces
    from edgetl.device.predict import load_predictor
    from edgetl.pipeline.fit import FitOptions, fit

    tmp = Path(tempfile.mkdtemp(prefix="edgetl-adapt-"))
    clean = tmp / "clean"
    make_surfaces(clean, seed=0, per_class=max(args.sizes) // 8 + 8, val_per_class=16)
    drifted = tmp / "drifted"
    drift(clean, drifted)
    base = tmp / "base.bundle"
    fit(
        clean,
        base,
        options=FitOptions(
            target=args.target, cache_dir=str(tmp / "cache"), quiet=True, allow_drop=True, calibration_size=100
        ),
    )
    p = load_predictor(base)
    before = {
        "drifted_val": p.evaluate(drifted / "val")["accuracy"],
        "clean_val": p.evaluate(clean / "val")["accuracy"],
    }
    _, rt_peak, _ = child_peak_mb(["predict", str(base), str(next((clean / "val").rglob("*.png")))])

    rows = []
    for n in args.sizes:
        b = tmp / f"adapt-{n}.bundle"
        shutil.copytree(base, b)
        data = tmp / f"new-{n}"
        subset(drifted / "train", data, n)
        wall, peak, r = child_peak_mb(["adapt", str(b), str(data), "--json", "--quiet"])
        if r.returncode != 0:
            raise SystemExit(f"adapt failed: {r.stderr}")
        out = json.loads(r.stdout)
        p = load_predictor(b)
        rows.append(
            {
                "images": n,
                "wall_s": round(wall, 2),
                "features_s": out["timings_s"]["features"],
                "train_s": out["timings_s"]["train"],
                "write_s": out["timings_s"].get("write"),
                "peak_rss_mb": round(peak, 1),
                "beyond_runtime_mb": round(peak - rt_peak, 1),
                "gate": {k: out["gate"][k] for k in ("old_known_accuracy", "new_known_accuracy", "passed")},
                "after": {
                    "drifted_val": p.evaluate(drifted / "val")["accuracy"],
                    "clean_val": p.evaluate(clean / "val")["accuracy"],
                },
            }
        )
    result = {"target": args.target, "before": before, "runtime_peak_rss_mb": round(rt_peak, 1), "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"edgetl adapt — {args.target} bundle fitted on clean `surfaces`, adapted on drifted images")
    print(
        f"before: drifted val {before['drifted_val']:.1%}, clean val {before['clean_val']:.1%}; "
        f"`predict` process peak RSS {rt_peak:.0f} MB"
    )
    for r in rows:
        print(
            f"{r['images']:>4} images: features {r['features_s']:.2f} s, head training {r['train_s']:.2f} s "
            f"(whole command {r['wall_s']:.1f} s), peak RSS {r['peak_rss_mb']:.0f} MB "
            f"(+{r['beyond_runtime_mb']:.0f} MB over predict); after: drifted val {r['after']['drifted_val']:.1%}, "
            f"clean val {r['after']['clean_val']:.1%}"
        )


if __name__ == "__main__":
    main()
