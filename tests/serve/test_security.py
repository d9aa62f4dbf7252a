"""Who may do what, beyond the loopback and on the page; and the command's one-line refusals.

Binding a test server to a network address would expose it, so the non-loopback rules are
checked in process with Starlette's TestClient (the application is the same object uvicorn runs);
the command itself runs as a subprocess."""

from __future__ import annotations

import socket

import pytest

from edgetl.errors import ConfigError
from tests.conftest import run_cli

from .conftest import TOKEN, auth, copy_bundle


@pytest.fixture(scope="module")
def bundle(classify_bundle, tmp_path_factory):
    return copy_bundle(classify_bundle, tmp_path_factory.mktemp("serve-sec"))


def _client(bundle, tmp_path, **options):
    pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx")
    from starlette.testclient import TestClient

    from edgetl.serve import ServeOptions, create_app

    app, _ = create_app(bundle, ServeOptions(token=TOKEN, review=tmp_path / "review", **options))
    return TestClient(app, base_url="http://line-pc.plant:8080")


def test_beyond_localhost_every_read_needs_the_token(bundle, tmp_path, serve_data):
    img = sorted((serve_data / "val" / "brick").glob("*.png"))[0].read_bytes()
    with _client(bundle, tmp_path, host="0.0.0.0") as c:
        for path in ("/history", "/metrics", "/api/state", "/v2/models/four"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), path
            assert c.get(path, headers=auth("a-wrong-token-of-length")).status_code == 401
            assert c.get(path, headers=auth()).status_code == 200
        assert c.post("/predict", content=img).status_code == 401
        assert c.post("/predict", content=img, headers=auth()).json()["label"] == "brick"
        assert c.get("/v2/health/ready").status_code == 200  # supervisors need no token
        r = c.get("/", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login"


def test_the_page_session_needs_its_csrf_token_for_writes(bundle, tmp_path, serve_data):
    img = sorted((serve_data / "val" / "grass").glob("*.png"))[0].read_bytes()
    with _client(bundle, tmp_path, host="0.0.0.0") as c:
        assert c.post("/login", data={"token": "not-it-not-it-not-it"}, follow_redirects=False).status_code == 403
        r = c.post("/login", data={"token": TOKEN}, follow_redirects=False)
        assert (
            r.status_code == 303
            and "HttpOnly" in r.headers["set-cookie"]
            and "SameSite=Strict" in r.headers["set-cookie"]
        )
        csrf = c.get("/api/session").json()["csrf"]
        pid = c.post("/predict", content=img).json()["id"]  # the session cookie reads
        body = {"id": pid, "confirm": True}
        assert c.post("/feedback", json=body).status_code == 403  # a cookie alone does not write
        assert c.post("/feedback", json=body, headers={"x-csrf-token": "guess"}).status_code == 403
        assert (
            c.post(
                "/feedback", json=body, headers={"x-csrf-token": csrf, "origin": "http://elsewhere.example"}
            ).status_code
            == 403
        )
        r = c.post("/feedback", json=body, headers={"x-csrf-token": csrf})
        assert r.status_code == 200 and r.json()["label"] == "grass"
        page = c.get("/")
        assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
        c.post("/logout")
        assert c.get("/api/state").status_code == 401


def test_a_short_token_is_refused(bundle):
    from edgetl.serve import ServeOptions, create_app

    with pytest.raises(ConfigError, match="at least 16"):
        create_app(bundle, ServeOptions(token="short"))


def test_the_command_refuses_with_one_line(bundle, tmp_path):
    cases = [
        (["serve", tmp_path / "missing.bundle"], "missing.bundle"),
        (["serve", bundle, "--token", "short"], "at least 16"),
        (["serve", bundle, "--port", "70000"], "--port"),
    ]
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "keep.jpg").write_bytes(b"a user's photo")
    cases.append((["serve", bundle, "--token", TOKEN, "--review", foreign], "not an edgetl review store"))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    cases.append((["serve", bundle, "--token", TOKEN, "--port", str(busy.getsockname()[1])], "cannot listen"))
    try:
        for args, words in cases:
            r = run_cli(*args)
            assert r.returncode == 2, (args, r.stderr)
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (args, r.stderr)
    finally:
        busy.close()
    assert (foreign / "keep.jpg").read_bytes() == b"a user's photo" and sorted(foreign.iterdir()) == [
        foreign / "keep.jpg"
    ]


def test_an_image_over_the_pixel_budget_is_refused_before_it_is_decoded(bundle, tmp_path, monkeypatch):
    import io

    from PIL import Image

    monkeypatch.setenv("EDGETL_MAX_MEGAPIXELS", "0.01")  # 10 000 pixels
    buf = io.BytesIO()
    Image.new("RGB", (200, 100)).save(buf, "PNG")
    with _client(bundle, tmp_path) as c:
        c.headers["host"] = "127.0.0.1:8080"  # a loopback binding checks the Host header
        r = c.post("/predict", content=buf.getvalue())
        assert r.status_code == 413 and "pixel budget" in r.json()["error"]
        buf = io.BytesIO()
        Image.new("RGB", (90, 90)).save(buf, "PNG")
        assert c.post("/predict", content=buf.getvalue()).status_code == 200
