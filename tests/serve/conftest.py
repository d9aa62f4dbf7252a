"""Small real bundles fitted with the CLI (session-scoped), and ``edgetl serve`` run as a user runs
it: a subprocess on a free loopback port, here with torch made unimportable (the device path)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytest.importorskip("starlette", reason="edgetl serve needs the serve extra")
pytest.importorskip("uvicorn", reason="edgetl serve needs the serve extra")

TOKEN = "serve-test-token-0123456789"
CLASSES = ("brick", "grass", "gravel", "wood")


@pytest.fixture(scope="session")
def serve_data(surfaces, tmp_path_factory) -> Path:
    """Four of the surface classes: enough for a gate, quick to fit."""
    root = tmp_path_factory.mktemp("serve-data") / "four"
    for split in ("train", "val"):
        for c in CLASSES:
            shutil.copytree(surfaces / split / c, root / split / c)
    return root


@pytest.fixture(scope="session")
def classify_bundle(serve_data, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve-bundles") / "four.bundle"
    r = run_cli("fit", serve_data, "--out", out, "--calibration-size", "32", "--allow-drop", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def defects_data(tmp_path_factory) -> Path:
    from edgetl.datasets.images import make_defects

    root = tmp_path_factory.mktemp("serve-defects") / "d"
    make_defects(root, seed=0, n_train_good=16, n_test_good=6, n_test_defect=5, size=128)
    return root


@pytest.fixture(scope="session")
def defects_bundle(defects_data, cache_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve-bundles") / "parts.bundle"
    r = run_cli("fit", defects_data, "--out", out, "--calibration-size", "16", "--allow-drop", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    return out


def copy_bundle(bundle: Path, where: Path) -> Path:
    dst = where / bundle.name
    shutil.copytree(bundle, dst)
    return dst


class Server:
    """A running ``edgetl serve`` subprocess and its base URL."""

    def __init__(self, bundle: Path, *args: str, env: dict | None = None):
        cmd = [sys.executable, "-m", "edgetl.cli", "serve", str(bundle), "--port", "0", "--json", *args]
        # stderr (one access line per request) goes to a file: a pipe nobody reads fills up and
        # blocks the server's logging, as it would any program's
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, env={**os.environ, **(env or {})}
        )
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise AssertionError(f"edgetl serve did not start: {self.stderr()[-3000:]}")
        self.info = json.loads(line)
        self.url = self.info["url"].rstrip("/")
        deadline = time.time() + 30
        while True:  # the socket listens at once; ready once uvicorn's lifespan started the engine
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.1)

    def stop(self) -> str:
        """SIGTERM (graceful), and what it wrote on stderr."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        return self.stderr()

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()


def http(
    method: str, url: str, data: bytes | dict | None = None, headers: dict | None = None, timeout: float = 60
) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request with the standard library's client."""
    headers = dict(headers or {})
    if isinstance(data, dict):
        data = json.dumps(data).encode()
        headers.setdefault("content-type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def auth(token: str = TOKEN) -> dict:
    return {"authorization": f"Bearer {token}"}


def parse_prometheus(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Samples by name from the text exposition format, checking what a scraper relies on: every
    sample belongs to a family declared by HELP and TYPE before it, and every line parses."""
    import re

    families, samples = {}, {}
    line_re = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$")
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge", "histogram"), line
            families[name] = kind
            continue
        if line.startswith("#") or not line:
            continue
        m = line_re.match(line)
        assert m, f"not an exposition line: {line!r}"
        name, labels = m.group(1), dict((k, v) for k, v, _ in label_re.findall(m.group(3) or ""))
        base = re.sub(r"_(bucket|sum|count)$", "", name) if name not in families else name
        assert base in families, f"{name} has no TYPE line before it"
        samples.setdefault(name, []).append((labels, float(m.group(4))))
    return samples
