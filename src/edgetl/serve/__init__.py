"""``edgetl serve``: a bundle as a local HTTP service, with an operator page that closes the adapt loop.

A camera program or a PLC gateway posts frames (``POST /predict``, or the KServe v2 protocol that
Triton, OpenVINO Model Server and their clients speak); an operator confirms or corrects what the
page shows (``POST /feedback``), and the confirmed items are exactly the labelled data
``edgetl adapt`` needs (``POST /adapt``): the usual gate decides, and a new head version goes live
without a failed request. ``GET /metrics`` is Prometheus text, every request is one JSON log line.

The pieces, each small:

* :mod:`.engine`: the predictor behind one inference thread that batches concurrent requests and
  swaps to a new head version between batches;
* :mod:`.review`: the crash-safe, bounded review store in a folder the operator chose;
* :mod:`.security`: the token, page sessions, CSRF and Host checks;
* :mod:`.kserve`: the KServe v2 REST protocol (JSON and the binary tensor extension);
* :mod:`.metrics`: Prometheus text exposition;
* :mod:`.app`: the Starlette application; :mod:`.cli`: the ``serve`` command.

Needs the ``serve`` extra (Starlette, uvicorn, python-multipart); no torch, like the rest of the
device side.
"""

from __future__ import annotations

__all__ = ["create_app", "ServeOptions"]


def __getattr__(name: str):
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'edgetl.serve' has no attribute {name!r}")
