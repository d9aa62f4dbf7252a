"""``edgetl serve`` over real HTTP: a uvicorn subprocess on a loopback port, started where torch
cannot be imported (the device path), asked with the standard library's HTTP client."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.conftest import run_cli

from .conftest import TOKEN, Server, auth, copy_bundle, http, parse_prometheus


@pytest.fixture(scope="module")
def server(classify_bundle, no_torch_env, tmp_path_factory):
    where = tmp_path_factory.mktemp("serve-api")
    bundle = copy_bundle(classify_bundle, where)
    s = Server(bundle, "--token", TOKEN, "--review", str(where / "review"), "--max-upload-mb", "1", env=no_torch_env)
    s.bundle, s.review = bundle, where / "review"
    yield s
    if s.proc.poll() is None:
        s.stop()


def _images(serve_data, classes, n):
    return [p for c in classes for p in sorted((serve_data / "val" / c).glob("*.png"))[:n]]


def _predict(server, path) -> dict:
    status, headers, body = http("POST", server.url + "/predict?top_k=4", path.read_bytes())
    assert status == 200 and headers["content-type"] == "application/json", body
    return json.loads(body)


def test_predict_gives_what_edgetl_predict_gives(server, serve_data, no_torch_env):
    files = _images(serve_data, ("brick", "wood"), 2)
    got = [_predict(server, p) for p in files]
    r = run_cli("predict", server.bundle, *files, "--top-k", "4", "--json", env=no_torch_env)
    assert r.returncode == 0, r.stderr
    want = json.loads(r.stdout)["predictions"]
    for g, w in zip(got, want):
        assert g["label"] == w["label"] and g["head_version"] == 1 and len(g["id"]) == 16
        assert [e["label"] for e in g["top_k"]] == [e["label"] for e in w["top_k"]]
        assert g["confidence"] == pytest.approx(w["confidence"], abs=1e-4)
        assert "drift_p" in g and "path" not in g  # nothing about the server's temporary files
    # multipart with two files: one answer each, in order
    boundary = "edgetlboundary"
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"; filename="x{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + p.read_bytes()
        + b"\r\n"
        for i, p in enumerate(files[:2])
    )
    status, _, body = http(
        "POST",
        server.url + "/predict",
        parts + f"--{boundary}--\r\n".encode(),
        {"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert status == 200, body
    assert [p["label"] for p in json.loads(body)["predictions"]] == [w["label"] for w in want[:2]]


def test_kserve_v2_over_plain_http(server, serve_data):
    assert http("GET", server.url + "/v2/health/ready")[0] == 200
    status, _, body = http("GET", server.url + "/v2/models/four")
    meta = json.loads(body)
    assert status == 200 and meta["inputs"][0] == {"name": "image", "datatype": "BYTES", "shape": [-1]}
    labels = meta["parameters"]["labels"]
    files = _images(serve_data, ("gravel", "grass"), 1)
    req = {
        "id": "r1",
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [len(files)],
                "data": [base64.b64encode(p.read_bytes()).decode() for p in files],
            }
        ],
    }
    status, _, body = http("POST", server.url + "/v2/models/four/infer", req)
    assert status == 200, body
    out = {o["name"]: o for o in json.loads(body)["outputs"]}
    assert json.loads(body)["id"] == "r1" and json.loads(body)["model_version"] == "1"
    assert out["probabilities"]["shape"] == [2, len(labels)]
    probs = np.array(out["probabilities"]["data"]).reshape(2, -1)
    direct = [_predict(server, p) for p in files]
    assert out["label"]["data"] == [d["label"] for d in direct]
    assert [labels[i] for i in probs.argmax(1)] == [d["label"] for d in direct]
    assert np.allclose(out["confidence"]["data"], [d["confidence"] for d in direct], atol=1e-4)
    assert http("GET", server.url + "/v2/models/other")[0] == 404


def test_a_kserve_client_nobody_here_wrote_gets_the_same_answers(server, serve_data):
    th = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (pip) is not installed")
    client = th.InferenceServerClient(server.url.split("//", 1)[1])
    assert client.is_server_ready() and client.is_model_ready("four")
    files = _images(serve_data, ("brick", "gravel"), 2)
    inp = th.InferInput("image", [len(files)], "BYTES")
    inp.set_data_from_numpy(np.array([p.read_bytes() for p in files], dtype=object), binary_data=True)
    r = client.infer(
        "four",
        [inp],
        outputs=[
            th.InferRequestedOutput("label", binary_data=True),
            th.InferRequestedOutput("confidence", binary_data=True),
        ],
    )
    direct = [_predict(server, p) for p in files]
    assert [x.decode() for x in r.as_numpy("label")] == [d["label"] for d in direct]
    assert np.allclose(r.as_numpy("confidence"), [d["confidence"] for d in direct], atol=1e-4)


def test_bad_input_is_one_clear_json_line_with_a_4xx(server):
    cases = [
        ("POST", "/predict", b"this is not an image", 422, "not an image"),
        ("POST", "/predict", b"", 422, "empty"),
        ("POST", "/predict?top_k=99", b"x", 422, None),
        (
            "POST",
            "/v2/models/four/infer",
            {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1]}]},
            422,
            "one input named 'image'",
        ),
        ("POST", "/v2/models/four/infer", b"{not json", 422, "KServe v2 JSON"),
        ("GET", "/nothing/here", None, 404, "no such route"),
        ("POST", "/feedback", {"id": "0123456789abcdef", "label": "wood"}, 404, "no longer held"),
        # an id names a resource: one that names no prediction is 404 whatever its shape
        ("POST", "/feedback", {"id": "../../etc/passwd", "label": "wood"}, 404, "no prediction"),
        ("POST", "/feedback", {"id": 7, "label": "wood"}, 422, "give the 'id'"),
        ("POST", "/rollback", {"to": 99}, 404, "no head version 99"),
    ]
    for method, path, data, code, words in cases:
        status, headers, body = http(
            method, server.url + path, data, auth() if path in ("/feedback", "/rollback") else None
        )
        assert status == code, (path, status, body)
        err = json.loads(body)["error"]
        assert "\n" not in err and (words is None or words in err), (path, err)
    assert http("GET", server.url + "/v2/health/ready")[0] == 200  # still up


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    import socket

    host, port = server.url.split("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            b"Content-Length: 1200000\r\n\r\n" + b"\x89PNG" + b"0" * 1000
        )
        reply = b""
        while b"}" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply[:300]
    assert "limit" in json.loads(body)["error"]


def test_writes_need_the_token_even_on_localhost(server, serve_data):
    pid = _predict(server, _images(serve_data, ("brick",), 1)[0])["id"]
    body = {"id": pid, "confirm": True}
    for headers, code in [
        ({}, 401),
        (auth("not-the-token-at-all-x"), 401),
        ({"authorization": "Basic abc"}, 401),
        ({**auth(), "origin": "http://evil.example"}, 403),
        ({**auth(), "host": "evil.example"}, 403),
    ]:
        status, resp_headers, out = http("POST", server.url + "/feedback", body, headers)
        assert status == code, (headers, out)
        assert "error" in json.loads(out)
    assert http("POST", server.url + "/adapt", {})[0] == 401
    assert http("POST", server.url + "/rollback", {})[0] == 401
    # reads are open on a loopback binding, but not for another Host (DNS rebinding)
    assert http("GET", server.url + "/history")[0] == 200
    assert http("GET", server.url + "/history", headers={"host": "evil.example:80"})[0] == 403
    status, _, out = http("POST", server.url + "/feedback", body, auth())
    assert status == 200 and json.loads(out)["confirmed"] is True


def test_metrics_are_prometheus_text(server):
    status, headers, body = http("GET", server.url + "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    m = parse_prometheus(body.decode())
    assert m["edgetl_head_version"] == [({}, 1.0)]
    assert sum(v for _, v in m["edgetl_predictions_total"]) >= 8
    buckets = [(lab, v) for lab, v in m["edgetl_request_duration_seconds_bucket"] if lab["route"] == "/predict"]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts) and buckets[-1][0]["le"] == "+Inf"
    total = dict((lab["route"], v) for lab, v in m["edgetl_request_duration_seconds_count"])["/predict"]
    assert counts[-1] == total
    codes = {(lab["route"], lab["code"]) for lab, _ in m["edgetl_requests_total"]}
    assert ("/predict", "200") in codes and ("/predict", "422") in codes and ("/feedback", "401") in codes


def _hammer(url, files, stop, results):
    i = 0
    while not stop.is_set():
        t0 = time.perf_counter()
        status, _, body = http("POST", url + "/predict", files[i % len(files)].read_bytes())
        version = json.loads(body).get("head_version") if status == 200 else None
        results.append((t0, time.perf_counter(), status, version))
        i += 1


def test_feedback_then_adapt_switches_live_with_no_failed_request(server, serve_data):
    new = _images(serve_data, ("wood", "grass"), 6)
    for p in new:  # what a person confirms on the page
        pid = _predict(server, p)["id"]
        status, _, out = http("POST", server.url + "/feedback", {"id": pid, "label": p.parent.name}, auth())
        assert status == 200, out
    files = _images(serve_data, ("brick", "gravel"), 3)
    stop, results = threading.Event(), []
    clients = [threading.Thread(target=_hammer, args=(server.url, files, stop, results)) for _ in range(3)]
    for c in clients:
        c.start()
    time.sleep(0.5)
    t_adapt = time.perf_counter()
    status, _, body = http("POST", server.url + "/adapt", {}, auth(), timeout=300)
    t_done = time.perf_counter()
    time.sleep(0.7)
    stop.set()
    for c in clients:
        c.join()
    out = json.loads(body)
    assert status == 200 and out["accepted"] and out["version"] == 2 and out["previous"] == 1, out
    assert out["summary"]["gate"]["passed"] and out["items"] >= len(new)
    assert [r for r in results if r[2] != 200] == []  # not one failed request
    during = [r for r in results if r[0] < t_done and r[1] > t_adapt]
    assert during, "no request overlapped the update"
    assert {r[3] for r in results} == {1, 2}
    assert all(r[3] == 2 for r in results if r[0] > t_done)  # the new head answers once adapt returned
    hist = json.loads(http("GET", server.url + "/history")[2])
    assert hist["current"] == 2 and [v["version"] for v in hist["versions"]] == [1, 2]
    m = parse_prometheus(http("GET", server.url + "/metrics")[2].decode())
    assert m["edgetl_head_version"] == [({}, 2.0)]
    # a second adapt has nothing new to learn from: a clear 422, nothing written
    status, _, body = http("POST", server.url + "/adapt", {}, auth())
    assert status == 422 and "no confirmed" in json.loads(body)["error"]
    status, _, body = http("POST", server.url + "/rollback", {}, auth())
    assert status == 200 and json.loads(body)["version"] == 1
    assert _predict(server, files[0])["head_version"] == 1


def test_access_log_is_one_json_object_per_request(server):
    err = server.stop()
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert lines and all({"ts", "method", "path", "route", "status", "ms"} <= set(x) for x in lines)
    assert any(x["route"] == "/v2/health/ready" and x["status"] == 200 for x in lines)  # the start-up check
    adapts = [x for x in lines if x["route"] == "/adapt" and x["status"] == 200]
    assert all(x["version"] >= 2 and x["accepted"] for x in adapts)
    other = "\n".join(x for x in err.splitlines() if not x.startswith("{"))[-5000:]
    # a graceful stop: uvicorn finishes, then ends by the signal it was sent (what systemd expects)
    assert "Traceback" not in err and server.proc.returncode in (0, -15), other


def test_the_serve_path_imports_no_torch(no_torch_env):
    import os
    import pkgutil

    import edgetl.serve

    mods = ["edgetl.serve", *(f"edgetl.serve.{m.name}" for m in pkgutil.iter_modules(edgetl.serve.__path__))]
    assert {"edgetl.serve.app", "edgetl.serve.engine", "edgetl.serve.server"} <= set(mods)
    code = (
        "import importlib, sys\n"
        + "".join(f"importlib.import_module({m!r})\n" for m in mods)
        + "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision', 'nncf')]\n"
        "assert not bad, bad\nprint('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **no_torch_env})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
