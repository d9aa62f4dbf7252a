"""The Starlette application of ``edgetl serve``: the API routes and :func:`create_app`.

Routes (who may call them: :mod:`edgetl.serve.security`):

=================================  =====  ==============================================================
``POST /predict``                  read   an image (raw body or multipart; a text for text bundles)
``POST /feedback``                 write  ``{"id", "label"}``, ``{"id", "confirm": true}``, ``{"id", "verdict"}``
``POST /review/remove``            write  ``{"id"}``: take an item out of the review store
``POST /adapt``                    write  the usual gate on the pending items; the new head goes live
``GET /history``                   read   every head version
``POST /rollback``                 write  ``{"to": N}`` (default: the version before)
``GET /metrics``                   read   Prometheus text
``/v2/...``                        read   KServe v2 (health open)
``GET /``, ``/api/state``          read   the operator page and what it shows (:mod:`.page`)
``/login``, ``/logout``            open   the page's session (a cookie) from the token
=================================  =====  ==============================================================

Every error is JSON ``{"error": "<one line>"}`` with a status that says whose it is (4xx the
caller's, 503 busy, 507 review store full). No path from a request reaches the file system:
thumbnails and review items are looked up by id in memory, page assets are read once at start.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import __version__
from ..core.console import one_line
from ..device.adapt import check_tolerance
from ..errors import BundleBusy, ConfigError, DataError, EdgetlError
from . import kserve
from .images import TooLarge, check_image, heatmap_png
from .metrics import CONTENT_TYPE
from .page import Page
from .security import Access
from .service import ServeOptions, Service
from .web import NotFound, Observe, error, guarded, jsonr, parse_json, read_body, read_json

__all__ = ["create_app", "ServeOptions", "Service"]


class Api:
    """The machine-facing endpoints (inference, KServe v2, feedback, updates, metrics)."""

    def __init__(self, svc: Service):
        self.svc = svc

    # ---- inference --------------------------------------------------------------------------
    def top_k(self, request: Request, default: int = 1) -> int:
        raw = request.query_params.get("top_k")
        if raw is None:
            return default
        try:
            k = int(raw)
        except ValueError:
            raise DataError(f"top_k {raw[:20]!r}: give a whole number") from None
        n = len(self.svc.loaded.labels)
        if not 1 <= k <= n:
            raise DataError(f"top_k {k}: give 1 to {n}")
        return k

    def texts_of(self, body: bytes, ctype: str) -> tuple[list, bool]:
        if ctype == "application/json":
            obj = parse_json(body)
            several = isinstance(obj, dict) and "texts" in obj
            texts = obj.get("texts") if several else [obj.get("text")] if isinstance(obj, dict) else None
        else:
            try:
                texts, several = [body.decode("utf-8")], False
            except UnicodeDecodeError:
                raise DataError("the text is not UTF-8") from None
        if (
            not isinstance(texts, list)
            or not texts
            or len(texts) > kserve.MAX_ITEMS
            or not all(isinstance(t, str) and t.strip() for t in texts)
        ):
            raise DataError(
                f"give 1 to {kserve.MAX_ITEMS} non-empty texts (a text/plain body, or JSON "
                '{"text": ...} / {"texts": [...]})'
            )
        limit = self.svc.options.max_text_chars
        if any(len(t) > limit for t in texts):
            raise TooLarge(f"a text is longer than {limit} characters")
        return texts, several

    async def files_of(self, request: Request, body: bytes) -> list[bytes]:
        async def stream():
            yield body

        try:
            form = await MultiPartParser(
                request.headers, stream(), max_files=kserve.MAX_ITEMS, max_fields=16, max_part_size=self.svc.max_body
            ).parse()
        except MultiPartException as exc:
            raise DataError(f"the multipart form does not parse ({exc.message})") from None
        try:
            files = [v for _, v in form.multi_items() if hasattr(v, "read")]
            if not files:
                raise DataError("the form has no file part; send the image as a file field (curl -F file=@img.jpg)")
            return [await f.read() for f in files]
        finally:
            await form.close()

    async def inputs_of(self, request: Request) -> tuple[list, list[str], bool]:
        """(payloads, suffixes, several?) of a predict request."""
        body = await read_body(request, self.svc.max_body)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if self.svc.task_obj.reads_texts:
            texts, several = self.texts_of(body, ctype)
            return texts, [".txt"] * len(texts), several
        if ctype == "multipart/form-data":
            datas = await self.files_of(request, body)
        else:
            datas = [body]
        return datas, [check_image(d) for d in datas], len(datas) > 1

    @guarded(Access.READ)
    async def predict(self, request: Request) -> Response:
        svc = self.svc
        payloads, suffixes, several = await self.inputs_of(request)
        top_k = self.top_k(request)
        want_map = svc.task_obj.one_class and request.query_params.get("heatmap", "") in ("1", "true", "yes")
        _, out = await svc.answer(payloads, suffixes, top_k=top_k)
        rows = []
        for x in out:
            if isinstance(x, Exception):
                rows.append({"error": one_line(str(x))})
                continue
            rec, a = x
            row = svc.response_of(rec)
            if want_map and a.map_u8 is not None:
                row["heatmap"] = await run_in_threadpool(
                    heatmap_png, rec.payload, svc.loaded.bundle.preprocess, a.map_u8, frame=svc.loaded.tiled
                )
            rows.append(row)
        request.scope["edgetl.log"] = {
            "ids": [r["id"] for r in rows if "id" in r],
            "version": next((r["head_version"] for r in rows if "id" in r), None),
        }
        if several:
            return jsonr({"predictions": rows})
        if "error" in rows[0]:
            return error(422, rows[0]["error"])
        return jsonr(rows[0])

    # ---- KServe v2 --------------------------------------------------------------------------
    def check_model(self, request: Request) -> None:
        svc = self.svc
        name = request.path_params["name"]
        if name != svc.name:
            raise NotFound(f"no model {name[:64]!r} here; this service serves {svc.name!r}")
        v = request.path_params.get("version")
        if v is not None and v != str(svc.loaded.version):
            raise NotFound(
                f"model {svc.name} version {v[:16]!r} is not the one serving (v{svc.loaded.version}); "
                "use the current version or none"
            )

    @guarded(Access.OPEN)
    async def v2_server(self, request: Request) -> Response:
        return jsonr({"name": "edgetl", "version": __version__, "extensions": ["binary_tensor_data"]})

    @guarded(Access.OPEN)
    async def v2_live(self, request: Request) -> Response:
        return jsonr({"live": True})

    @guarded(Access.OPEN)
    async def v2_ready(self, request: Request) -> Response:
        return jsonr({"ready": True})

    @guarded(Access.READ)
    async def v2_model(self, request: Request) -> Response:
        self.check_model(request)
        svc, b = self.svc, self.svc.loaded
        shape = b.map_shape if svc.task_obj.one_class else None
        return jsonr(kserve.metadata(svc.name, b.version, svc.task_obj, list(b.labels), shape))

    @guarded(Access.READ)
    async def v2_model_ready(self, request: Request) -> Response:
        self.check_model(request)
        return jsonr({"name": self.svc.name, "ready": True})

    @guarded(Access.READ)
    async def v2_infer(self, request: Request) -> Response:
        self.check_model(request)
        svc = self.svc
        body = await read_body(request, svc.max_body)
        req, binary = kserve.split_body(body, request.headers.get(kserve.HEADER))
        items = kserve.read_inputs(req, binary, svc.task_obj)
        wanted = kserve.requested_outputs(req, svc.task_obj)
        if svc.task_obj.reads_texts:
            if not all(t.strip() for t in items):
                raise DataError("a text element is empty")
            suffixes = [".txt"] * len(items)
        else:
            suffixes = [check_image(d) for d in items]
        version, out = await svc.answer(
            items, suffixes, top_k=len(svc.loaded.labels), raw_maps=any(n == "anomaly_map" for n, _ in wanted)
        )
        bad = [x for x in out if isinstance(x, Exception)]
        if bad:
            raise DataError(f"item {out.index(bad[0])}: {bad[0]}")
        recs, answers = [r for r, _ in out], [a for _, a in out]
        tensors = kserve.output_tensors(svc.task_obj, list(svc.loaded.labels), answers, [r.id for r in recs])
        content, headers = kserve.response(svc.name, version, req.get("id"), tensors, wanted)
        request.scope["edgetl.log"] = {"ids": [r.id for r in recs], "version": version}
        return Response(content, headers={"cache-control": "no-store", **headers})

    # ---- feedback and updates ---------------------------------------------------------------
    @guarded(Access.WRITE)
    async def feedback(self, request: Request) -> Response:
        body = await read_json(request)
        return jsonr(await run_in_threadpool(self.svc.feedback, body))

    @guarded(Access.WRITE)
    async def review_remove(self, request: Request) -> Response:
        svc = self.svc
        body = await read_json(request)
        if svc.review is None:
            raise ConfigError("no review store: start edgetl serve with --review DIR")
        item_id = body.get("id")
        if not await run_in_threadpool(svc.review.remove, item_id if isinstance(item_id, str) else ""):
            raise NotFound(f"no review item {str(item_id)[:40]!r}")
        return jsonr({"removed": item_id, "review": svc.review.summary(svc.loaded.version)})

    def updating(self) -> None:
        if not self.svc.update_lock.acquire(blocking=False):
            raise BundleBusy("an update (adapt or rollback) of this service is already running; wait for it")

    @guarded(Access.WRITE)
    async def adapt(self, request: Request) -> Response:
        svc = self.svc
        body = await read_json(request)
        force, dry_run = body.get("force", False) is True, body.get("dry_run", False) is True
        tol = check_tolerance(body.get("tolerance_pp", svc.options.tolerance_pp), "tolerance_pp")
        self.updating()
        try:
            status, out = await run_in_threadpool(lambda: svc.run_adapt(force=force, tolerance_pp=tol, dry_run=dry_run))
        except EdgetlError:
            svc.metrics.update("adapt", "error")
            raise
        finally:
            svc.update_lock.release()
        request.scope["edgetl.log"] = {"version": out["version"], "accepted": out["accepted"]}
        return jsonr(out, status)

    @guarded(Access.WRITE)
    async def rollback(self, request: Request) -> Response:
        body = await read_json(request)
        to = body.get("to")
        if to is not None and (not isinstance(to, int) or isinstance(to, bool)):
            raise DataError(f"to {str(to)[:20]!r}: give a version number")
        self.updating()
        try:
            out = await run_in_threadpool(self.svc.run_rollback, to)
        finally:
            self.svc.update_lock.release()
        request.scope["edgetl.log"] = {"version": out["version"]}
        return jsonr(out)

    @guarded(Access.READ)
    async def history(self, request: Request) -> Response:
        return jsonr(self.svc.history())

    @guarded(Access.READ)
    async def metrics(self, request: Request) -> Response:
        svc = self.svc
        review = svc.review.summary(svc.loaded.version) if svc.review is not None else None
        text = svc.metrics.render(
            task=svc.task,
            model=svc.name,
            version=svc.loaded.version,
            queued=svc.engine.queued,
            recent=svc.recent.ratios(),
            review=review,
        )
        return Response(text, media_type=CONTENT_TYPE, headers={"cache-control": "no-store"})

    def routes(self) -> list[Route]:
        v2 = "/v2/models/{name}"
        return [
            Route("/predict", self.predict, methods=["POST"]),
            Route("/feedback", self.feedback, methods=["POST"]),
            Route("/review/remove", self.review_remove, methods=["POST"]),
            Route("/adapt", self.adapt, methods=["POST"]),
            Route("/rollback", self.rollback, methods=["POST"]),
            Route("/history", self.history, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v2", self.v2_server, methods=["GET"]),
            Route("/v2/health/live", self.v2_live, methods=["GET"]),
            Route("/v2/health/ready", self.v2_ready, methods=["GET"]),
            *(
                r
                for base in (v2, v2 + "/versions/{version}")
                for r in (
                    Route(base, self.v2_model, methods=["GET"]),
                    Route(base + "/ready", self.v2_model_ready, methods=["GET"]),
                    Route(base + "/infer", self.v2_infer, methods=["POST"]),
                )
            ),
        ]


def create_app(bundle: str | Path, options: ServeOptions) -> tuple[Observe, Service]:
    """The ASGI application for ``bundle`` and the :class:`Service` behind it.

    The engine starts with the application (its lifespan) and stops with it.

    Raises:
        BundleError / TrustError: the bundle cannot be loaded.
        ConfigError: a bad token, name or review folder.

    Example:
        >>> app, service = create_app("parts.bundle", ServeOptions(token="x" * 24))  # doctest: +SKIP
        >>> import uvicorn; uvicorn.run(app, port=8080)  # doctest: +SKIP
    """
    svc = Service(bundle, options)
    try:
        page = Page(svc)
    except BaseException:
        svc.close()
        raise
    routes = page.routes() + Api(svc).routes()
    templates: dict = {}
    for r in routes:
        templates.setdefault(r.endpoint, r.path)

    @asynccontextmanager
    async def lifespan(app):
        svc.engine.start(watch_s=options.watch_s)
        try:
            yield
        finally:
            svc.close()

    async def no_route(request: Request, exc) -> Response:
        status = getattr(exc, "status_code", 404)
        return error(
            status,
            "no such route"
            if status == 404
            else "method not allowed"
            if status == 405
            else str(getattr(exc, "detail", "error")),
        )

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: no_route, 405: no_route})
    app.state.body_timeout_s = options.body_timeout_s  # read_body's deadline
    return Observe(app, svc, templates), svc
