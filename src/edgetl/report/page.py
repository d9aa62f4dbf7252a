"""The report as one HTML page: every picture a data URI, one small style sheet, no script, no
request for anything outside the file (it opens from a USB stick on a line PC that has no
network), and a print style that gives a clean PDF (A4, sections kept whole where they fit).
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable

from .. import __version__
from . import figures as fig
from .collect import GENERATOR, ReportData
from .collect import history as history_rows
from .collect import summary as summary_of

CSS = """
:root { --ink:#1b1f24; --muted:#5b6470; --line:#d8dde3; --panel:#f6f8fa; --blue:#0072B2; --orange:#E69F00;
        --verm:#D55E00; --green:#009E73; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); background: #fff; max-width: 1120px; margin: 0 auto; padding: 20px 24px 40px; }
header { border-bottom: 3px solid var(--ink); padding-bottom: 8px; margin-bottom: 14px; }
h1 { font-size: 22px; margin: 0 0 2px; }
h2 { font-size: 17px; margin: 28px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 14px; margin: 16px 0 6px; }
.sub, .note, figcaption { color: var(--muted); }
.note { font-size: 12.5px; margin: 6px 0; }
code { font: 12.5px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: var(--panel);
       padding: 0 3px; border-radius: 3px; overflow-wrap: anywhere; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 8px; margin: 8px 0; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 7px 10px; background: var(--panel); }
.card .k { color: var(--muted); font-size: 11px; text-transform: uppercase; letter-spacing: .05em; }
.card .v { font-size: 17px; font-weight: 650; overflow-wrap: anywhere; }
.card .v .long { font-size: 13.5px; }
details.counts { margin: 6px 0 10px; font-size: 12.5px; }
details.counts summary { cursor: pointer; color: var(--muted); }
td.diag { font-weight: 650; }
.card .d { font-size: 12px; color: var(--muted); }
.verdict { border-left: 7px solid var(--orange); }
.verdict.passed { border-left-color: var(--blue); }
.verdict.refused { border-left-color: var(--verm); }
.verdict.not-measured, .verdict.not-applicable { border-left-color: var(--line); }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-weight: 650; font-size: 12.5px;
         border: 1.5px solid currentColor; }
