"""The defect page's headline figures say what they measure: the latency of the model the device
runs, and an F1 whose threshold was chosen on the same images labelled as in-sample."""

from __future__ import annotations

import json

from tests.report.test_report import Page


def test_defect_summary_latency_is_the_fused_models_and_f1_is_labelled_in_sample(defects_made):
    m = defects_made
    page = m.bundle.parent / (m.bundle.name.removesuffix(".bundle") + "-report.html")
    html = page.read_text(encoding="utf-8")
    p = Page(html)
    rec = json.loads((m.bundle / "report.json").read_text())
    fused = rec["fused_latency_batch1"]["p50_ms"]
    assert p.keys["latency"] == f"{fused:.1f} ms"
    assert "single-file model, p50 at fit" in html
    assert m.fit["metrics"]["threshold_policy"].startswith("best F1")
    oof = m.fit["metrics"]["f1_out_of_fold"]
    assert oof is not None and 0 <= oof <= 1
    assert "in-sample on those" in html and abs(float(p.keys["f1_out_of_fold"]) - oof) < 5e-4
