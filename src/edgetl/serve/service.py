"""What one ``edgetl serve`` holds and does, without HTTP: the engine, the recent answers, the
review store, feedback on an answer, the updates (adapt, rollback) and what the page shows.

Updates go through the library (:func:`edgetl.device.adapt.adapt` / ``rollback``), so they take
the bundle's writer lock like ``edgetl adapt`` in a shell does, run the same gate, and switch the
manifest in one atomic rename; the engine then loads the new version completely and swaps it in
between two batches, so no request fails or sees a half-written head.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__, tasks
from ..core.console import one_line
from ..device.adapt import DEFAULT_TOLERANCE_PP, adapt, history, rollback
from ..errors import ConfigError, DataError, GateError
from .engine import Engine
from .images import heatmap_bytes, make_thumb, stored_form
from .metrics import Metrics
from .review import ID, ReviewStore, check_label
from .security import Guard, is_loopback_host
from .web import NotFound


@dataclass
class ServeOptions:
    """How the service runs (the ``edgetl serve`` options).

    Attributes:
        host: the address to listen on; anything but the loopback makes reads need the token.
        token: the secret every write (and, beyond localhost, every read) needs.
        review: the review store's folder (None: no feedback, no adapt from the page).
        name: the model's name in KServe paths (default: the bundle folder's name).
        max_batch / batch_wait_ms: batching of concurrent requests (see :class:`Engine`).
        max_upload_mb: the largest request body; images also obey ``EDGETL_MAX_MEGAPIXELS``.
        recent / recent_mb: answers kept in memory for the page and for feedback.
        review_max_items / review_max_mb: the review store's bounds.
        signer: signs the versions an update or rollback writes (a trust policy may ask for it).
        wait: seconds an update waits for another writer of the bundle.
        body_timeout_s / idle_timeout_s: a whole request body must arrive within the first, and an
            idle kept-alive connection is closed after the second.
    """

    host: str = "127.0.0.1"
    token: str = ""
    review: Path | None = None
    name: str | None = None
    max_batch: int = 8
    batch_wait_ms: float = 0.0
    max_upload_mb: float = 20.0
    recent: int = 200
    recent_mb: float = 64.0
    review_max_items: int = 5000
    review_max_mb: float = 1024.0
    threads: int | None = None
    device: str | None = None
    signer: Any = None
    wait: float = 10.0
    tolerance_pp: float = DEFAULT_TOLERANCE_PP
    watch_s: float = 2.0
    access_log: bool = True
    secure_cookie: bool = False
    max_text_chars: int = 20_000
    body_timeout_s: float = 30.0  # a request body slower than this is cut off (408)
    idle_timeout_s: float = 5.0  # a kept-alive connection idle this long is closed


# ------------------------------------------------------------------------------ recent answers
@dataclass
class Record:
    """One answer the service gave, kept for the page and for feedback on it."""

    id: str
    t: float
    version: int
    result: dict
    need: float
    payload: bytes | str
    suffix: str
    map_u8: Any = None
    reviewed: str | None = None
    thumb: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.payload) + (self.map_u8.nbytes if self.map_u8 is not None else 0) + len(self.thumb or b"")

    def row(self) -> dict:
        r = self.result
        out = {
            "id": self.id,
            "t": round(self.t, 3),
            "version": self.version,
            "need": self.need,
            "reviewed": self.reviewed,
            **{
                k: r[k]
                for k in (
                    "label",
                    "confidence",
                    "unknown",
                    "drift_p",
                    "ood",
                    "score",
                    "threshold",
                    "normalised",
                    "verdict",
                )
                if k in r
            },
        }
        if "top_k" in r:
            out["top_k"] = r["top_k"][:3]
        if isinstance(self.payload, str):
            out["text"] = self.payload[:300]
        return out


class Recent:
    """The last answers, bounded in count and bytes (oldest dropped first)."""

    def __init__(self, max_items: int, max_bytes: int):
        self.max_items, self.max_bytes = max(1, max_items), max_bytes
        self._d: OrderedDict[str, Record] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, rec: Record) -> None:
        with self._lock:
            self._d[rec.id] = rec
            self._bytes += rec.size
            while len(self._d) > self.max_items or (self._bytes > self.max_bytes and len(self._d) > 1):
                _, old = self._d.popitem(last=False)
                self._bytes -= old.size

    def get(self, item_id: str) -> Record | None:
        with self._lock:
            return self._d.get(item_id)

    def set_thumb(self, rec: Record, thumb: bytes) -> None:
        with self._lock:
            if rec.thumb is None and rec.id in self._d:
                rec.thumb = thumb
                self._bytes += len(thumb)

    def rows(self, limit: int) -> list[dict]:
        with self._lock:
            return [r.row() for r in list(reversed(self._d.values()))[:limit]]

    def queue(self, limit: int) -> list[dict]:
        with self._lock:
            todo = [r for r in self._d.values() if r.reviewed is None]
        todo.sort(key=lambda r: (-r.need, -r.t))
        return [r.row() for r in todo[:limit]]

    def ratios(self) -> dict:
        with self._lock:
            rs = [r.result for r in self._d.values()]
        n = len(rs)

        def share(f) -> float:
            return round(sum(1 for r in rs if f(r)) / n, 6) if n else 0.0

        return {
            "n": n,
            "unknown": share(lambda r: r.get("unknown")),
            "ood": share(lambda r: r.get("ood")),
            "defect": share(lambda r: r.get("verdict") == "defect"),
        }

    def __len__(self) -> int:
        return len(self._d)


# ------------------------------------------------------------------------------------- service
class Service:
    """Everything one ``edgetl serve`` holds: the engine, the recent answers, the review store,
    the metrics and the guard. Built before the server binds, so a bad bundle or folder fails
    the command with one line instead of a traceback at the first request."""

    def __init__(self, bundle: str | Path, options: ServeOptions):
        self.path = Path(bundle)
        self.options = options
        self.metrics = Metrics()
        self.loopback = is_loopback_host(options.host)
        self.guard = Guard(options.token, loopback=self.loopback, secure_cookie=options.secure_cookie)
        self.engine = Engine(
            self.path,
            threads=options.threads,
            device=options.device,
            max_batch=options.max_batch,
            batch_wait_ms=options.batch_wait_ms,
            on_batch=self.metrics.batch,
        )
        try:
            self._setup(options)
        except BaseException:
            self.engine.stop()
            raise

    def _setup(self, options: ServeOptions) -> None:
        self.task = self.engine.loaded.task
        self.task_obj = tasks.get(self.task)
        self.name = options.name or default_name(self.path)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.name):
            raise ConfigError(f"--name {self.name!r}: use letters, digits, '_', '.' or '-' (it is part of URLs)")
        self.recent = Recent(options.recent, int(options.recent_mb * 1e6))
        self.review = (
            ReviewStore(
                options.review,
                task=self.task,
                max_items=options.review_max_items,
                max_bytes=int(options.review_max_mb * 1e6),
            )
            if options.review
            else None
        )
        self.max_body = int(options.max_upload_mb * 1e6)
        self.update_lock = threading.Lock()
        self.last_update: dict | None = None

    @property
    def loaded(self):
        return self.engine.loaded

    def close(self) -> None:
        """Stop the engine and release the review store (idempotent)."""
        self.engine.stop()
        if self.review is not None:
            self.review.close()

    # ---- answers ----------------------------------------------------------------------------
    async def answer(self, payloads: list, suffixes: list[str], *, top_k: int, raw_maps: bool = False):
        """Answers for inputs, recorded for the page. -> (version, [(record | DataError)])."""
        fut = self.engine.submit(payloads, top_k=top_k, raw_maps=raw_maps)
        version, answers = await asyncio.wrap_future(fut)
        out = []
        for payload, suffix, a in zip(payloads, suffixes, answers):
            if isinstance(a, Exception):
                self.metrics.failed()
                out.append(a)
                continue
            self.metrics.answer(a.result)
            rec = Record(
                secrets.token_hex(8),
                time.time(),
                version,
                a.result,
                self.task_obj.review_need(a.result),
                payload,
                suffix,
                a.map_u8,
            )
            self.recent.add(rec)
            out.append((rec, a))
        return version, out

    def response_of(self, rec: Record) -> dict:
        return {"id": rec.id, "task": self.task, "head_version": rec.version, **rec.result}

    # ---- feedback ---------------------------------------------------------------------------
    def feedback(self, body: dict) -> dict:
        """Store a person's label for an answer (runs in a worker thread: it fsyncs)."""
        if self.review is None:
            raise ConfigError("no review store: start edgetl serve with --review DIR to keep confirmed items")
        item_id = body.get("id")
        if not isinstance(item_id, str):
            raise DataError(f"id {str(item_id)[:40]!r}: give the 'id' a prediction answered with, as a string")
        # A string that names no prediction is an unknown resource (404), whatever its shape; only
        # the well-formed ids reach the stores.
        if not ID.fullmatch(item_id):
            raise NotFound(f"no prediction {item_id[:40]!r}: give the 'id' (16 hex digits) a prediction answered with")
        rec = self.recent.get(item_id)
        stored = self.review.get(item_id)
        if rec is None and stored is None:
            raise NotFound(
                f"prediction {item_id} is no longer held (the service keeps the last "
                f"{self.options.recent} answers); send the image again"
            )
        predicted = rec.result["label"] if rec is not None else stored.get("predicted")
        label = self._label_of(body, predicted)
        info = {"predicted": predicted, "confirmed": label == predicted}
        if rec is not None:
            info.update({k: rec.result[k] for k in ("confidence", "score", "normalised") if k in rec.result})
            payload, suffix, version = rec.payload, rec.suffix, rec.version
            if isinstance(payload, bytes):
                payload, suffix = stored_form(payload, suffix)
        else:
            payload, suffix, version = b"", "", stored["head_version"]
        meta = self.review.put(
            item_id, payload, label=label, suffix=suffix, info=info, version=version, current=self.loaded.version
        )
        if rec is not None:
            rec.reviewed = label
        known = self.loaded.labels
        return {
            "id": item_id,
            "label": label,
            "confirmed": label == predicted,
            "new_class": not self.task_obj.one_class and label not in known,
            "stored": meta["file"],
            "review": self.review.summary(self.loaded.version),
        }

    def _label_of(self, body: dict, predicted: str | None) -> str:
        if self.task_obj.one_class:
            verdict = body.get("verdict", body.get("label"))
            if body.get("confirm") is True and verdict is None:
                verdict = predicted
            verdicts = self.task_obj.fixed_labels
            if verdict not in verdicts:
                raise DataError(
                    f"verdict {str(verdict)[:40]!r}: give {' or '.join(map(repr, verdicts))} (or confirm: true)"
                )
            return verdict
        if body.get("confirm") is True and body.get("label") is None:
            if predicted in (None, "unknown"):
                raise DataError("the answer was 'unknown': nothing to confirm; give the label it really is")
            return predicted
        return check_label(body.get("label"))

    # ---- updates ----------------------------------------------------------------------------
    def run_adapt(self, *, force: bool, tolerance_pp: float, dry_run: bool) -> tuple[int, dict]:
        """The usual update on the pending items, then the new version live. -> (status, body)."""
        if self.review is None:
            raise ConfigError("no review store: start edgetl serve with --review DIR to collect items to learn from")
        before = self.loaded.version
        data, ids, scratch = self.review.adapt_input(before)
        opts = {
            "force": force,
            "tolerance_pp": tolerance_pp,
            "wait": self.options.wait,
            "signer": self.options.signer,
            "quiet": True,
        }
        t0 = time.perf_counter()
        try:
            try:
                r = adapt(self.path, data, dry_run=dry_run, **opts)
            except GateError as exc:
                # refused: the same run as a dry run gives the gate's numbers for the page
                dry = adapt(self.path, data, dry_run=True, **opts)
                body = {
                    "accepted": False,
                    "dry_run": dry_run,
                    "version": before,
                    "previous": before,
                    "items": len(ids),
                    "reason": one_line(str(exc)),
                    "summary": _plain(dry.summary),
                    "text": self.task_obj.render_adapt(dry, True),
                    "seconds": round(time.perf_counter() - t0, 3),
                }
                self.metrics.update("adapt", "refused")
                self.last_update = {"operation": "adapt", **body}
                return 409, body
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        live = before
        if not dry_run and r.accepted:
            self.review.mark_used(ids, r.version)
            live = self.engine.reload().version
            self.metrics.switched()
        body = {
            "accepted": bool(r.accepted) and not dry_run,
            "dry_run": dry_run,
            "version": live,
            "previous": before,
            "items": len(ids),
            "summary": _plain(r.summary),
            "timings": r.timings,
            "skipped": [{"item": Path(str(p)).name, "reason": why} for p, why in r.skipped],
            "text": self.task_obj.render_adapt(r, dry_run),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        self.metrics.update("adapt", "dry-run" if dry_run else "accepted")
        self.last_update = {"operation": "adapt", **body}
        return 200, body

    def run_rollback(self, to: int | None) -> dict:
        before = self.loaded.version
        rollback(self.path, to=to, wait=self.options.wait, signer=self.options.signer)
        live = self.engine.reload().version
        self.metrics.switched()
        self.metrics.update("rollback", "done")
        body = {
            "operation": "rollback",
            "version": live,
            "previous": before,
            "text": f"head v{live} is live again (was v{before})",
        }
        self.last_update = body
        return body

    def history(self) -> dict:
        rows = history(self.loaded.bundle)
        keep = (
            "version",
            "created",
            "source",
            "labels",
            "current",
            "val_accuracy",
            "threshold",
            "unknown_threshold",
            "images",
            "texts",
            "new_images",
            "new_classes",
            "parent",
            "gate",
            "kind",
        )
        return {"current": self.loaded.version, "versions": [{k: e[k] for k in keep if k in e} for e in rows]}

    # ---- what the page shows ----------------------------------------------------------------
    def state(self, *, write: bool) -> dict:
        b = self.loaded
        labels = list(b.labels)
        review = None
        if self.review is not None:
            review = {
                **self.review.summary(b.version),
                "items_list": [_review_row(m) for m in self.review.listing(b.version, limit=40)],
            }
            labels += sorted(set(review["pending"]) - set(labels) - {"good", "defect"})
        return {
            "model": self.name,
            "task": self.task,
            "version": b.version,
            "labels": labels,
            "threshold": getattr(b.predictor, "threshold", None),
            "answers": len(self.recent),
            "recent": self.recent.rows(36),
            "queue": self.recent.queue(24),
            "review": review,
            "history": self.history(),
            "last_update": self.last_update,
            "write": write,
            "edgetl": __version__,
        }

    def heat_map(self, item_id: str) -> bytes | None:
        """A recent defect answer's heat map over its image, full size (PNG; None: no such answer
        or no map). Drawn on request, not kept: the page asks for it when a person opens it."""
        rec = self.recent.get(item_id)
        if rec is None or rec.map_u8 is None or isinstance(rec.payload, str):
            return None
        loaded = self.loaded
        return heatmap_bytes(rec.payload, loaded.bundle.preprocess, rec.map_u8, frame=loaded.tiled)

    def thumbnail(self, item_id: str) -> bytes | None:
        rec = self.recent.get(item_id)
        if rec is not None:
            if isinstance(rec.payload, str):
                return None
            if rec.thumb is None:
                loaded = self.loaded
                thumb = make_thumb(rec.payload, loaded.bundle.preprocess, rec.map_u8, frame=loaded.tiled)
                self.recent.set_thumb(rec, thumb)
            return rec.thumb
        if self.review is not None and not self.task_obj.reads_texts:
            data = self.review.payload(item_id)
            if data:
                return make_thumb(data, self.loaded.bundle.preprocess, None)
        return None


def default_name(path: Path) -> str:
    name = path.resolve().name
    name = name[: -len(".bundle")] if name.endswith(".bundle") and len(name) > 7 else name
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:64] or "model"


def _review_row(m: dict) -> dict:
    return {k: m.get(k) for k in ("id", "label", "predicted", "confirmed", "created", "adapted_in", "pending")}


def _plain(obj):
    """JSON-safe copy (numpy scalars and paths to plain values)."""
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
