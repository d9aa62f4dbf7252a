"""``edgetl serve`` stops promptly on SIGTERM / SIGINT, even with a client that stalls mid-upload."""

from __future__ import annotations

import signal
import socket
import time
from urllib.parse import urlsplit

import pytest

from tests.serve.conftest import TOKEN, Server, copy_bundle


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_within_about_a_second_with_a_stalled_upload(classify_bundle, tmp_path, sig):
    s = Server(copy_bundle(classify_bundle, tmp_path), "--token", TOKEN)
    u = urlsplit(s.url)
    stalled = socket.create_connection((u.hostname, u.port))
    try:
        # headers and a little of a body that never arrives
        stalled.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nabc")
        time.sleep(0.3)
        t0 = time.perf_counter()
        s.proc.send_signal(sig)
        s.proc.wait(timeout=30)
        took = time.perf_counter() - t0
    finally:
        stalled.close()
        s.proc.stdout.close()
    assert took < 2.5, f"stopped {took:.2f} s after {sig.name}"
    assert "Traceback" not in s.stderr()
