"""``edgetl report``: one self-contained HTML page per bundle, for the people who decide whether a
model may go to the line.

It shows the bundle's own record (task, backbone, target, precision, size, latency, the
conversion gate's decision with its interval, the head versions) and, given labelled data, an
evaluation through the device-side predictor: for classifiers (images or texts) the confusion
matrix, recall and precision per class, a reliability diagram, accuracy against coverage as the
"unknown" threshold varies, and the mistakes themselves; for defect detectors the score
histograms, ROC curves, and the images closest to the threshold with their heat maps.

Device side: numpy, Pillow, the bundle's runtime and matplotlib (the ``report`` extra); no torch.

Example:
    >>> from edgetl.report import write_report
    >>> write_report("parts.bundle", "parts/val", out="parts.html").path  # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, require

__all__ = ["ReportResult", "check_dependencies", "check_out", "default_out", "report_for_fit", "write_report"]


@dataclass
class ReportResult:
    """Where the page went and what it says at a glance (the ``--json`` object)."""

    path: Path
    bytes: int
    task: str
    bundle: str
    data: str | None
    figures: dict
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "report": str(self.path),
            "bytes": self.bytes,
            "task": self.task,
            "bundle": self.bundle,
            "data": self.data,
            "figures": self.figures,
            "seconds": self.seconds,
        }


def check_dependencies() -> None:
    """Fail at once (before any evaluation) when the plotting library is missing.

    Raises:
        MissingDependency: matplotlib is not installed; the message says ``pip install 'edgetl[report]'``.
    """
    require("matplotlib", extra="report", purpose="edgetl report (its figures)")


# Written into every page, so that a later report may replace an earlier one but never a file
# that someone else made (a mistyped --out naming a CSV or a hand-written page).


def default_out(bundle_path) -> Path:
    """Where a report goes when no ``--out`` is given: beside the bundle, named after it
    (``lines/parts.bundle`` -> ``lines/parts-report.html``)."""
    p = Path(bundle_path).resolve()
    name = p.name[: -len(".bundle")] if p.name.endswith(".bundle") and len(p.name) > 7 else p.name
    return p.parent / f"{name}-report.html"


def _is_report(path: Path) -> bool:
    from .collect import GENERATOR  # here: importing the package stays light (the CLI's --help)

    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return f'<meta name="generator" content="{GENERATOR}'.encode() in head


def check_out(out: Path, bundle_path: Path, *, folder_must_exist: bool = True) -> Path:
    """Refuse, before any work, an ``out`` that is a folder, lies inside the bundle, or is a file
    that is not an earlier report (``fit --report`` checks before it trains, when the bundle's
    folder may not exist yet).

    Raises:
        ConfigError: one of those, with what to do instead.
    """
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out}: a folder; give a file name such as {out / 'report.html'}")
    if out.exists() and not _is_report(out):
        raise ConfigError(
            f"--out {out}: the file exists and is not an edgetl report; give another name or move it "
            "away (a report replaces only an earlier report)"
        )
    try:
        inside = out.resolve().is_relative_to(Path(bundle_path).resolve())
    except (OSError, ValueError):
        inside = False
    if inside:
        raise ConfigError(
            f"--out {out}: inside the bundle (its files are hashed and signed); write the report next to it instead"
        )
    if folder_must_exist and not out.parent.exists():
        raise ConfigError(f"--out {out}: folder {out.parent} does not exist")
    return out


def write_report(
    bundle,
    data=None,
    *,
    out,
    bench: bool = False,
    all_versions: bool = False,
    runs: int = 50,
    device: str | None = None,
    title: str | None = None,
    quiet: bool = True,
    strict: bool = False,
) -> ReportResult:
    """Write the report of ``bundle`` to ``out`` (one HTML file, nothing outside it).

    Args:
        bundle: a bundle directory or a loaded :class:`edgetl.core.bundle.Bundle`.
        data: labelled data to evaluate on (what ``edgetl eval`` takes: an image folder or CSV, a
            text file, a defect test set), or labelled items a fit found; None: the figures the
            bundle recorded when it was made.
        out: the HTML file to write (not inside the bundle).
        bench: time the bundle on this machine too (batch-1 distribution, throughput per batch).
        all_versions: with ``data``, evaluate every head version on it (one pass each).
        runs: timed batch-1 runs with ``bench``.
        device: OpenVINO device override.
        title: the page's title (default: the bundle's folder name).

    Raises:
        MissingDependency: matplotlib is missing (``pip install 'edgetl[report]'``).
        BundleError: not a bundle, or a damaged one.  DataError: unusable ``data``.
        ConfigError: ``out`` is a folder, is inside the bundle, or its folder does not exist.
    """
    from ..core.bundle import Bundle, load_bundle
    from .collect import gather
    from .page import render

    check_dependencies()
    t0 = time.perf_counter()
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    out = check_out(Path(out), b.path)
    r = gather(b, data, bench=bench, all_versions=all_versions, runs=runs, device=device, quiet=quiet, strict=strict)
    page = render(r, title=title).encode("utf-8")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(page)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    r.timings["total"] = round(time.perf_counter() - t0, 3)
    return ReportResult(out, len(page), r.name, str(b.path), r.data, headline(r), dict(r.timings))


def headline(r) -> dict:
    """The report's key figures, for ``--json`` and scripts."""
    gate = r.recorded.get("gate") or {}
    out = {
        "gate": gate.get("verdict"),
        "gate_drop_pp": gate.get("drop_pp"),
        "gate_interval_pp": [gate.get("lower_pp"), gate.get("upper_pp")] if gate.get("drop_pp") is not None else None,
        "head_version": r.bundle.head_version,
    }
    m = r.evaluation if r.evaluation is not None else r.recorded.get(r.task.recorded_metrics) or {}
    out.update({k: m.get(k) for k in r.task.summary_metrics})
    if not r.task.one_class and m.get("misclassified") is not None:
        out["misclassified"] = len(m["misclassified"])
        out["ece"] = (m.get("calibration") or {}).get("ece")
        out["unknown"] = m.get("unknown")
    if r.speed:
        out["bench_p50_ms"] = r.speed["latency_ms"]["p50"]
    return out


def report_for_fit(result, out, *, quiet: bool = True) -> ReportResult:
    """The report of a bundle ``fit`` just wrote, evaluated on the fit's own validation items
    (classifiers) or labelled test set (defects); with none, on what the bundle recorded.

    Example:
        >>> r = fit("parts/", "parts.bundle")  # doctest: +SKIP
        >>> report_for_fit(r, "parts.html").path  # doctest: +SKIP
    """
    from .. import tasks

    task = result.task or tasks.for_bundle(result.bundle)
    return write_report(result.bundle, task.report_data(result.data), out=out, quiet=quiet)
