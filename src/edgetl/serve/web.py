"""What every route shares: JSON answers and errors, bounded request bodies, the access check in
front of each endpoint, and the ASGI layer that logs each request and times it."""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import time

from starlette.requests import Request
from starlette.responses import Response

from ..core.console import one_line
from ..core.manifest import loads_bounded
from ..errors import (
    BundleBusy,
    BundleError,
    ConfigError,
    DataError,
    EdgetlError,
    GateError,
    TrustError,
    UnknownVersion,
)
from .engine import Busy
from .images import TooLarge
from .review import StoreFull
from .security import Access, Denied

access_log = logging.getLogger("edgetl.serve.access")


class NotFound(Exception):
    """No such model, version, prediction or review item (404)."""


class SlowBody(DataError):
    """The request body did not arrive within the body timeout (408)."""


# How deep a request's JSON may nest: every request edgetl takes is 2 to 4 levels deep.
MAX_BODY_DEPTH = 32
# Seconds a whole request body may take to arrive: a client that sends a few bytes and then
# stalls holds a connection and a buffer; it is cut off with a 408 instead.
BODY_TIMEOUT_S = 30.0


def parse_json(body: bytes, what: str = "the body"):
    """A request's JSON, nested at most :data:`MAX_BODY_DEPTH` deep.

    Raises:
        DataError: not UTF-8 JSON, or nested too deep, in one line.
    """
    try:
        return loads_bounded(body, max_depth=MAX_BODY_DEPTH)
    except ValueError as exc:
        reason = str(exc) if "nests deeper" in str(exc) or "UTF-8" in str(exc) else "not JSON"
        raise DataError(f"{what} is not usable JSON ({reason})") from None


def as_object(value, what: str) -> dict:
    """``value`` if it is a JSON object (``None``: an empty one), else one DataError line."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DataError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


# Whose problem an error is: 4xx the caller's (404: a version the bundle does not hold; 409: the
# bundle's state or another writer), 503
# busy, 507 the review store or the disk full, 500 anything else edgetl can name.
STATUS = [
    (Busy, 503),
    (StoreFull, 507),
    (TooLarge, 413),
    (SlowBody, 408),
    (UnknownVersion, 404),
    (BundleBusy, 409),
    (GateError, 409),
    (TrustError, 409),
    (BundleError, 409),
    (DataError, 422),
    (ConfigError, 400),
    (EdgetlError, 500),
]


def status_of(exc: EdgetlError) -> int:
    return next(code for kind, code in STATUS if isinstance(exc, kind))


def jsonr(obj, status: int = 200, headers: dict | None = None) -> Response:
    return Response(
        json.dumps(obj, separators=(",", ":"), default=str),
        status_code=status,
        media_type="application/json",
        headers={"cache-control": "no-store", **(headers or {})},
    )


def error(status: int, message: str, headers: dict | None = None) -> Response:
    return jsonr({"error": one_line(message)}, status, headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused past ``limit`` bytes before (Content-Length) or while (chunked) it arrives."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise TooLarge(
                    f"the request is {int(declared) / 1e6:.1f} MB; the limit is {limit / 1e6:g} MB (--max-upload-mb)"
                )
        except ValueError:
            raise DataError("Content-Length is not a number") from None

    chunks, size = [], 0
    stream = request.stream().__aiter__()
    loop = asyncio.get_running_loop()
    timeout = float(getattr(request.app.state, "body_timeout_s", BODY_TIMEOUT_S))
    deadline = loop.time() + timeout
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - loop.time()))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise SlowBody(f"the request body did not arrive within {timeout:g} s; send it at once") from None
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the request is over the limit of {limit / 1e6:g} MB (--max-upload-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, limit: int = 1 << 20) -> dict:
    body = await read_body(request, limit)
    if not body.strip():
        return {}
    obj = parse_json(body)
    if not isinstance(obj, dict):
        raise DataError("the body must be a JSON object")
    return obj


def guarded(access: Access):
    """Decorate an endpoint method of an object with a ``svc`` (the Service): the access check
    first, then every error edgetl can name as one JSON line with its status."""

    def wrap(fn):
        @functools.wraps(fn)
        async def endpoint(self, request: Request) -> Response:
            try:
                self.svc.guard.check(request, access)
            except Denied as d:
                extra = {"www-authenticate": 'Bearer realm="edgetl"'} if d.status == 401 else None
                return error(d.status, d.message, extra)
            try:
                return await fn(self, request)
            except EdgetlError as exc:
                retry = {"retry-after": "1"} if isinstance(exc, (Busy, BundleBusy)) else None
                return error(status_of(exc), str(exc), retry)
            except NotFound as exc:
                return error(404, str(exc))
            except OSError as exc:  # the disk under the review store or the bundle
                full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
                return error(507 if full else 500, f"{exc.strerror or exc}: nothing was changed")

        return endpoint

    return wrap


# --------------------------------------------------------------------- access log and metrics
_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


class Observe:
    """ASGI wrapper: one JSON access-log line and the latency histogram per request, and the
    headers every response carries. A pure ASGI layer (not a Starlette middleware class), as
    it sits on every request's path."""

    def __init__(self, app, service, templates: dict):
        self.app, self.service, self.templates = app, service, templates

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        seen = {"status": 500, "out": 0}

        async def watched(message):
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                message["headers"] = list(message.get("headers", [])) + _HEADERS
            elif message["type"] == "http.response.body":
                seen["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            dt = time.perf_counter() - t0
            route = self.templates.get(scope.get("endpoint"), "other")
            self.service.metrics.request(route, scope["method"], seen["status"], dt)
            if self.service.options.access_log:
                client = scope.get("client") or ("", 0)
                line = {
                    "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z",
                    "event": "request",
                    "method": scope["method"],
                    "path": scope["path"][:200],
                    "route": route,
                    "status": seen["status"],
                    "ms": round(dt * 1000, 2),
                    "bytes_out": seen["out"],
                    "client": client[0],
                    **scope.get("edgetl.log", {}),
                }
                access_log.info(json.dumps(line, separators=(",", ":")))
