"""Run the service: bind the socket, build the application, hand both to uvicorn.

The socket is bound here (not by uvicorn) so that ``--port 0`` works: the real port is known
before the first request and is what the start line prints. The bundle and the review store are
opened before anything listens, so a bad bundle or folder is one error line, not a server that
fails on its first request.
"""

from __future__ import annotations

import logging
import secrets
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .app import create_app
from .service import ServeOptions

# Seconds a stopping service waits for requests in flight (an update in flight still completes:
# its worker thread finishes its write before the process exits).
GRACEFUL_STOP_S = 1


@dataclass
class Started:
    """What a person or a supervisor needs once the service listens."""

    url: str
    port: int
    model: str
    task: str
    version: int
    token_generated: bool
    login_url: str | None


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: any free port).

    Raises:
        ConfigError: the address is in use, not this machine's, or not allowed.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"--host {host} --port {port}: cannot listen there ({exc.strerror}); pick another port or stop what uses it"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def configure_logging(access_log: bool) -> None:
    """Access lines (one JSON object each) and the service's warnings on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access = logging.getLogger("edgetl.serve.access")
    access.handlers[:] = [handler]
    access.setLevel(logging.INFO if access_log else logging.WARNING)
    access.propagate = False
    svc_log = logging.getLogger("edgetl.serve")
    plain = logging.StreamHandler(sys.stderr)
    plain.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    svc_log.handlers[:] = [plain]
    svc_log.setLevel(logging.INFO)
    svc_log.propagate = False


def serve(bundle: str | Path, options: ServeOptions, *, port: int = 8080, on_start=None) -> None:
    """Serve ``bundle`` until SIGINT / SIGTERM (uvicorn finishes requests in flight, then stops).

    ``on_start(Started)`` is called once the socket listens and the bundle is loaded. Without a
    token in ``options`` a random one is made (and given to ``on_start``'s login URL).

    Raises:
        ConfigError: a bad option or an address that cannot be bound.
        BundleError / TrustError: the bundle cannot be loaded.
        MissingDependency: the ``serve`` extra is not installed.
    """
    import faulthandler

    import uvicorn

    faulthandler.enable()  # a crash in a native library leaves the threads' stacks in the log
    generated = not options.token
    if generated:
        options.token = secrets.token_urlsafe(24)
    app, svc = create_app(bundle, options)
    try:
        sock = bind(options.host, port)
    except BaseException:
        svc.close()
        raise
    real_port = sock.getsockname()[1]
    shown = f"[{options.host}]" if ":" in options.host else options.host
    url = f"http://{shown}:{real_port}/"
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        # The standard event loop, not uvloop: on a 2-core AMX Xeon VM the service, idle in
        # uvloop's epoll wait, was killed by a kernel-sent SIGSEGV (si_code SI_KERNEL, no Python
        # frame, so faulthandler printed nothing) when SIGTERM arrived, in 6 of 22 stops; with
        # this loop, 0 of 10 on the same machine. Requests are bound by the model, not the loop.
        loop="asyncio",
        server_header=False,
        # On SIGTERM / SIGINT requests in flight get this long to finish: an answer takes
        # milliseconds, but an upload that stalls mid-body held the stop for 30 s before.
        timeout_graceful_shutdown=GRACEFUL_STOP_S,
        limit_concurrency=1024,
        timeout_keep_alive=max(1, int(options.idle_timeout_s)),
    )
    server = uvicorn.Server(config)
    if on_start is not None:
        on_start(
            Started(
                url,
                real_port,
                svc.name,
                svc.task,
                svc.loaded.version,
                generated,
                f"{url}login?token={options.token}" if generated else None,
            )
        )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        svc.close()  # the lifespan closes it too; closing twice is harmless
