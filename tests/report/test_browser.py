"""Each task's report opened from disk in headless Chromium, with every request that is not the
file itself blocked: nothing is fetched, nothing fails, every picture is drawn, and the numbers
`edgetl eval` computed are in the page a person reads."""

from __future__ import annotations

import pytest
from PIL import Image, ImageStat

from tests.browser.util import check_page

pytestmark = pytest.mark.slow  # headless Chromium, on pages of bundles fitted with the real backbone

PICTURES = (
    "[...document.images].map(i => { const r = i.getBoundingClientRect(); "
    "return [i.complete, i.naturalWidth, i.naturalHeight, r.width, r.height, i.alt]; })"
)


@pytest.mark.parametrize("task", ["classify", "text", "anomaly"])
def test_report_in_a_real_browser(task, pages, request, tmp_path):
    got = pages(request, task)
    shot = tmp_path / f"{task}.png"
    seen = check_page(
        got["page"].resolve().as_uri(), evaluate=PICTURES, screenshot=str(shot), viewport={"width": 1180, "height": 900}
    )
    for problem in ("console_errors", "page_errors", "external_requests", "failed_requests", "broken_images"):
        assert seen[problem] == [], (problem, seen[problem])
    assert seen["title"].startswith("edgetl report")
    pictures = seen["value"]
    assert len(pictures) >= 5
    for complete, nw, nh, w, h, alt in pictures:
        assert complete and nw > 0 and nh > 0 and w > 20 and h > 20, (nw, nh, w, h, alt)
    text, ev = seen["text"], got["eval"]
    if task == "anomaly":
        assert f"{ev['image_auroc']:.3f}" in text and f"{ev['confusion']['tp']} caught" in text
        assert "Defects that score lowest" in text
    else:
        assert f"{ev['accuracy'] * 100:.2f}%" in text
        assert "Choosing the 'unknown' threshold" in text
    assert "Device history" in text and "Latency" in text
    with Image.open(shot) as im:  # a drawn page, not a blank one
        assert im.width == 1180 and im.height > 1500
        assert max(ImageStat.Stat(im.convert("L")).stddev) > 20


def test_report_prints_to_pdf(pages, request, tmp_path):
    """Chromium's own print (A4, the page's print style): a PDF of a few pages, not one endless
    strip or hundreds of broken-up fragments."""
    import re
    import subprocess

    from tests.browser.util import CHROMIUM, browser_available

    if browser_available():
        pytest.skip(browser_available())
    got = pages(request, "classify")
    pdf = tmp_path / "report.pdf"
    r = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--no-pdf-header-footer",
            f"--print-to-pdf={pdf}",
            got["page"].resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and pdf.is_file(), r.stderr[-2000:]
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-")
    pages_in_pdf = len(re.findall(rb"/Type\s*/Page(?!s)", data))
    assert 2 <= pages_in_pdf <= 15, pages_in_pdf
    assert b"/Subtype /Image" in data or b"/Subtype/Image" in data  # the figures went to paper too
