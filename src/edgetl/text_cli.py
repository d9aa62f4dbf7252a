"""What ``edgetl fit / eval / predict`` do for text; :mod:`edgetl.cli` routes here and prints.

Each function returns ``(object for --json, text for people)``. Routing rules:

* ``fit``: ``--task text``, or DATA is a CSV / TSV / JSONL file with a text column;
* ``eval`` and ``predict``: the bundle's manifest says ``task = "text"``;
* ``predict`` takes texts as arguments, one per line from ``--file FILE``, or one per line on
  stdin (no arguments, or ``-``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from .errors import BundleError, DataError


def wants_text(data: str | Path, task: str | None) -> bool:
    """Route ``fit`` to text: ``--task text``, or a text dataset file."""
    if task is not None:
        return task == "text"
    from .text_data import is_text_data

    return is_text_data(data)


def is_text_bundle_path(bundle: str | Path) -> bool:
    """True when the bundle at ``bundle`` declares ``task = "text"`` (files are verified later)."""
    from .bundle import read_manifest

    try:
        return read_manifest(Path(bundle)).get("task") == "text"
    except BundleError:
        return False  # the regular path reports the problem with its own message


def fit(data, out, *, backbone: str | None, head, target, precision, runtime, val, val_split, seed, cache_dir, strict,
        calibration_size, allow_drop, force, quiet, text_column=None, label_column=None,
        signer=None) -> tuple[dict, str]:
    from .backbones import DEFAULT_BACKBONE
    from .text import TextFitOptions, fit_text

    # --backbone's default is the image default; for text data it means the text default.
    if backbone == DEFAULT_BACKBONE:
        backbone = None
    opts = TextFitOptions(
        backbone=backbone, head=head, target=target, precision=precision, runtime=runtime,
        val=str(val) if val else None, val_split=val_split, seed=seed, cache_dir=str(cache_dir) if cache_dir else None,
        strict=strict, calibration_size=calibration_size, allow_drop=allow_drop, quiet=quiet,
        text_column=text_column, label_column=label_column,
    )
    result = fit_text(data, out, options=opts, force=force, signer=signer)
    r = result.report
    summary = {
        "bundle": str(result.bundle.path), "task": "text", "labels": result.bundle.labels,
        "counts": result.dataset.counts(), "columns": result.dataset.columns,
        "skipped": [{"row": w, "reason": why} for w, why in result.dataset.skipped],
        "val": result.metrics, "train_accuracy": r["train_accuracy"],
        "target": r["target"], "precision": r["precision"], "runtime": r["runtime"], "conversion": r["conversion"],
        "reference": r["reference"], "gate": r["gate"], "latency_batch1": r["latency_batch1"],
        "throughput": r["throughput"], "size": r["size"], "timings_s": result.timings,
    }
    return summary, _fit_text(result)


def _fit_text(result) -> str:
    from .report import format_metrics

    r = result.report
    counts = result.dataset.counts().values()
    lines = [f"bundle    {result.bundle.path}  (text; {r['target']}: {r['precision']} on {r['runtime']})",
             f"data      {len(result.bundle.labels)} classes, {sum(c['train'] for c in counts)} train / "
             f"{sum(c['val'] for c in counts)} val texts (columns {result.dataset.columns.get('text')!r}, "
             f"{result.dataset.columns.get('label')!r})"]
    from .report import gate_lines

    lines += gate_lines(r, "embedding cosine", r["reference"].get("feature_cosine_mean"))
    speed = r["throughput"]
    extra = f" (fp32 {speed['fp32_sentences_per_s']:.0f})" if "fp32_sentences_per_s" in speed else ""
    lines.append(f"model     {r['size']['backbone_bytes'] / 1e6:.1f} MB encoder, {speed['sentences_per_s']:.0f} sentences/s"
                 f"{extra}, batch-1 latency {r['latency_batch1']['p50_ms']:.1f} ms (p50, this machine)")
    lines.append(f"time      {sum(v for k, v in result.timings.items() if k != 'backbone_texts'):.1f} s "
                 f"({result.timings['backbone_texts']} texts through an encoder)")
    if result.metrics:
        lines += ["", format_metrics(result.metrics, title="validation", items="texts")]
    return "\n".join(lines)


def evaluate(bundle, data, *, strict: bool, device: str | None) -> tuple[dict, str, list]:
    from .report import format_metrics
    from .text import TextPredictor

    m = TextPredictor(bundle, device=device).evaluate(data, strict=strict)
    text = format_metrics(m, title=f"{bundle} on {data} (head v{m['head_version']})", items="texts")
    return m, text, [(s["path"], s["reason"]) for s in m["skipped"]]


def gather_texts(args: Sequence[str], file: str | Path | None, stdin=None) -> list[str]:
    """Texts from arguments, then ``--file`` lines, then stdin (when nothing else was given, or ``-``)."""
    from .text_data import read_lines

    stdin = sys.stdin if stdin is None else stdin
    texts = [str(a) for a in args if str(a) != "-"]
    if file is not None:
        texts += read_lines(file)
    if "-" in map(str, args) or (not args and file is None):
        if not ("-" in map(str, args)) and stdin.isatty():
            raise DataError("no text to classify; pass texts as arguments, --file FILE, or pipe lines on stdin")
        texts += [line.strip() for line in stdin.read().splitlines() if line.strip()]
    return texts


def predict(bundle, args: Sequence[str], *, file, top_k: int, threshold, device) -> tuple[dict, str]:
    from .cli import safe
    from .text import TextPredictor

    texts = gather_texts(args, file)
    preds = TextPredictor(bundle, device=device).predict(texts, top_k=top_k, threshold=threshold)
    lines = []
    for p in preds:
        alts = "  ".join(f"{l} {q:.3f}" for l, q in p.top_k[1:])
        lines.append(f"{safe(p.label)}\t{p.confidence:.3f}\t{safe(p.text)}" + (f"\t{alts}" if alts else ""))
    return {"predictions": [p.to_dict() for p in preds]}, "\n".join(lines)
