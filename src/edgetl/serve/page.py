"""The operator page's routes: the page and its two assets, the login that turns the token into
a session cookie (with its CSRF token), what the page shows, and the thumbnails.

The page is three files in ``static/`` read once at start, served from this process under a
Content-Security-Policy that allows nothing but this origin: it works on a line PC with no
network, and a string from a request never names a file.
"""

from __future__ import annotations

import asyncio
from html import escape
from importlib import resources
from urllib.parse import parse_qs

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from .review import ID
from .security import COOKIE, Access, Denied
from .web import NotFound, guarded, jsonr, read_body

ASSETS = {"/static/app.js": ("app.js", "text/javascript"), "/static/app.css": ("app.css", "text/css")}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
NO_STORE = {"content-security-policy": CSP, "cache-control": "no-store"}


class Page:
    """The endpoints a person's browser uses."""

    def __init__(self, svc):
        self.svc = svc
        static = resources.files(__package__).joinpath("static")
        self.assets = {name: static.joinpath(name).read_bytes() for name in ("index.html", "app.js", "app.css")}

    @guarded(Access.OPEN)
    async def page(self, request: Request) -> Response:
        try:
            self.svc.guard.check(request, Access.READ)
        except Denied:
            return RedirectResponse("/login", status_code=303)
        return HTMLResponse(self.assets["index.html"], headers=NO_STORE)

    @guarded(Access.OPEN)
    async def asset(self, request: Request) -> Response:
        name, kind = ASSETS[request.url.path]
        return Response(self.assets[name], media_type=kind, headers={"cache-control": "no-cache"})

    def login_page(self, message: str = "", status: int = 200) -> Response:
        bad = f"<p class=bad id=bad>{escape(message)}</p>" if message else ""
        text = (
            "<!doctype html><html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content='width=device-width'><title>edgetl serve: log in</title>"
            "<link rel=stylesheet href=/static/app.css></head><body><main class=login>"
            f"<h1>{escape(self.svc.name)}</h1><p>Give the service's token to confirm, correct, adapt and roll "
            f"back.</p>{bad}<form method=post action=/login><input type=password name=token id=token "
            "autocomplete=current-password placeholder=token autofocus required>"
            "<button id=login>Log in</button></form></main></body></html>"
        )
        return HTMLResponse(text, status_code=status, headers=NO_STORE)

    @guarded(Access.OPEN)
    async def login(self, request: Request) -> Response:
        if request.method == "POST":
            body = await read_body(request, 4096)
            given = (parse_qs(body.decode("utf-8", "replace")).get("token") or [""])[0]
        else:
            given = request.query_params.get("token")
            if given is None:
                return self.login_page()
        if not self.svc.guard.token_ok(given.strip()):
            await asyncio.sleep(0.5)  # a wrong guess costs time
            return self.login_page("That is not the token.", 403)
        sid, _ = self.svc.guard.new_session()
        # 303 to "/": the token never stays in the address bar or the history
        return Response(
            status_code=303,
            headers={"location": "/", "cache-control": "no-store", "set-cookie": self.svc.guard.cookie_header(sid)},
        )

    @guarded(Access.OPEN)
    async def logout(self, request: Request) -> Response:
        self.svc.guard.end_session(request.cookies.get(COOKIE))
        return Response(
            status_code=303,
            headers={
                "location": "/login",
                "cache-control": "no-store",
                "set-cookie": f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict",
            },
        )

    @guarded(Access.OPEN)
    async def session(self, request: Request) -> Response:
        csrf = self.svc.guard.session(request)
        return jsonr({"authenticated": csrf is not None, "csrf": csrf, "loopback": self.svc.loopback})

    @guarded(Access.READ)
    async def state(self, request: Request) -> Response:
        return jsonr(self.svc.state(write=self.svc.guard.authenticated(request)))

    @guarded(Access.READ)
    async def thumb(self, request: Request) -> Response:
        return await _item_image(request, self.svc.thumbnail, "image/jpeg", "thumbnail")

    @guarded(Access.READ)
    async def heat_map(self, request: Request) -> Response:
        return await _item_image(request, self.svc.heat_map, "image/png", "heat map")

    def routes(self) -> list[Route]:
        return [
            Route("/", self.page, methods=["GET"]),
            Route("/static/app.js", self.asset, methods=["GET"]),
            Route("/static/app.css", self.asset, methods=["GET"]),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/api/session", self.session, methods=["GET"]),
            Route("/api/state", self.state, methods=["GET"]),
            Route("/thumb/{id}", self.thumb, methods=["GET"]),
            Route("/heatmap/{id}", self.heat_map, methods=["GET"]),
        ]


async def _item_image(request: Request, draw, media_type: str, what: str) -> Response:
    """An image of one recent answer (``draw(item_id)`` -> bytes or None), drawn off the event loop;
    404 for an id of the wrong form or one with nothing to draw."""
    item_id = request.path_params["id"]
    data = await run_in_threadpool(draw, item_id) if ID.fullmatch(item_id) else None
    if data is None:
        raise NotFound(f"no such {what}")
    return Response(data, media_type=media_type, headers={"cache-control": "private, max-age=600"})
