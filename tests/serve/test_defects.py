"""A defect detector as a service: scores, verdicts and heat maps over HTTP, the review queue near
the threshold first, and good images confirmed by a person teaching the next head version."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli

from .conftest import TOKEN, Server, auth, copy_bundle, http


@pytest.fixture(scope="module")
def server(defects_bundle, tmp_path_factory):
    where = tmp_path_factory.mktemp("serve-defects")
    bundle = copy_bundle(defects_bundle, where)
    s = Server(bundle, "--token", TOKEN, "--review", str(where / "review"))
    s.bundle = bundle
    yield s
    s.stop()


def test_scores_verdicts_and_heat_maps(server, defects_data):
    files = (
        sorted((defects_data / "test" / "good").glob("*.png"))[:2]
        + sorted((defects_data / "test" / "scratch").glob("*.png"))[:1]
    )
    r = run_cli("predict", server.bundle, *files, "--json")
    assert r.returncode == 0, r.stderr
    want = json.loads(r.stdout)["predictions"]
    meta = json.loads(http("GET", server.url + "/v2/models/parts")[2])
    size = next(o["shape"][-1] for o in meta["outputs"] if o["name"] == "anomaly_map")  # what the model sees
    for f, w in zip(files, want):
        status, _, body = http("POST", server.url + "/predict?heatmap=1", f.read_bytes())
        got = json.loads(body)
        assert status == 200, got
        assert got["verdict"] == got["label"] == w["label"]
        assert got["score"] == pytest.approx(w["score"], rel=1e-4) and got["threshold"] == pytest.approx(w["threshold"])
        png = base64.b64decode(got["heatmap"].split(",", 1)[1])
        assert Image.open(io.BytesIO(png)).size == (size, size)
        status, headers, thumb = http("GET", server.url + f"/thumb/{got['id']}")
        assert status == 200 and headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(thumb)).width > 0
    assert http("GET", server.url + "/thumb/ffffffffffffffff")[0] == 404
    assert http("GET", server.url + "/thumb/..%2F..%2Fmanifest.json")[0] == 404


def test_kserve_outputs_of_a_defect_model(server, defects_data):
    f = sorted((defects_data / "test" / "crack").glob("*.png"))[0]
    req = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(f.read_bytes()).decode()]}
        ],
        "outputs": [{"name": "score"}, {"name": "label"}, {"name": "anomaly_map"}],
    }
    status, _, body = http("POST", server.url + "/v2/models/parts/infer", req)
    assert status == 200, body
    out = {o["name"]: o for o in json.loads(body)["outputs"]}
    assert len(out["anomaly_map"]["shape"]) == 3 and out["label"]["data"][0] in ("good", "defect")
    direct = json.loads(http("POST", server.url + "/predict", f.read_bytes())[2])
    assert out["score"]["data"][0] == pytest.approx(direct["score"], rel=1e-4)
    assert out["label"]["data"][0] == direct["verdict"]
    assert np.isfinite(out["anomaly_map"]["data"]).all()


def test_queue_puts_what_is_near_the_threshold_first(server):
    state = json.loads(http("GET", server.url + "/api/state")[2])
    needs = [row["need"] for row in state["queue"]]
    assert needs == sorted(needs, reverse=True) and len(needs) >= 3
    first = state["queue"][0]
    assert abs(np.log2(first["normalised"])) == pytest.approx(
        min(abs(np.log2(r["normalised"])) for r in state["queue"]), abs=1e-6
    )


def test_confirmed_good_images_teach_a_new_head_version(server, defects_data):
    for f in sorted((defects_data / "test" / "good").glob("*.png")):
        pid = json.loads(http("POST", server.url + "/predict", f.read_bytes())[2])["id"]
        status, _, body = http("POST", server.url + "/feedback", {"id": pid, "verdict": "good"}, auth())
        assert status == 200, body
    status, _, body = http("POST", server.url + "/feedback", {"id": pid, "verdict": "scratched"}, auth())
    assert status == 422 and "good' or 'defect" in json.loads(body)["error"]
    status, _, body = http("POST", server.url + "/adapt", {"dry_run": True}, auth())
    out = json.loads(body)
    assert status == 200 and out["dry_run"] and out["version"] == 1
    status, _, body = http("POST", server.url + "/adapt", {}, auth())
    out = json.loads(body)
    assert status == 200 and out["accepted"] and out["version"] == 2, out
    assert out["summary"]["images"] == 6 and "head v2" in out["text"]
    assert json.loads(http("GET", server.url + "/history")[2])["current"] == 2
    f = sorted((defects_data / "test" / "good").glob("*.png"))[0]
    assert json.loads(http("POST", server.url + "/predict", f.read_bytes())[2])["head_version"] == 2


def test_a_rollback_from_a_shell_goes_live_in_the_service(server, defects_data):
    r = run_cli("rollback", server.bundle, "--wait", "30")  # the writer lock is shared with the service's updates
    assert r.returncode == 0, r.stderr
    f = sorted((defects_data / "test" / "good").glob("*.png"))[0]
    # The service's watcher looks at the manifest every 2 s. This waits for it, however loaded the
    # machine; the bound only turns a service that never notices into a failure with a message.
    deadline = time.monotonic() + 300
    while json.loads(http("GET", server.url + "/history")[2])["current"] != 1:
        assert time.monotonic() < deadline, "the service never picked up the version switched on disk"
        time.sleep(0.2)
    assert json.loads(http("POST", server.url + "/predict", f.read_bytes())[2])["head_version"] == 1


def test_the_page_shows_heat_map_thumbnails_and_takes_a_verdict_key(server, defects_data):
    from tests.browser.util import check_page

    f = sorted((defects_data / "test" / "spot").glob("*.png"))[0]
    pid = json.loads(http("POST", server.url + "/predict", f.read_bytes())[2])["id"]
    got = check_page(
        server.url + f"/login?token={TOKEN}",
        allow=[server.url],
        timeout=120,
        steps=[
            {"wait": "body[data-ready]"},
            {"wait": f"#queue .card[data-id='{pid}'] img"},
            {"click": f"#queue .card[data-id='{pid}']"},
            {"press": "d"},
            {"wait": "#message.good"},
            {"sleep_ms": 300},
        ],
        evaluate="document.getElementById('message').textContent",
    )
    assert got["console_errors"] == [] and got["page_errors"] == [] and got["external_requests"] == []
    assert got["broken_images"] == [] and "threshold" in got["text"]
    assert got["value"] in ("confirmed defect", "corrected to defect")
    state = json.loads(http("GET", server.url + "/api/state")[2])
    assert {r["id"]: r["label"] for r in state["review"]["items_list"]}[pid] == "defect"