.badge.passed { color: var(--blue); } .badge.refused { color: var(--verm); }
.badge.inconclusive { color: #8a5a00; } .badge.not-measured, .badge.not-applicable { color: var(--muted); }
.row { display: flex; flex-wrap: wrap; gap: 18px; align-items: flex-start; }
figure { margin: 6px 0; break-inside: avoid; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 12px; margin-top: 2px; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; font-size: 13px; margin: 6px 0; }
th, td { padding: 3px 9px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { font-size: 11.5px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; font-weight: 600; }
td.n, th.n { text-align: right; }
tr.current td { background: #eaf4ee; font-weight: 600; }
tr.rolled td { color: var(--muted); text-decoration: line-through; text-decoration-color: var(--verm); }
.thumbs { display: grid; grid-template-columns: repeat(auto-fill, minmax(124px, 1fr)); gap: 10px; }
.thumb { margin: 0; border: 1px solid var(--line); border-radius: 5px; padding: 4px; break-inside: avoid; }
.thumb img { width: 100%; height: auto; border-radius: 3px; }
.thumb figcaption { font-size: 11px; color: var(--ink); line-height: 1.3; max-width: none; overflow-wrap: anywhere; }
.thumb .wrong { color: var(--verm); font-weight: 650; }
.thumb .right { color: var(--blue); font-weight: 650; }
.text-cell { max-width: 560px; overflow-wrap: anywhere; }
footer { margin-top: 36px; padding-top: 8px; border-top: 1px solid var(--line); color: var(--muted); font-size: 12px; }
@page { size: A4; margin: 12mm; }
@media print {
  body { max-width: none; padding: 0; font-size: 11px; }
  h2 { break-after: avoid; margin-top: 18px; }
  section { break-inside: auto; }
  .card, figure, tr, .thumb { break-inside: avoid; }
  .thumbs { grid-template-columns: repeat(6, 1fr); }
}
"""


def e(v) -> str:
    return html.escape(str(v), quote=True)


def pct(v, nd: int = 2) -> str:
    return "n/a" if v is None else f"{v * 100:.{nd}f}%"


def num(v, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


def key(name: str, text: str) -> str:
    """A figure a test (or a script) can find: ``[data-key=NAME]``."""
    return f'<span data-key="{e(name)}">{e(text)}</span>'


def mb(n) -> str:
    return "n/a" if not n else f"{n / 1e6:.1f} MB"


def img(im: fig.Image | None, caption: str = "") -> str:
    if im is None:
        return ""
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    # The figure is as wide as its picture at most, so a caption wraps under it instead of widening it.
    return (
        f'<figure style="max-width: {im.width}px"><img src="{im.uri}" width="{im.width}" height="{im.height}" '
        f'alt="{e(im.alt)}">{cap}</figure>'
    )


def card(k: str, v: str, d: str = "", cls: str = "") -> str:
    return (
        f'<div class="card {cls}"><div class="k">{e(k)}</div><div class="v">{v}</div>'
        + (f'<div class="d">{d}</div>' if d else "")
        + "</div>"
    )


def table(
    head: Iterable[str],
    rows: Iterable[Iterable[str]],
    *,
    numeric: Iterable[int] = (),
    row_classes: Iterable[str] | None = None,
) -> str:
    numeric = set(numeric)
    head = list(head)
    out = [
        "<table><thead><tr>"
        + "".join(f'<th class="{"n" if i in numeric else ""}">{e(h)}</th>' for i, h in enumerate(head))
        + "</tr></thead><tbody>"
    ]
    classes = list(row_classes) if row_classes is not None else None
    for ri, row in enumerate(rows):
        cls = f' class="{classes[ri]}"' if classes and classes[ri] else ""
        out.append(
            f"<tr{cls}>"
            + "".join(f'<td class="{"n" if i in numeric else ""}">{c}</td>' for i, c in enumerate(row))
            + "</tr>"
        )
    return "".join(out) + "</tbody></table>"


def verdict_class(verdict: str | None) -> str:
    return (verdict or "not measured").replace(" ", "-")


# --------------------------------------------------------------------------------- parts
def _summary(r: ReportData, s: dict) -> str:
    gate = s["gate"] or {}
    verdict = gate.get("verdict", "not measured")
    lat = s["latency_batch1"] or {}
    # The single-file model is what a device runs (a defect head's scoring graph can make it several
    # times slower than the backbone): the headline figure is its latency where fit recorded it.
    fused = s["fused_latency_batch1"] or {}
    shown = fused or lat
    size = s["size"]
    thr_name = r.task.threshold_title
    cards = [
        card(
            "task",
            key("task", r.name),
            f"{len(s['labels'])} labels" if not r.task.one_class else " / ".join(s["labels"]),
        ),
        card(
            "backbone",
            f'<span class="{"long" if len(str(s["backbone"])) > 14 else ""}">{e(s["backbone"])}</span>',
            f"{s['num_features']}-d features, "
            + (f"up to {s['input']} tokens" if r.task.reads_texts else f"{s['input']} px input")
            + (e(f", region of interest {s['roi']}") if s.get("roi") else ""),
        ),
        card("target", key("target", s["target"] or "n/a"), e(f"{s['runtime']} · {s['target_device'] or 'CPU'}")),
        card(
            "precision",
            key("precision", s["precision"].upper()),
            e(f"float ops in {s['float_precision']}") if s["float_precision"] else "",
        ),
        card(
            "size",
            key("size", mb(size.get("bundle_bytes"))),
            e(
                f"model {mb(size.get('fused_bytes'))}, backbone {mb(size.get('backbone_bytes'))}"
                + (f", FP32 {mb(size.get('fp32_bytes'))}" if size.get("fp32_bytes") else "")
            ),
        ),
        card(
            "latency (batch 1)",
            key("latency", f"{shown['p50_ms']:.1f} ms" if shown else "n/a"),
            e(
                f"{'single-file model' if fused else 'backbone'}, p50 at fit, p90 {shown['p90_ms']:.1f} ms"
                if shown.get("p90_ms")
                else "not recorded"
            )
            + (e(f"; backbone alone {lat['p50_ms']:.1f} ms") if fused and lat else "")
            + (e(f"; budget {s['latency_budget_ms']:g} ms") if s.get("latency_budget_ms") else ""),
        ),
        card("head", key("head_version", f"v{s['head_version']}"), f"of {s['versions']} version(s)"),
        card(
            thr_name,
            e(num(s["threshold"], ".4g") if s["threshold"] is not None else "n/a"),
            "raw score; 1.0 in normalised units"
            if r.task.one_class
            else ("off: every item answered" if not s["threshold"] else "below it: 'unknown'"),
        ),
    ]
    out = [f'<section id="summary"><h2>Summary</h2><div class="cards">{"".join(cards)}</div>']
    out.append(_gate(r, s, gate, verdict))
    tc = s.get("transfer_check")
    if tc and tc.get("message"):
        out.append(f'<p class="note">Transfer check: {e(tc["message"])}</p>')
    leak = s.get("leakage") or {}
    if leak.get("warn"):
        out.append(
            f'<p class="note">Leakage check: {leak.get("near_copies")} validation items are near copies of '
            f"training items; the validation figures are optimistic.</p>"
        )
    out.append("</section>")
    return "".join(out)


def _gate(r: ReportData, s: dict, gate: dict, verdict: str) -> str:
    from ..core.gate import GateDecision

    cls = verdict_class(verdict)
    if not gate:
        return '<p class="note">No conversion gate recorded (a bundle made before the gate existed).</p>'
    g = GateDecision.from_dict(gate)
    metric = g.metric.replace("_", " ")
    if g.verdict == "not applicable":
        body = (
            f'<p><span class="badge {cls}">gate: {key("gate", verdict)}</span> {e(g.method)}: there is no '
            "quantization to check.</p>"
        )
        return f'<div class="card verdict {cls}"><div class="k">conversion gate</div>{body}</div>'
    if g.drop_pp is None:
        body = (
            f'<p><span class="badge {cls}">gate: {key("gate", verdict)}</span> '
            f"{e(g.method or 'no reference')}: an FP32 model on ONNX Runtime is the reference itself, so "
            f"there is no conversion to check.</p>"
        )
        return f'<div class="card verdict {cls}"><div class="k">conversion gate</div>{body}</div>'
    fmt = pct if g.metric == "accuracy" else (lambda v: num(v))
    lines = [
        f'<p><span class="badge {cls}">gate: {key("gate", verdict)}</span> '
        f"{e(metric)} {key('gate_value', fmt(g.value))} converted vs {key('gate_reference', fmt(g.reference))} "
        f"FP32 on {g.n} {e(r.task.items)}: drop {key('gate_drop', f'{g.drop_pp:.2f} pp')}, "
        f"{g.confidence:.0%} bounds {key('gate_interval', f'[{g.lower_pp:.2f}, {g.upper_pp:.2f}] pp')}, "
        f"tolerance {g.tolerance_pp:g} pp.</p>",
        f'<p class="note">{e(g.method)}. Passed: the upper bound is within the tolerance; refused: the lower '
        f"bound is beyond it; inconclusive: the interval straddles it"
        + (f" (about {g.needed_items} {e(r.task.items)} would settle it)" if g.needed_items else "")
        + ".</p>",
    ]
    control = gate.get("accuracy_control") or {}
    if control.get("float_layers"):
        lines.append(
            f'<p class="note">Accuracy-controlled quantization kept {len(control["float_layers"])} layers in '
            f"float: {e(', '.join(control['float_layers'][:8]))}"
            + (" ..." if len(control["float_layers"]) > 8 else "")
            + ".</p>"
        )
    rec = s["reference"]
    cos = rec.get("feature_cosine_mean", rec.get("patch_feature_cosine_mean"))
    if cos is not None:
        lines.append(f'<p class="note">Feature cosine, converted vs FP32: mean {cos:.4f}.</p>')
    figs = img(fig.gate_interval(gate)) + (
        img(fig.fp32_vs_converted(rec, s["precision"])) if not r.task.one_class else ""
    )
    return (
        f'<div class="card verdict {cls}"><div class="k">conversion gate</div>{"".join(lines)}'
        f'<div class="row">{figs}</div></div>'
    )


def _classifier(r: ReportData, s: dict) -> str:
    m = r.evaluation
    rec = r.recorded.get("val") or {}
    items = r.task.items
    if m is None:
        if not rec:
            return ""
        m, where = rec, "the validation items at fit (recorded in the bundle)"
    else:
        where = f"<code>{e(r.data)}</code> (head v{m['head_version']})"
    out = [f'<section id="evaluation"><h2>Classification: {where}</h2>']
    ci = m.get("accuracy_interval")
    cards = [
        card(
            "accuracy",
            key("accuracy", pct(m["accuracy"])),
            f"95% interval {pct(ci[0], 1)}–{pct(ci[1], 1)}" if ci else "",
        ),
        card("balanced accuracy", key("balanced_accuracy", pct(m.get("balanced_accuracy")))),
        card(items, key("n", str(m["n"])), f"{len(m['labels'])} classes"),
    ]
    u = m.get("unknown")
    if u:
        cards.append(
            card(
                "unknown threshold",
                key("unknown_threshold", f"{u['threshold']:.3f}"),
                f"answers {pct(u['coverage'], 1)}, accuracy {pct(u['accuracy'], 1)} on those",
            )
        )
    if m.get("misclassified") is not None:
        cards.append(card("misclassified", key("misclassified", str(len(m["misclassified"]))), items))
    if m.get("calibration"):
        cards.append(
            card(
                "calibration error",
                key("ece", f"{m['calibration']['ece']:.3f}"),
                f"mean confidence {pct(m.get('confidence_mean'), 1)}",
            )
        )
    out.append(f'<div class="cards">{"".join(cards)}</div>')
    fp32_recall = (s["reference"] or {}).get("fp32_per_class_recall")
    fit_recall = rec.get("per_class_recall") if r.evaluation is not None and rec else None
    cap = "Recall: share of a class found; precision: share of answers of a class that were right."
    if fp32_recall:
        cap += " FP32 recall: the FP32 reference's, on the validation items at fit."
    if fit_recall:
        cap += " Recall at fit: on the validation items, when the bundle was made."
    out.append(
        '<div class="row">'
        + img(fig.confusion(m))
        + img(fig.per_class(m, fp32=fp32_recall, fit_recall=fit_recall), cap)
        + "</div>"
    )
    out.append(_confusion_table(m))
    if not fp32_recall:
        out.append(
            '<p class="note">FP32 against converted per class: the bundle records the FP32 reference only as '
            "a whole (see the gate above).</p>"
        )
    if m.get("calibration"):
        out.append(
            '<div class="row">'
            + img(
                fig.reliability(m["calibration"]),
                "On the diagonal, a confidence means what it says. Below it the answers are "
                "over-confident; above it they are right more often than their confidence says.",
            )
            + img(
                fig.coverage(m["coverage_curve"], m.get("unknown"), m.get("coverage", [])),
                "Raising the 'unknown' threshold answers fewer items and gets more of those right. "
                "Set one with <code>edgetl threshold BUNDLE VALUE</code>.",
            )
            + "</div>"
        )
        rows = [
            [
                f"{c['threshold']:.3f}",
                pct(c["coverage"], 1),
                pct(c["reject_rate"], 1),
                pct(c["accuracy"], 1),
                str(c["rejected_wrong"]),
                str(c["rejected_right"]),
            ]
            for c in m.get("coverage", [])
        ]
        if rows:
            out.append(
                "<h3>Choosing the 'unknown' threshold</h3>"
                + table(
                    ["threshold", "answered", "unknown", "accuracy on answered", "wrong held back", "right held back"],
                    rows,
                    numeric=range(6),
                )
            )
        if r.task.item_key == "path":
            out.append(_gallery("Most confident mistakes", m.get("confident_mistakes", []), wrong=True))
            out.append(_all_mistakes(m, "path"))
            out.append(_gallery("Least confident correct answers", m.get("least_confident_correct", []), wrong=False))
        else:
            out.append(_texts(m))
    elif r.evaluation is None:
        out.append(
            f'<p class="note">Give labelled {e(items)} (<code>edgetl report BUNDLE DATA</code>) for the '
            "reliability diagram, accuracy against coverage and the mistakes themselves.</p>"
        )
    out.append("</section>")
    return "".join(out)


def _gallery(title: str, rows: list[dict], *, wrong: bool) -> str:
    if not rows:
        return f'<h3>{e(title)}</h3><p class="note">none</p>'
    tiles = []
    for it in rows:
        uri = fig.thumbnail(it["path"])
        top = " · ".join(f"{e(t['label'])} {t['p']:.2f}" for t in it["top_k"][:2])
        picture = (
            f'<img src="{uri}" alt="{e(it["path"])}" width="112" height="112">'
            if uri
            else '<div class="note">(file gone)</div>'
        )
        verdict = (
            f'<span class="wrong">✗ true: {e(it["label"])}</span>'
            if wrong
            else f'<span class="right">✓ {e(it["label"])}</span>'
        )
        tiles.append(
            f'<figure class="thumb">{picture}<figcaption>{verdict}<br>{top}<br>'
            f'<span class="sub">{e(_tail(it["path"]))}</span></figcaption></figure>'
        )
    return f'<h3>{e(title)}</h3><div class="thumbs">{"".join(tiles)}</div>'


def _confusion_table(m: dict) -> str:
    """The confusion matrix's counts as a table: for a screen reader, a copy into a spreadsheet,
    and a script reading the page (every cell names its true and predicted class)."""
    labels, cm = m["labels"], m["confusion_matrix"]
    head = "".join(f'<th class="n">{e(l)}</th>' for l in labels)
    body = []
    for i, (lbl, row) in enumerate(zip(labels, cm)):
        cells = "".join(
            f'<td class="n{" diag" if i == j else ""}" data-true="{e(lbl)}" data-predicted="{e(labels[j])}">'
            f"{int(v)}</td>"
            for j, v in enumerate(row)
        )
        body.append(f"<tr><th>{e(lbl)}</th>{cells}</tr>")
    return (
        f'<details class="counts"><summary>The confusion matrix as numbers (rows: true class, columns: '
        f'predicted)</summary><table id="confusion-table"><thead><tr><th>true \\ predicted</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></details>"
    )


def _all_mistakes(m: dict, key: str) -> str:
    """Every misclassified item by name (the galleries show the first few): what a person fixes
    labels from or collects more of."""
    rows = m.get("misclassified") or []
    if not rows:
        return ""
    body = [[e(it[key]), e(it["label"]), e(it["predicted"]), f"{it['confidence']:.3f}"] for it in rows]
    return (
        f'<details class="counts"><summary>All {len(rows)} misclassified, most confident first</summary>'
        + table(["file", "true", "answer", "confidence"], body, numeric=(3,))
        + "</details>"
    )


def _tail(path: str, parts: int = 2) -> str:
    bits = str(path).replace("\\", "/").split("/")
    return "/".join(bits[-parts:])


def _texts(m: dict) -> str:
    rows = m.get("confident_mistakes", [])
    if not rows:
        return '<h3>Misclassified texts</h3><p class="note">none</p>'
    body = [
        [
            f'<div class="text-cell">{e(it["text"])}</div>'
            + (f'<div class="note">{e(it["where"])}</div>' if it.get("where") else ""),
            e(it["label"]),
            f"{e(it['predicted'])} {it['confidence']:.2f}",
            " · ".join(f"{e(t['label'])} {t['p']:.2f}" for t in it["top_k"][:2]),
        ]
        for it in rows
    ]
    more = len(m["misclassified"]) - len(rows)
    return (
        "<h3>Misclassified texts, most confident first</h3>"
        + table(["text", "true", "answer", "top 2"], body)
        + (f'<p class="note">and {more} more (eval --json lists every one)</p>' if more > 0 else "")
    )


def _defects(r: ReportData, s: dict) -> str:
    m = r.evaluation
    rec = r.recorded.get("metrics") or {}
    if m is None and not rec:
        return ""
    shown = m if m is not None else rec
    where = (
        f"<code>{e(r.data)}</code> (head v{m.get('head_version', s['head_version'])})"
        if m is not None
        else f"the {e(r.recorded.get('eval_set', 'evaluation'))} images at fit (recorded in the bundle)"
    )
    out = [f'<section id="evaluation"><h2>Defect detection: {where}</h2>']
    c = shown.get("confusion") or {}
    # A threshold picked for the best F1 on labelled images makes F1 on those images optimistic:
    # say so, with the out-of-fold figure fit recorded (the cut chosen without each image).
    oof = rec.get("f1_out_of_fold")
    policy = str(s.get("threshold_policy") or "")
    in_sample = ""
    if policy.startswith("best F1"):
        in_sample = (
            "; in-sample: the threshold was chosen for the best F1 on these images"
            if m is None
            else "; the threshold was chosen for the best F1 on the fit's labelled test images (in-sample on those)"
        ) + (f"; out of fold at fit {key('f1_out_of_fold', num(oof))}" if oof is not None else "")
    cards = [
        card(
            "image AUROC",
            key("image_auroc", num(shown.get("image_auroc"))),
            f"{shown.get('n_good', '?')} good, {shown.get('n_defect', '?')} defective",
        ),
        card(
            "pixel AUROC",
            key("pixel_auroc", num(shown.get("pixel_auroc"))),
            f"map peak on the defect in {pct(shown.get('peak_in_mask'), 0)}"
            if shown.get("peak_in_mask") is not None
            else "where masks exist",
        ),
        card(
            "F1 at the threshold",
            key("f1", num(shown.get("f1"))),
            f"precision {num(shown.get('precision'))}, recall {num(shown.get('recall'))}" + in_sample,
        ),
        card(
            "at the threshold",
            f"{key('tp', c.get('tp', '?'))} caught, {key('fn', c.get('fn', '?'))} missed" if c else "n/a",
            f"{key('fp', c.get('fp', '?'))} good images flagged, {key('tn', c.get('tn', '?'))} passed" if c else "",
        ),
    ]
    out.append(f'<div class="cards">{"".join(cards)}</div>')
    known = {
        "n",
        "n_good",
        "n_defect",
        "image_auroc",
        "pixel_auroc",
        "f1",
        "f1_out_of_fold",
        "precision",
        "recall",
        "accuracy",
        "threshold",
        "confusion",
        "peak_in_mask",
        "per_defect_auroc",
        "head_version",
        "skipped",
        "scores",
        "roc",
        "pixel_roc",
        "gallery",
        "threshold_policy",
        "map_scale",
    }
    extra = {k: v for k, v in shown.items() if k not in known and isinstance(v, (int, float, str)) and v is not None}
    if extra:  # figures a newer detector reports: shown as they come
        out.append(table(["figure", "value"], [[e(k.replace("_", " ")), e(v)] for k, v in sorted(extra.items())]))
    if m is not None and m.get("scores"):
        curves = []
        if m.get("roc"):
            curves.append(("image", m["roc"], m.get("image_auroc"), fig.BLUE))
        if m.get("pixel_roc"):
            curves.append(("pixel", m["pixel_roc"], m.get("pixel_auroc"), fig.ORANGE))
        out.append(
            '<div class="row">'
            + img(
                fig.score_histograms(m["scores"]),
                "Scores divided by the threshold: 1.0 and above is a defect. Good "
                "images right of the line are false alarms; defects left of it are "
                "missed.",
            )
            + (img(fig.roc(curves), "The diamond is the bundle's threshold.") if curves else "")
            + "</div>"
        )
        out.append(
            '<div class="row">' + img(fig.per_defect(m.get("per_defect_auroc") or {})) + _per_defect_table(m) + "</div>"
        )
        g = m.get("gallery") or {}
        out.append(_tiles("Good images that score highest (closest to a false alarm)", g.get("worst_good", [])))
        out.append(_tiles("Defects that score lowest (best hidden)", g.get("hidden_defects", [])))
        if m.get("map_scale") == "none":
            out.append(
                '<p class="note">No heat map: this head scores the whole image (an image-level one-class '
                "head), so it says whether an image is anomalous, not where; white outline: the true "
                "defect's mask.</p>"
            )
        else:
            scale = (
                "1.0 = the threshold"
                if m.get("map_scale") != "good peaks"
                else "this head's score adds an image-level term to the map's, so the map is scaled to the good "
                "images' median peak"
            )
            out.append(
                f'<p class="note">Heat map: inferno colours, opaque where the map is high ({scale}); '
                "white outline: the true defect's mask.</p>"
            )
    else:
        out.append(
            '<p class="note">Give a labelled test set (<code>edgetl report BUNDLE DATA</code> with '
            "<code>test/good</code>, <code>test/&lt;defect&gt;</code>) for score histograms, ROC curves and "
            "heat maps.</p>"
        )
    out.append("</section>")
    return "".join(out)


def _per_defect_table(m: dict) -> str:
    """Per defect type: how many images, how many the threshold catches, and the image AUROC
    against the good images (the chart's numbers, readable and copyable)."""
    kinds: dict[str, list[float]] = {}
    for row in m.get("scores") or []:
        kinds.setdefault(row["label"], []).append(row["normalised"])
    if not kinds:
        return ""
    aurocs = m.get("per_defect_auroc") or {}
    rows = []
    for kind in sorted(kinds, key=lambda k: (k != "good", k)):
        v = kinds[kind]
        flagged = sum(x >= 1.0 for x in v)
        what = f"{flagged} flagged (false alarms)" if kind == "good" else f"{flagged} caught, {len(v) - flagged} missed"
        rows.append([e(kind), str(len(v)), e(what), "—" if kind == "good" else num(aurocs.get(kind))])
    return (
        "<div><h3>Per defect type, at the threshold</h3>"
        + table(["type", "images", "at the threshold", "image AUROC"], rows, numeric=(1, 3))
        + "</div>"
    )


def _tiles(title: str, tiles: list[dict]) -> str:
    if not tiles:
        return f'<h3>{e(title)}</h3><p class="note">none</p>'
    out = []
    for t in tiles:
        uri = fig.overlay(t["image"], t["map"], t["mask"])
        flag = "defect" if t["normalised"] >= 1.0 else "good"
        cls = "wrong" if (flag == "defect") != (t["label"] != "good") else "right"
        out.append(
            f'<figure class="thumb"><img src="{uri}" alt="{e(t["path"])}" width="160" height="160">'
            f'<figcaption><span class="{cls}">{e(t["label"])}: score {t["normalised"]:.3f}× → {flag}</span><br>'
            f'<span class="sub">{e(_tail(t["path"], 3))}</span></figcaption></figure>'
        )
    return f'<h3>{e(title)}</h3><div class="thumbs">{"".join(out)}</div>'


def _history(r: ReportData) -> str:
    rows = history_rows(r)
    anomaly = r.task.one_class
    head = [
        "version",
        "made",
        "source",
        "added",
        "classes" if not anomaly else "images learned",
        "recorded figure",
        "gate",
        "threshold",
    ]
    if r.versions:
        head.append(f"on the data ({r.versions[0]['metric'].replace('_', ' ')})")
    body, classes = [], []
    for row in rows:
        added = "" if row["added"] is None else f"{row['added']} {'good ' if anomaly else ''}{r.task.items}"
        if row["new_classes"]:
            added += f"; new: {', '.join(row['new_classes'])}"
        figure = (
            "n/a" if row["figure"] is None else (pct(row["figure"], 1) if not anomaly else num(row["figure"]))
        ) + (f" ({row['figure_name']})" if row["figure"] is not None else "")
        if row.get("holdout") is not None:
            figure += f"; new {r.task.items} {pct(row['holdout'], 1)}"
        mark = {"current": " ★ current", "rolled back": " (rolled back)"}.get(row["status"], "")
        cells = [
            f"v{row['version']}{mark}",
            e(row["created"].replace("T", " ").rstrip("Z")),
            e(row["source"]),
            e(added),
            str(row["memory_images"] if anomaly else row["classes"]),
            e(figure),
            e(row["gate"] or "—"),
            num(row["threshold"], ".4g") if row["threshold"] is not None else "—",
        ]
        if r.versions:
            d = row["on_data"] or {}
            cells.append(
                e(
                    (pct(d["value"], 2) if not anomaly else num(d["value"]))
                    if d.get("value") is not None
                    else d.get("why", "n/a")
                )
            )
        body.append(cells)
        classes.append({"current": "current", "rolled back": "rolled"}.get(row["status"], ""))
    out = ['<section id="history"><h2>Device history</h2>', table(head, body, row_classes=classes)]
    picture = fig.memory_history(rows) if anomaly else fig.history(rows, percent=True)
    out.append(
        img(
            picture,
            "Recorded: validation accuracy at fit, then each adapt's accuracy on held-out items of known classes."
            if not anomaly
            else "Each adapt adds good images; the threshold carries over unless set.",
        )
    )
    if any(row["status"] == "rolled back" for row in rows):
        out.append(
            '<p class="note">A version newer than the current one was rolled back (the manifest keeps every '
            "version; <code>edgetl rollback --to N</code> brings one back).</p>"
        )
    out.append("</section>")
    return "".join(out)


def _speed(r: ReportData, s: dict) -> str:
    lat, fused = s["latency_batch1"] or {}, s["fused_latency_batch1"] or {}
    rows = []
    if lat:
        rows.append(
            [
                "backbone, at fit",
                f"{lat['p50_ms']:.2f} ms",
                f"{lat.get('p90_ms', float('nan')):.2f} ms",
                e(lat.get("float_precision", "")),
            ]
        )
    if fused:
        rows.append(
            [
                "single-file model, at fit",
                f"{fused['p50_ms']:.2f} ms",
                f"{fused.get('p90_ms', float('nan')):.2f} ms",
                e(fused.get("float_precision", "")),
            ]
        )
    out = ['<section id="latency"><h2>Latency</h2>']
    if rows:
        out.append(table(["model", "p50", "p90", "float ops"], rows, numeric=(1, 2)))
    tp = s.get("throughput") or {}
    if tp.get("sentences_per_s"):
        out.append(
            f'<p class="note">Throughput at fit: {tp["sentences_per_s"]:.0f} sentences/s'
            + (f" (FP32 {tp['fp32_sentences_per_s']:.0f})" if tp.get("fp32_sentences_per_s") else "")
            + ".</p>"
        )
    sp = r.speed
    if sp:
        where = f"{sp['runtime']}/{sp['device']}" + (
            f" — a CPU fallback: {sp['target_device']} is not on this machine" if sp.get("fallback") else ""
        )
        budget = sp.get("latency_budget_ms")
        verdict = (
            ""
            if not budget
            else f"; budget {budget:g} ms {'met' if sp['within_budget'] else 'NOT met'}"
            + (" (on the fallback, not the target device)" if sp.get("fallback") else "")
        )
        p50 = key("bench_p50", f"{sp['latency_ms']['p50']:.2f} ms")
        out.append(
            f"<h3>Timed here: {e(where)}</h3><p>p50 {p50}, "
            f"p90 {sp['latency_ms']['p90']:.2f} ms at batch 1{e(verdict)}; best throughput "
            f"{sp['throughput'][sp['items'] + '_per_s']:.1f} {e(sp['items'])}/s at batch "
            f"{sp['throughput']['batch']}; peak memory {sp['peak_rss_mb']:.0f} MB.</p>"
        )
        out.append(img(fig.latency(sp)))
    else:
        out.append(
            '<p class="note">Measured on the machine that made the bundle. For this machine\'s batch-1 '
            "distribution and throughput per batch size: <code>edgetl report BUNDLE --bench</code>.</p>"
        )
    out.append("</section>")
    return "".join(out)


def _deploy(r: ReportData, s: dict) -> str:
    models = s.get("models") or {}
    backbone = models.get("backbone", "backbone.*")
    app = " + ".join(f"<code>{e(f)}</code>" for f in s.get("app_files") or [models.get("fused", "model.*")])
    extra = {"openvino": "edgetl[openvino]", "onnxruntime": "edgetl"}.get(s["runtime"], "edgetl")
    if r.task.reads_texts:
        extra = extra.replace("edgetl", "edgetl[text]") if extra == "edgetl" else "edgetl[openvino,text]"
    return (
        '<section id="deploy"><h2>On the device</h2>'
        f"<p>An app that calls the model itself needs only {app} (backbone and head in one graph). "
        f"<code>edgetl predict / adapt / eval</code> "
        f"use the whole bundle: <code>{e(backbone)}</code> with <code>heads/</code>, so that <code>adapt</code> can "
        f"train a new head on the device; install with <code>pip install '{e(extra)}'</code> (no torch).</p>"
        "</section>"
    )


def render(r: ReportData, *, title: str | None = None) -> str:
    """The whole page for ``r`` (see :mod:`edgetl.report.collect`)."""
    t0 = time.perf_counter()
    s = summary_of(r)
    body = [_summary(r, s)]
    body.append(_defects(r, s) if r.task.one_class else _classifier(r, s))
    body.append(_history(r))
    body.append(_speed(r, s))
    body.append(_deploy(r, s))
    notes = "".join(f'<p class="note">{e(n)}</p>' for n in r.notes)
    made = time.strftime("%Y-%m-%d %H:%M", time.localtime())
    heading = title or f"{s['bundle']}"
    data = f" · evaluated on <code>{e(r.data)}</code>" if r.data else " · figures recorded in the bundle"
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="{GENERATOR} {e(__version__)}">'
        f"<title>edgetl report: {e(heading)}</title><style>{CSS}</style></head><body>"
        f'<header><h1>edgetl report: {e(heading)}</h1><div class="sub">{e(r.name)} bundle '
        f"<code>{e(s['path'])}</code>{data} · {made}</div></header>{notes}{''.join(body)}"
        f"<footer>Made by edgetl {e(__version__)} (bundle from edgetl {e(s['edgetl_version'])}). One self-contained "
        f"file: every picture is embedded; it loads nothing from anywhere.</footer></body></html>"
    )
    r.timings["render"] = round(time.perf_counter() - t0, 3)
    return page
