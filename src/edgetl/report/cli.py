"""``edgetl report BUNDLE [DATA] --out report.html``: the click command (attached to ``edgetl``'s
group by the main CLI; ``python -m edgetl.report.cli`` runs it on its own).

Errors a user can fix print ``error: ...`` on one line and exit with their code, as every edgetl
command does; with ``--json`` stdout carries exactly one JSON object.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..core.commands import handle_errors
from ..core.console import safe


@click.command("report")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("data", required=False, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    type=click.Path(path_type=Path),
    help="HTML file to write (an earlier report there is replaced, any other file is left alone).  "
    "[default: beside the bundle, parts.bundle -> parts-report.html]",
)
@click.option(
    "--bench",
    is_flag=True,
    help="Also time the bundle on this machine: batch-1 latency distribution and "
    "throughput per batch size (a few seconds).",
)
@click.option("--runs", type=int, default=50, show_default=True, help="Timed batch-1 runs with --bench.")
@click.option(
    "--all-versions",
    is_flag=True,
    help="With DATA: evaluate every head version on it (one pass over DATA per version), not only the current one.",
)
@click.option("--title", help="Page title.  [default: the bundle's folder name]")
@click.option("--device", help="OpenVINO device override (CPU, NPU, GPU, AUTO).")
@click.option("--strict", is_flag=True, help="Make unreadable inputs in DATA fatal instead of skipped.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the report's path and key figures).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or status lines.")
@handle_errors
def report(bundle, data, out, bench, runs, all_versions, title, device, strict, as_json, quiet):
    """Write one self-contained HTML page about BUNDLE (runs without torch; needs edgetl[report]).

    \b
    Without DATA: what the bundle recorded when it was made (the gate, validation figures,
    sizes, latency, head versions). With labelled DATA (what `edgetl eval` takes) it evaluates:
      classify / text: confusion matrix, recall and precision per class, reliability diagram,
        accuracy against coverage as the 'unknown' threshold varies, the mistakes themselves;
      anomaly: score histograms, ROC curves, the images nearest the threshold with heat maps.
    Images are embedded: the page opens anywhere, offline, and prints to PDF.
    """
    from . import check_dependencies, default_out, write_report

    check_dependencies()  # before minutes of evaluation, not after
    if runs < 1:
        raise click.BadParameter("give at least 1", param_hint="--runs")
    out = out or default_out(bundle)
    r = write_report(
        bundle,
        data,
        out=out,
        bench=bench,
        all_versions=all_versions,
        runs=runs,
        device=device,
        title=title,
        quiet=quiet or as_json,
        strict=strict,
    )
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2, default=str))
    elif not quiet:
        click.echo(f"wrote {safe(r.path)} ({r.bytes / 1e6:.1f} MB, {r.seconds.get('total', 0):.1f} s)")


if __name__ == "__main__":  # pragma: no cover
    report()
