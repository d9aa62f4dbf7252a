"""`edgetl report` and `edgetl fit --report` on real bundles of every task: the page shows the
numbers `edgetl eval` computes on the same data, holds everything it shows (no request leaves the
file), and a user's mistakes end in one line and change nothing."""

from __future__ import annotations

import base64
import io
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import run_cli

TASKS = ["classify", "text", "anomaly"]


class Page(HTMLParser):
    """What a test needs from a report: every URL-bearing attribute, the ``data-key`` figures, the
    confusion table's cells and the pictures."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.urls: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.keys: dict[str, str] = {}
        self.cells: dict[tuple[str, str], int] = {}
        self.images: list[dict] = []
        self.tags: set[str] = set()
        self._key: str | None = None
        self._cell: tuple[str, str] | None = None
        self._buf = ""
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        for name in ("src", "href", "srcset", "action", "poster", "data"):
            if a.get(name) is not None:
                self.urls.append((tag, name, a[name]))
        if tag == "img":
            self.images.append(a)
        if "data-key" in a:
            self._key, self._buf = a["data-key"], ""
        if tag == "td" and "data-true" in a:
            self._cell, self._buf = (a["data-true"], a["data-predicted"]), ""

    def handle_data(self, data):
        if self._key is not None or self._cell is not None:
            self._buf += data

    def handle_endtag(self, tag):
        if tag == "span" and self._key is not None:
            self.keys[self._key], self._key = self._buf.strip(), None
        if tag == "td" and self._cell is not None:
            self.cells[self._cell], self._cell = int(self._buf.strip()), None


def pct(v: float) -> str:
    return f"{v * 100:.2f}%"


# ------------------------------------------------------------------------------ fit --report
@pytest.mark.slow  # its bundle comes through request.getfixturevalue: a fit of the real backbone
@pytest.mark.parametrize("task", TASKS)
def test_fit_report_writes_the_page_beside_the_bundle(task, request):
    from tests.report.conftest import FIXTURES

    m = request.getfixturevalue(FIXTURES[task])
    page = m.bundle.parent / (m.bundle.name.removesuffix(".bundle") + "-report.html")
    assert m.fit["report"] == str(page) and page.is_file()
    p = Page(page.read_text(encoding="utf-8"))
    assert p.keys["task"] == task
    assert p.keys["gate"] == m.fit["gate"]["verdict"]
    # The fit's page is evaluated on what the fit held out, so it agrees with the fit's own figures.
    if task == "anomaly":
        assert float(p.keys["image_auroc"]) == pytest.approx(m.fit["metrics"]["image_auroc"], abs=5e-4)
    else:
        assert p.keys["accuracy"] == pct(m.fit["val"]["accuracy"])
        assert int(p.keys["n"]) == m.fit["val"]["n"]
    # The bundle itself is untouched by its report: every file still matches the manifest.
    r = run_cli("info", m.bundle, "--json")
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------ figures = eval's
@pytest.mark.parametrize("task", ["classify", "text"])
def test_classifier_page_shows_evals_numbers(task, pages, request):
    got = pages(request, task)
    ev, p = got["eval"], Page(got["html"])
    labels, cm = ev["labels"], ev["confusion_matrix"]
    assert p.cells == {(t, q): cm[i][j] for i, t in enumerate(labels) for j, q in enumerate(labels)}
    assert p.keys["accuracy"] == pct(ev["accuracy"])
    assert p.keys["balanced_accuracy"] == pct(ev["balanced_accuracy"])
    assert int(p.keys["n"]) == ev["n"] == sum(map(sum, cm))
    assert int(p.keys["misclassified"]) == len(ev["misclassified"]) == ev["n"] - sum(cm[i][i] for i in range(len(cm)))
    rep = got["report"]["figures"]
    assert rep["accuracy"] == ev["accuracy"] and rep["misclassified"] == len(ev["misclassified"])
    # Every mistake is named on the page (a file name, or the text itself).
    key = "path" if task == "classify" else "text"
    for it in ev["misclassified"]:
        assert _escaped(it[key]) in got["html"]
    # The "unknown" threshold's effect, as eval reports it.
    for row in ev["coverage"]:
        assert f"{row['threshold']:.3f}" in got["html"]


def _escaped(s: str) -> str:
    import html

    return html.escape(s, quote=True)


def test_image_page_has_the_mistakes_as_thumbnails(pages, request):
    got = pages(request, "classify")
    ev, p = got["eval"], Page(got["html"])
    thumbs = [i for i in p.images if i["src"].startswith("data:image/jpeg")]
    wrong = min(len(ev["misclassified"]), 12)
    assert len(thumbs) >= wrong + 1  # the most confident mistakes, then the least confident correct
    for i in thumbs:
        im = Image.open(io.BytesIO(base64.b64decode(i["src"].split(",", 1)[1])))
        assert im.size == (112, 112)


def test_defect_page_shows_evals_numbers_and_heat_maps(pages, request):
    got = pages(request, "anomaly")
    ev, p = got["eval"], Page(got["html"])
    assert float(p.keys["image_auroc"]) == pytest.approx(ev["image_auroc"], abs=5e-4)
    assert float(p.keys["pixel_auroc"]) == pytest.approx(ev["pixel_auroc"], abs=5e-4)
    assert float(p.keys["f1"]) == pytest.approx(ev["f1"], abs=5e-4)
    assert {k: int(p.keys[k]) for k in ("tp", "fn", "fp", "tn")} == ev["confusion"]
    assert got["report"]["figures"]["image_auroc"] == ev["image_auroc"]
    # Per defect type: eval's AUROC, and the images caught, which add up to eval's counts.
    caught = 0
    for kind, v in ev["per_defect_auroc"].items():
        row = re.search(
            rf"<tr><td[^>]*>{kind}</td><td[^>]*>(\d+)</td><td[^>]*>(\d+) caught, (\d+) missed</td>"
            rf"<td[^>]*>([0-9.]+|n/a)</td>",
            got["html"],
        )
        assert row, kind
        assert row.group(4) == ("n/a" if v is None else f"{v:.3f}")
        assert int(row.group(2)) + int(row.group(3)) == int(row.group(1))
        caught += int(row.group(2))
    assert caught == ev["confusion"]["tp"]
    # Overlays: the worst-scored good images and the best-hidden defects, as the model saw them.
    overlays = [i for i in p.images if i["src"].startswith("data:image/jpeg")]
    assert len(overlays) == min(6, ev["n_good"]) + min(6, ev["n_defect"])
    im = Image.open(io.BytesIO(base64.b64decode(overlays[0]["src"].split(",", 1)[1])))
    assert im.size == (160, 160) and len(set(im.convert("RGB").getdata())) > 100  # a picture, not a flat tile


# ---------------------------------------------------------------------------- self-contained
@pytest.mark.parametrize("task", TASKS)
def test_page_is_one_self_contained_file(task, pages, request):
    got = pages(request, task)
    text, p = got["html"], Page(got["html"])
    assert p.urls, "the page has pictures"
    for tag, attr, value in p.urls:
        assert value.startswith(("data:image/png;base64,", "data:image/jpeg;base64,", "#")), (tag, attr, value[:80])
    assert not ({"script", "link", "iframe", "object", "embed", "base"} & p.tags)
    assert not re.search(r"url\(|@import|https?://", text), "nothing is fetched from anywhere"
    pngs = [i for i in p.images if i["src"].startswith("data:image/png")]
    assert len(pngs) >= 3
    for i in pngs:  # every figure decodes, at the size the page gives it (drawn at twice that)
        im = Image.open(io.BytesIO(base64.b64decode(i["src"].split(",", 1)[1])))
        assert im.size[0] >= int(i["width"]) and i.get("alt")
    assert got["report"]["bytes"] == got["page"].stat().st_size < 3_000_000


# ------------------------------------------------------------------------------ user errors
def _one_line_error(r, *needles: str) -> str:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_user_errors_are_one_line_and_write_nothing(classify_made, defects_made, surfaces, tmp_path):
    out = tmp_path / "r.html"
    _one_line_error(run_cli("report", tmp_path / "nope.bundle", "--out", out), "nope.bundle", "edgetl fit")
    _one_line_error(run_cli("report", surfaces, "--out", out), "not an edgetl bundle")
    # Data of another task: a classification folder for a defect detector, defects for a classifier.
    _one_line_error(run_cli("report", defects_made.bundle, surfaces / "val", "--out", out), "good/")
    _one_line_error(run_cli("report", classify_made.bundle, defects_made.data, "--out", out), "not in this bundle")
    _one_line_error(run_cli("report", classify_made.bundle, tmp_path / "gone", "--out", out), "gone")
    # --out: a folder, inside the bundle (hashed files), or somebody's file.
    _one_line_error(run_cli("report", classify_made.bundle, "--out", tmp_path), "folder")
    _one_line_error(run_cli("report", classify_made.bundle, "--out", classify_made.bundle / "r.html"), "inside")
    keep = tmp_path / "notes.html"
    keep.write_text("<p>mine</p>")
    _one_line_error(run_cli("report", classify_made.bundle, "--out", keep), "not an edgetl report")
    assert keep.read_text() == "<p>mine</p>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.html"]
    assert not (classify_made.bundle / "r.html").exists()


def test_a_report_replaces_an_earlier_report(classify_made, tmp_path):
    out = tmp_path / "r.html"
    for _ in range(2):
        r = run_cli("report", classify_made.bundle, "--out", out, "--json")
        assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["report"] == str(out) and got["data"] is None  # no data: what the bundle recorded
    assert Page(out.read_text(encoding="utf-8")).keys["accuracy"] == pct(classify_made.fit["val"]["accuracy"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]  # no temporary left behind


@pytest.fixture(scope="module")
def no_matplotlib_env(no_torch_env, tmp_path_factory) -> dict:
    """A device where neither torch nor matplotlib is installed (both unimportable)."""
    src = Path(no_torch_env["PYTHONPATH"].split(os.pathsep)[0]) / "sitecustomize.py"
    d = tmp_path_factory.mktemp("no-mpl")
    (d / "sitecustomize.py").write_text(
        src.read_text().replace('blocked = ("torch",', 'blocked = ("matplotlib", "torch",')
    )
    return {"PYTHONPATH": str(d) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_without_matplotlib_report_names_the_extra(classify_made, surfaces, no_matplotlib_env, tmp_path):
    import subprocess
    import sys

    blocked = subprocess.run(
        [sys.executable, "-c", "import matplotlib"],
        capture_output=True,
        text=True,
        env={**os.environ, **no_matplotlib_env},
    )
    assert blocked.returncode != 0 and "blocked" in blocked.stderr
    out = tmp_path / "r.html"
    _one_line_error(
        run_cli("report", classify_made.bundle, surfaces / "val", "--out", out, env=no_matplotlib_env),
        "pip install 'edgetl[report]'",
    )
    assert not out.exists()
    # fit --report says so before it trains: no bundle, no page.
    _one_line_error(
        run_cli("fit", surfaces, "--out", tmp_path / "b.bundle", "--report", env=no_matplotlib_env), "edgetl[report]"
    )
    assert list(tmp_path.iterdir()) == []
    # The device commands themselves never needed it.
    r = run_cli("eval", classify_made.bundle, surfaces / "val", "--json", env=no_matplotlib_env)
    assert r.returncode == 0, r.stderr


def test_history_and_timing_on_a_bundle_that_lived(classify_made, surfaces, tmp_path, no_torch_env):
    """Two adapts on the device, the last one rolled back, then a report with every version
    evaluated and the bundle timed here: all of it without torch."""
    import shutil

    from edgetl.datasets.images import make_surfaces

    bundle = tmp_path / "lived.bundle"
    shutil.copytree(classify_made.bundle, bundle)
    for seed in (2, 3):
        new = tmp_path / f"new{seed}"
        make_surfaces(new, seed=seed, per_class=3, val_per_class=1)
        r = run_cli("adapt", bundle, new / "train", "--force", "--json", env=no_torch_env)
        assert r.returncode == 0, r.stderr
    r = run_cli("rollback", bundle, "--json", env=no_torch_env)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "lived.html"
    r = run_cli(
        "report",
        bundle,
        surfaces / "val",
        "--out",
        out,
        "--all-versions",
        "--bench",
        "--runs",
        "8",
        "--json",
        env=no_torch_env,
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    text = out.read_text(encoding="utf-8")
    p = Page(text)
    assert got["figures"]["head_version"] == 2 and p.keys["head_version"] == "v2"
    rows = re.findall(r"<tr( class=\"(current|rolled)\")?><td[^>]*>v(\d)", text)
    assert [(cls, v) for _, cls, v in rows] == [("", "1"), ("current", "2"), ("rolled", "3")]
    # The current version's accuracy on the data is the page's headline figure, as eval says.
    e = run_cli("eval", bundle, surfaces / "val", "--json", env=no_torch_env)
    assert e.returncode == 0, e.stderr
    assert p.keys["accuracy"] == pct(json.loads(e.stdout)["accuracy"])
    assert "ON THE DATA" in text.upper() and text.count('data-key="bench_p50"') == 1
    assert p.keys["bench_p50"] == f"{got['figures']['bench_p50_ms']:.2f} ms"
    assert any(i.get("alt") == "latency distribution and throughput per batch size" for i in p.images)
    assert any(i.get("alt") == "figures per head version" for i in p.images)
