"""Malformed, hostile and slow requests against a live ``edgetl serve`` on loopback: every one is a
JSON 4xx line, never a 500 or a traceback, and a stalled body is cut off. Includes a small, seeded,
bounded fuzz of the KServe v2 and feedback routes."""

from __future__ import annotations

import copy
import json
import random
import socket
from urllib.parse import urlparse

import pytest

from tests.serve.conftest import TOKEN, Server, auth, copy_bundle, http


@pytest.fixture(scope="module")
def hserver(classify_bundle, tmp_path_factory):
    where = tmp_path_factory.mktemp("serve-hardening")
    s = Server(
        copy_bundle(classify_bundle, where),
        "--token",
        TOKEN,
        "--review",
        str(where / "review"),
        "--body-timeout",
        "2",
        "--name",
        "four",
    )
    yield s
    s.stop()


def _image_b64(serve_data) -> str:
    import base64

    return base64.b64encode(sorted((serve_data / "val" / "brick").glob("*.png"))[0].read_bytes()).decode()


def _assert_json_4xx(status: int, body: bytes, case) -> None:
    assert 400 <= status < 500, (case, status, body[:300])
    doc = json.loads(body)
    assert isinstance(doc.get("error"), str) and "\n" not in doc["error"] and "Traceback" not in doc["error"], case


def _deep(n: int) -> str:
    """JSON text of a string inside ``n`` lists (built as text: json.dumps would recurse too)."""
    return "[" * n + '"x"' + "]" * n


def test_malformed_kserve_and_feedback_bodies_are_json_4xx(hserver, serve_data):
    infer = hserver.url + "/v2/models/four/infer"
    img = _image_b64(serve_data)
    good = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [img]}]}
    cases = {
        "data nested 600 deep": (
            '{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ' + _deep(600) + "}]}"
        ).encode(),
        "100,000 [": b"[" * 100_000,
        "outputs 5": {**good, "outputs": 5},
        "parameters a list": {**good, "parameters": [1, 2]},
        "input parameters a list": {"inputs": [{**good["inputs"][0], "parameters": ["binary_data_size"]}]},
        "output parameters a list": {**good, "outputs": [{"name": "label", "parameters": [1]}]},
        "output name a list": {**good, "outputs": [{"name": ["label"]}]},
        "not UTF-8": b"\xff\xfe{}",
    }
    for case, body in cases.items():
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, _, out = http("POST", infer, data, {"content-type": "application/json"})
        _assert_json_4xx(status, out, case)
    status, _, out = http("POST", infer, good)
    assert status == 200, out
    for case, body in {
        "id nested": ('{"id": ' + _deep(5000) + "}").encode(),
        "label nested": ('{"id": "xxxxxxxx", "label": ' + _deep(5000) + "}").encode(),
        "a list": b"[" * 50_000,
        "a number": b"5",
    }.items():
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, _, out = http("POST", hserver.url + "/feedback", data, {**auth(), "content-type": "application/json"})
        _assert_json_4xx(status, out, case)


def test_a_stalled_request_body_is_cut_off_with_408(hserver):
    u = urlparse(hserver.url)
    with socket.create_connection((u.hostname, u.port), timeout=60) as s:
        s.sendall(
            b"POST /v2/models/four/infer HTTP/1.1\r\nHost: "
            + u.netloc.encode()
            + b'\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{"inputs"'
        )
        reply = s.recv(4096)  # the server answers while the client still owes 990 bytes
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]


_TYPES = [None, True, -1, 2**70, 1.5, float("nan"), "", "x" * 300, [], {}, [1, [2]], {"a": {"b": []}}]


def _mutate(obj, rng: random.Random, depth: int = 0):
    """One random change somewhere in a JSON document: a value of another type, a key dropped or
    added, a list emptied or grown."""
    if isinstance(obj, dict) and obj and depth < 6 and rng.random() < 0.7:
        key = rng.choice(list(obj))
        choice = rng.random()
        if choice < 0.15:
            obj.pop(key)
        elif choice < 0.25:
            obj[rng.choice(["parameters", "outputs", "id", "extra"])] = rng.choice(_TYPES)
        else:
            obj[key] = _mutate(obj[key], rng, depth + 1)
        return obj
    if isinstance(obj, list) and obj and depth < 6 and rng.random() < 0.7:
        i = rng.randrange(len(obj))
        if rng.random() < 0.2:
            obj.append(copy.deepcopy(rng.choice(obj)))
        else:
            obj[i] = _mutate(obj[i], rng, depth + 1)
        return obj
    return copy.deepcopy(rng.choice(_TYPES))


def test_fuzzed_kserve_and_feedback_bodies_never_give_a_500(hserver, serve_data):
    """120 seeded mutations of valid requests (bounded: a minute on two cores): each answers 200
    or a JSON 4xx, and the service keeps answering."""
    infer = hserver.url + "/v2/models/four/infer"
    img = _image_b64(serve_data)
    base = {
        "id": "r1",
        "parameters": {"binary_data_output": False},
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [img], "parameters": {}}],
        "outputs": [{"name": "label", "parameters": {"binary_data": False}}, {"name": "probabilities"}],
    }
    status, _, out = http("POST", infer, base)
    assert status == 200, out
    pid = json.loads(out)["outputs"]
    feedback = {"id": "0" * 16, "label": "brick", "confirm": True}
    rng = random.Random(0)
    for i in range(120):
        route, doc = (infer, base) if i % 2 == 0 else (hserver.url + "/feedback", feedback)
        body = _mutate(copy.deepcopy(doc), rng)
        data = json.dumps(body, allow_nan=True).encode()
        if rng.random() < 0.1:
            data = data[: rng.randrange(1, len(data))]  # truncated
        status, _, out = http("POST", route, data, {**auth(), "content-type": "application/json"})
        assert status < 500, (i, route, data[:300], out[:300])
        if status >= 400:
            _assert_json_4xx(status, out, (i, data[:200]))
    assert http("POST", infer, base)[0] == 200 and pid
