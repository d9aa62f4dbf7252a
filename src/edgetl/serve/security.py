"""Who may do what: the token, the page's sessions, CSRF and Host checks.

The model a line PC is on: the PC is shared, and other programs (and browsers) run on it, so

* every write (feedback, adapt, rollback, removing a review item) needs the token, even from
  localhost: ``Authorization: Bearer TOKEN``, or the page's session cookie together with its
  CSRF token in ``X-CSRF-Token``. No token or a wrong one: 401; a session without its CSRF
  token, a request from another origin or for another Host: 403;
* reads (predict, KServe, metrics, history, the page) are open on a loopback binding and need the
  token too when the service listens beyond localhost. ``/v2/health/*`` stays open (it says
  nothing but "up"), for supervisors and load balancers;
* on a loopback binding the ``Host`` header must name the loopback: a web page elsewhere cannot
  reach the open reads through DNS rebinding (its requests carry its own host name);
* a browser write from another origin (an ``Origin`` header that is not this service) is refused
  whatever it carries, and the session cookie is ``HttpOnly; SameSite=Strict``.

Tokens are compared in constant time. A token is at least 16 characters; without one, a random
token is made at start and shown once in the login link.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import threading
import time
from collections import OrderedDict
from enum import Enum

from ..errors import ConfigError

COOKIE = "edgetl_session"
CSRF_HEADER = "x-csrf-token"
MIN_TOKEN = 16
MAX_SESSIONS = 64
SESSION_SECONDS = 12 * 3600


class Access(Enum):
    OPEN = "open"  # health checks, the login page, static assets
    READ = "read"  # answers and what the page shows
    WRITE = "write"  # anything that changes the review store or the bundle


class Denied(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def check_token(token: str) -> str:
    token = token.strip()
    if len(token) < MIN_TOKEN or not token.isprintable() or " " in token:
        raise ConfigError(
            f"the token must be at least {MIN_TOKEN} printable characters without spaces "
            "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(24))')"
        )
    return token


def is_loopback_host(host: str) -> bool:
    """Whether a bind address (or a Host header's name) is the loopback."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name part of a Host header (``[::1]:8080`` -> ``::1``, ``localhost:80`` -> ``localhost``)."""
    header = header.strip()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """The checks every route makes before it runs (see the module docstring)."""

    def __init__(self, token: str, *, loopback: bool, secure_cookie: bool = False):
        self.token = check_token(token)
        self.loopback = loopback
        self.secure_cookie = secure_cookie
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    # ---- sessions of the page ---------------------------------------------------------------
    def token_ok(self, given: str | None) -> bool:
        return isinstance(given, str) and hmac.compare_digest(given.encode(), self.token.encode())

    def new_session(self) -> tuple[str, str]:
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[sid] = (csrf, time.time())
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return sid, csrf

    def end_session(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)

    def session(self, request) -> str | None:
        """The CSRF token of the request's valid session, or None."""
        sid = request.cookies.get(COOKIE)
        if not sid:
            return None
        with self._lock:
            got = self._sessions.get(sid)
            if got is None:
                return None
            csrf, since = got
            if time.time() - since > SESSION_SECONDS:
                self._sessions.pop(sid, None)
                return None
        return csrf

    def cookie_header(self, sid: str) -> str:
        return f"{COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_SECONDS}" + (
            "; Secure" if self.secure_cookie else ""
        )

    # ---- the checks -------------------------------------------------------------------------
    def check(self, request, access: Access) -> None:
        """Raise :class:`Denied` (with its status) unless ``request`` may have ``access``."""
        if self.loopback:
            name = host_name(request.headers.get("host", ""))
            if not is_loopback_host(name):
                raise Denied(403, f"Host {name[:80]!r} is not this service's: it listens on the loopback only")
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("origin")
            if origin is not None and origin != self.origin_of(request):
                raise Denied(403, f"a request from another origin ({origin[:80]}) may not change anything here")
        if access is Access.OPEN:
            return
        if access is Access.READ and self.loopback:
            return
        auth = request.headers.get("authorization")
        if auth is not None:
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not self.token_ok(given.strip()):
                raise Denied(401, "wrong token: send 'Authorization: Bearer TOKEN' with the service's token")
            return
        csrf = self.session(request)
        if csrf is None:
            what = "this" if access is Access.WRITE else "reading beyond localhost"
            raise Denied(401, f"{what} needs the token: send 'Authorization: Bearer TOKEN' or log in on the page")
        if access is Access.WRITE:
            given = request.headers.get(CSRF_HEADER, "")
            if not hmac.compare_digest(given.encode(), csrf.encode()):
                raise Denied(403, "missing or wrong CSRF token (X-CSRF-Token) for the page's session; reload the page")

    def authenticated(self, request) -> bool:
        """Whether the request carries a valid token or session (for what the page offers)."""
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        return (scheme.lower() == "bearer" and self.token_ok(given.strip())) or self.session(request) is not None

    @staticmethod
    def origin_of(request) -> str:
        return f"{request.url.scheme}://{request.headers.get('host', '')}"
