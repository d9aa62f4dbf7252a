"""The operator page in headless Chromium against a real ``edgetl serve``: it loads with nothing
from elsewhere and no console error, and a person confirms (a key, then a click), adapts through
the gate and rolls back, seeing each result on the page."""

from __future__ import annotations

import json

import pytest

from tests.browser.util import browser_available, check_page

from .conftest import TOKEN, Server, auth, copy_bundle, http


@pytest.fixture(scope="module")
def server(classify_bundle, tmp_path_factory):
    why = browser_available()
    if why:
        pytest.skip(why)
    where = tmp_path_factory.mktemp("serve-page")
    s = Server(copy_bundle(classify_bundle, where), "--token", TOKEN, "--review", str(where / "review"))
    yield s
    s.stop()


def test_confirm_adapt_and_roll_back_on_the_page(server, serve_data):
    files = [p for c in ("wood", "grass") for p in sorted((serve_data / "val" / c).glob("*.png"))[:7]]
    answers = [json.loads(http("POST", server.url + "/predict", p.read_bytes())[2]) for p in files]
    for p, a in list(zip(files, answers))[2:]:  # a person labelled most of them already
        assert http("POST", server.url + "/feedback", {"id": a["id"], "label": p.parent.name}, auth())[0] == 200
    left = {a["id"] for a in answers[:2]}
    steps = [
        {"wait": "body[data-ready]"},
        {"wait": "#queue .card button.confirm:not([disabled])"},
        {"press": "c"},  # the key confirms the selected item
        {"wait": "#message.good"},
        {"sleep_ms": 300},
        {"click": "#queue .card button.confirm"},
        {"wait": "#queue p.hint"},  # nothing left waiting
        {"click": "#adapt"},
        {"wait": "#gate-verdict", "timeout_ms": 120000},
        {"click": "button.rollback"},
        {"wait": "#history tr.current[data-version='1']"},
    ]
    got = check_page(
        server.url + f"/login?token={TOKEN}",
        allow=[server.url],
        steps=steps,
        timeout=240,
        evaluate="JSON.stringify({verdict: document.getElementById('gate-verdict').textContent,"
        " gate: document.getElementById('gate-text').textContent,"
        " message: document.getElementById('message').textContent})",
    )
    assert got["console_errors"] == [] and got["page_errors"] == [] and got["external_requests"] == []
    assert got["broken_images"] == [] and got["failed_requests"] == []
    shown = json.loads(got["value"])
    assert shown["verdict"] == "accepted: head v2 is live (was v1)"
    assert "passed" in shown["gate"] and "new_known_accuracy" in shown["gate"]
    assert shown["message"] == "head v1 is live again (was v2)"
    hist = json.loads(http("GET", server.url + "/history")[2])
    assert hist["current"] == 1 and [v["version"] for v in hist["versions"]] == [1, 2]
    state = json.loads(http("GET", server.url + "/api/state")[2])
    items = {row["id"]: row for row in state["review"]["items_list"]}
    assert left <= set(items) and all(items[i]["confirmed"] for i in left)  # the page's two confirmations
