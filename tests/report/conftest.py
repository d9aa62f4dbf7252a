"""Three real bundles, one per task, each made by ``edgetl fit --report`` (so the fit's own page is
tested too), with the labelled data their reports are evaluated on. Session-scoped and small: the
reports need a few dozen items per bundle, not accuracy."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import run_cli


@dataclass
class Made:
    bundle: Path
    data: Path  # what `edgetl eval` and `edgetl report` take for this bundle
    fit: dict  # fit --json


def _fit(data: Path, out: Path, *args: str) -> dict:
    r = run_cli("fit", data, "--out", out, "--report", "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="session")
def report_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("report")


@pytest.fixture(scope="session")
def classify_made(surfaces, cache_dir, report_root) -> Made:
    out = report_root / "surfaces.bundle"
    return Made(out, surfaces / "val", _fit(surfaces, out, "--calibration-size", "32"))


@pytest.fixture(scope="session")
def text_made(cache_dir, report_root) -> Made:
    pytest.importorskip("transformers", reason="fitting a text bundle exports the encoder (text-train extra)")
    from edgetl.datasets.tickets import make_tickets

    root = report_root / "tickets"
    make_tickets(root, seed=0, per_class=20, val_per_class=8)
    with open(root / "tickets.csv", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "val"]
    val = root / "val.csv"
    with open(val, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["text", "label"])
        w.writerows([r["text"], r["label"]] for r in rows)
    out = report_root / "tickets.bundle"
    return Made(out, val, _fit(root / "tickets.csv", out))


@pytest.fixture(scope="session")
def defects_made(cache_dir, report_root) -> Made:
    from edgetl.datasets.images import make_defects

    root = report_root / "defects"
    make_defects(root, seed=0, n_train_good=24, n_test_good=8, n_test_defect=10, size=160)
    out = report_root / "defects.bundle"
    return Made(out, root, _fit(root, out, "--calibration-size", "24"))


FIXTURES = {"classify": "classify_made", "anomaly": "defects_made", "text": "text_made"}


@pytest.fixture(scope="session")
def pages(report_root, no_torch_env, cache_dir):
    """``edgetl report BUNDLE DATA --json`` for a task's bundle, run where torch cannot be
    imported, and ``edgetl eval BUNDLE DATA --json`` on the same data (the numbers the page must
    show); each made once. Call it as ``pages(request, "classify")``. (Its bundles are fetched by
    name, so ``cache_dir`` is named here: that is what marks its users slow, see tests/conftest.py.)"""
    out = {}

    def get(request, task: str) -> dict:
        if task not in out:
            m = request.getfixturevalue(FIXTURES[task])
            page = report_root / f"{task}.html"
            r = run_cli("report", m.bundle, m.data, "--out", page, "--json", env=no_torch_env)
            assert r.returncode == 0, r.stderr
            e = run_cli("eval", m.bundle, m.data, "--json", env=no_torch_env)
            assert e.returncode == 0, e.stderr
            out[task] = {
                "made": m,
                "page": page,
                "html": page.read_text(encoding="utf-8"),
                "report": json.loads(r.stdout),
                "eval": json.loads(e.stdout),
            }
        return out[task]

    return get
