"""`edgetl report` on the three built-in examples: renders a classify, a defect and a text report
(with head versions, an adapt and a rollback so the device history has something to show),
screenshots them in headless Chromium for the docs, and times a report on a 1,000-image
evaluation.

    .venv/bin/python benchmarks/report.py [--work DIR] [--docs docs] [--runs 3] [--no-screenshots] [--json]

The 1,000-image figure: `make_surfaces(seed=1, per_class=1, val_per_class=125)` (8 classes x 125
validation images, crops the bundle never saw) evaluated by an INT8 bundle on the default target
(openvino-cpu), timed as `edgetl eval` alone and as the whole report (evaluation + figures + page),
wall-clock and CPU seconds, with this machine's load average beside them: on a shared machine,
compare rows of one run.

Screenshots need Chromium and playwright-core (tests/browser; `tools/system-deps.sh` installs them).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import _provenance  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

REPO = Path(__file__).resolve().parents[1]


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, round(time.perf_counter() - w, 2), round(time.process_time() - c, 2)


def build(work: Path, cache: Path) -> dict:
    """The three bundles, with a head-version history, and their evaluation data."""
    from edgetl import FitOptions, adapt, fit, rollback
    from edgetl.datasets.images import make_defects, make_surfaces
    from edgetl.datasets.tickets import make_tickets

    def fresh(name: str) -> Path:
        p = work / name
        if p.exists():
            import shutil

            shutil.rmtree(p)
        return p

    surfaces, more, later = fresh("surfaces"), fresh("surfaces-new"), fresh("surfaces-later")
    make_surfaces(surfaces, seed=0, per_class=16, val_per_class=8)
    make_surfaces(more, seed=2, per_class=6, val_per_class=1)
    make_surfaces(later, seed=3, per_class=6, val_per_class=1)
    defects, good = fresh("defects"), fresh("defects-new")
    make_defects(defects, seed=0, n_train_good=30, n_test_good=10, n_test_defect=20, size=160)
    make_defects(good, seed=7, n_train_good=8, n_test_good=0, n_test_defect=0, size=160)
    tickets = fresh("tickets")
    make_tickets(tickets, seed=0, per_class=30, val_per_class=12)
    with open(tickets / "tickets.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    val = tickets / "val.csv"
    with open(val, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["text", "label"])
        w.writerows([r["text"], r["label"]] for r in rows if r["split"] == "val")

    opts = dict(cache_dir=str(cache), quiet=True)
    cls = fit(
        surfaces, work / "surfaces.bundle", force=True, options=FitOptions(calibration_size=64, allow_drop=True, **opts)
    ).bundle
    # wait: OpenVINO's telemetry may still hold a forked copy of the writer lock for a moment
    adapt(cls, more / "train", quiet=True, force=True, wait=30)
    adapt(cls, later / "train", quiet=True, force=True, wait=30)
    rollback(cls.path, wait=30)  # the last adapt is taken back: the history shows it
    dft = fit(
        defects,
        work / "defects.bundle",
        force=True,
        options=FitOptions(target="cpu-x86", calibration_size=32, allow_drop=True, **opts),
    ).bundle
    adapt(dft, good / "train" / "good", quiet=True, wait=30)
    txt = fit(
        tickets / "tickets.csv", work / "tickets.bundle", force=True, options=FitOptions(allow_drop=True, **opts)
    ).bundle
    return {"classify": (cls.path, surfaces / "val"), "defects": (dft.path, defects), "text": (txt.path, val)}


def _spread(values: list[float]) -> str:
    v = sorted(values)
    mid = v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
    return f"{mid:.2f} [{v[0]:.2f}-{v[-1]:.2f}]"


def _shrink(png: Path, limit: int = 300_000) -> int:
    """A page screenshot as a 256-colour PNG (text and plots survive it; thumbnails band a little),
    halved in width until it fits ``limit`` bytes (documentation images stay small)."""
    from PIL import Image

    with Image.open(png) as im:
        im = im.convert("RGB")
    while True:
        q = im.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        q.save(png, optimize=True)
        if png.stat().st_size <= limit or im.width < 500:
            return png.stat().st_size
        im = im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.Resampling.LANCZOS)


def main(argv=None) -> int:
    _provenance.stamp()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="Keep datasets, bundles and reports here (default: a temp dir).")
    ap.add_argument("--docs", type=Path, default=REPO / "docs", help="Where the screenshots go.")
    ap.add_argument("--runs", type=int, default=3, help="Reports timed per bundle (the spread is over these).")
    ap.add_argument("--no-screenshots", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="edgetl-report-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("EDGETL_CACHE", work / "cache"))
    os.environ["EDGETL_CACHE"] = str(cache)

    from edgetl import load_predictor
    from edgetl.datasets.images import make_surfaces
    from edgetl.report import write_report

    (bundles, build_s, _) = _timed(lambda: build(work, cache))
    out = {"work": str(work), "build_s": build_s, "runs": a.runs, "cpus": os.cpu_count(), "reports": {}}
    for name, (bundle, data) in bundles.items():
        page = work / f"report-{name}.html"
        rows = []
        for _ in range(a.runs):
            r, wall, cpu = _timed(
                lambda b=bundle, d=data, o=page, n=name: write_report(
                    b, d, out=o, bench=n == "classify", all_versions=True
                )
            )
            rows.append({"wall_s": wall, "cpu_s": cpu, "seconds": r.seconds})
        out["reports"][name] = {
            "html": str(page),
            "mb": round(r.bytes / 1e6, 2),
            "items": r.figures.get("n"),
            "runs": rows,
            "figures": r.figures,
        }

    big = work / "surfaces-1000"
    if not big.exists():
        make_surfaces(big, seed=1, per_class=1, val_per_class=125)
    bundle = bundles["classify"][0]
    load = os.getloadavg()[0]
    evals, reps = [], []
    for _ in range(a.runs):
        m, eval_wall, eval_cpu = _timed(lambda: load_predictor(bundle).evaluate(big / "val"))
        evals.append({"wall_s": eval_wall, "cpu_s": eval_cpu})
        r, wall, cpu = _timed(lambda: write_report(bundle, big / "val", out=work / "report-1000.html"))
        reps.append({"wall_s": wall, "cpu_s": cpu, "seconds": r.seconds})
    out["thousand"] = {
        "images": m["n"],
        "accuracy": m["accuracy"],
        "eval": evals,
        "report": reps,
        "report_mb": round(r.bytes / 1e6, 2),
        "load_average_1min_before": round(load, 2),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "all_within_15_s": all(x["wall_s"] < 15.0 for x in reps),
    }

    if not a.no_screenshots:
        sys.path.insert(0, str(REPO))
        from tests.browser.util import browser_available, check_page

        why = browser_available()
        if why:
            print(f"no screenshots: {why}", file=sys.stderr)
        else:
            a.docs.mkdir(parents=True, exist_ok=True)
            for name, rep in out["reports"].items():
                shot = a.docs / f"report-{name}.png"
                seen = check_page(
                    Path(rep["html"]).resolve().as_uri(),
                    screenshot=str(shot.resolve()),
                    viewport={"width": 1180, "height": 900},
                )
                rep["screenshot"] = str(shot)
                rep["screenshot_bytes"] = _shrink(shot)
                rep["browser"] = {
                    k: seen[k] for k in ("console_errors", "page_errors", "external_requests", "broken_images")
                }

    if a.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    print(
        f"work dir {work} (bundles built in {build_s:.0f} s); {a.runs} runs each, median [min-max]; "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"{'report':<10} {'items':>5} {'MB':>5} {'wall s':>19} {'cpu s':>19}  last run: evaluate / versions / "
        "bench / render"
    )
    for name, rep in out["reports"].items():
        s = rep["runs"][-1]["seconds"]
        print(
            f"{name:<10} {rep['items'] or 0:>5} {rep['mb']:>5.2f} {_spread([x['wall_s'] for x in rep['runs']]):>19} "
            f"{_spread([x['cpu_s'] for x in rep['runs']]):>19}  "
            f"{s.get('evaluate', 0):.2f} / {s.get('versions', 0):.2f} / {s.get('bench', 0):.2f} / {s['render']:.2f}"
            + (
                f"   browser: {sum(len(v) for v in rep['browser'].values())} problems, screenshot "
                f"{rep['screenshot_bytes'] / 1e3:.0f} kB"
                if "browser" in rep
                else ""
            )
        )
    t = out["thousand"]
    s = t["report"][-1]["seconds"]
    print(
        f"1,000-image report ({t['images']} images, {t['report_mb']:.2f} MB): wall "
        f"{_spread([x['wall_s'] for x in t['report']])} s, CPU {_spread([x['cpu_s'] for x in t['report']])} s "
        f"(last: evaluation {s['evaluate']:.2f} s, page {s['render']:.2f} s); `eval` alone wall "
        f"{_spread([x['wall_s'] for x in t['eval']])} s; accuracy {t['accuracy']:.2%}; load average "
        f"{t['load_average_1min_before']} -> {t['load_average_1min_after']}: "
        f"{'every run under' if t['all_within_15_s'] else 'NOT every run under'} 15 s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
