"""The predictor behind the service: one inference thread, batches of concurrent requests, and a
head version that can change while requests are in flight.

Why one thread: an OpenVINO session owns one infer request (not safe to call from two threads),
and on a small CPU one model call already uses every core, so running calls side by side only
makes each slower. Requests queue; the thread takes what is queued (up to ``max_batch`` items,
optionally waiting ``batch_wait_ms`` for more) and answers them in one model call.

Why swapping is safe: the thread reads the current predictor once per batch. A reload builds the
new predictor completely (sessions open, head loaded) before it replaces the reference, so a
batch already running finishes on the old version, the next one runs on the new, and no request
ever sees a half-loaded model. Which version answered travels with every answer.

Answers come from the library's own predictor (``load_predictor(path).predict``), so they are the
numbers ``edgetl predict`` prints. The predictor reads image files, so an upload is written to a
private temporary folder (in memory under /dev/shm where there is one) under a name made here,
never one from the request, and removed after the call.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import tasks
from ..device.predict import load_predictor
from ..errors import DataError, EdgetlError

log = logging.getLogger("edgetl.serve")

# A normalised defect map (1.0 = the threshold) is kept as uint8 over [0, MAP_RANGE] for the
# page's overlays: 224 x 224 bytes per image instead of 200 KB of float32 (a tiled bundle's map
# covers its working frame: 448 x 336 bytes, say).
MAP_RANGE = 1.5


class Busy(EdgetlError):
    """The inference queue is full (the service is overloaded): retry later."""


@dataclass
class Answer:
    """One input's answer: the JSON ``result``, and for defects the map (uint8 over
    [0, MAP_RANGE] of score / threshold, for overlays) and, when asked for, the raw float map."""

    result: dict
    map_u8: np.ndarray | None = None
    raw_map: np.ndarray | None = None


@dataclass
class Loaded:
    """A predictor ready to answer, and what it answers as."""

    predictor: Any
    version: int
    task: str
    labels: list[str]
    stamp: tuple | None
    loaded_at: float = field(default_factory=time.time)

    @property
    def bundle(self):
        return self.predictor.bundle

    @property
    def map_shape(self) -> tuple[int, int] | None:
        """(h, w) of a defect bundle's maps: the input view, or a tiled bundle's working frame."""
        plan = getattr(self.predictor, "plan", None)
        if plan is not None:
            return plan.work[1], plan.work[0]
        size = self.bundle.preprocess.input_size
        return size, size

    @property
    def tiled(self) -> bool:
        """Maps cover the whole frame (a tiled defect bundle), not the model's input view."""
        return getattr(self.predictor, "plan", None) is not None

    @property
    def task_obj(self):
        """The :class:`edgetl.tasks.base.Task` the bundle was made by (what differs by task is asked of it)."""
        return tasks.get(self.task)


@dataclass
class _Job:
    items: list
    top_k: int
    raw_maps: bool
    future: concurrent.futures.Future


def manifest_stamp(path: Path) -> tuple | None:
    """What changes when a writer switches the bundle's manifest (an atomic rename: a new inode)."""
    try:
        st = os.stat(Path(path) / "manifest.json")
        return st.st_ino, st.st_mtime_ns, st.st_size
    except OSError:
        return None


def private_tmpdir() -> Path:
    """A 0700 folder for uploads in flight, in memory where the system has /dev/shm."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="edgetl-serve-", dir=base))


class Engine:
    """Answers for a bundle from one inference thread; :meth:`reload` switches head versions live.

    Args:
        path: the bundle directory.
        threads: intra-op threads of the runtime (default: every core).
        device: OpenVINO device override.
        max_batch: the most items one model call answers (1: no batching).
        batch_wait_ms: how long the thread waits for more requests once it has one (0: it takes
            only what is already queued, which adds no latency to a lone request).
        queue_limit: requests waiting at most; beyond that :meth:`submit` raises :class:`Busy`.
        on_batch: called with each batch's item count (metrics).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int | None = None,
        device: str | None = None,
        max_batch: int = 8,
        batch_wait_ms: float = 0.0,
        queue_limit: int = 256,
        on_batch=None,
    ):
        self.path = Path(path)
        self.threads, self.device = threads, device
        self.max_batch = max(1, int(max_batch))
        self.batch_wait = max(0.0, float(batch_wait_ms)) / 1000.0
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_limit))
        self._reload_lock = threading.Lock()
        self._on_batch = on_batch
        self._tmp = private_tmpdir()
        self._thread: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()
        self.loaded = self._load()

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self, *, watch_s: float = 2.0) -> Engine:
        """Start the inference thread, and a watcher that reloads when another process (``edgetl
        adapt`` / ``rollback`` from a shell) switched the bundle's head version."""
        self._thread = threading.Thread(target=self._run, name="edgetl-inference", daemon=True)
        self._thread.start()
        if watch_s > 0:
            self._watcher = threading.Thread(target=self._watch, args=(watch_s,), name="edgetl-watch", daemon=True)
            self._watcher.start()
        return self

    def stop(self) -> None:
        """Finish what is queued, then end the threads (a second call does nothing)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._queue.put(None)  # after the queued jobs: they are answered first
            self._thread.join(timeout=30)
        if self._watcher is not None:
            self._watcher.join(timeout=30)  # it may be loading a version: let it finish first
        shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    # ---- versions ---------------------------------------------------------------------------
    def _load(self) -> Loaded:
        stamp = manifest_stamp(self.path)  # read first: a switch during the load is seen next time
        p = load_predictor(self.path, device=self.device, threads=self.threads)
        task = p.bundle.task
        labels = list(p.labels) if hasattr(p, "labels") else ["good", "defect"]
        return Loaded(p, int(p.version), task, labels, stamp)

    def reload(self) -> Loaded:
        """Load the bundle's current head version and make it the one that answers.

        The new predictor is complete before the switch; a batch in flight finishes on the old one.

        Raises:
            BundleError / TrustError: the bundle as it is now cannot be loaded (the old version
                keeps answering).
        """
        with self._reload_lock:
            new = self._load()
            old, self.loaded = self.loaded, new  # one reference assignment: atomic for the thread
            if old.version != new.version:
                log.info("head v%s is live (was v%s)", new.version, old.version)
            return new

    def changed_on_disk(self) -> bool:
        return manifest_stamp(self.path) != self.loaded.stamp

    def _watch(self, every: float) -> None:
        while not self._stop.wait(every):
            if self.changed_on_disk():
                try:
                    self.reload()
                except EdgetlError as exc:  # a writer mid-switch or a damaged bundle: keep serving
                    log.warning(
                        "bundle changed on disk but cannot be loaded (%s); still serving v%s", exc, self.loaded.version
                    )

    # ---- answering --------------------------------------------------------------------------
    def submit(self, items: list, *, top_k: int = 1, raw_maps: bool = False) -> concurrent.futures.Future:
        """Queue ``items`` (image bytes, or texts for a text bundle) for one answer each.

        The future's result is ``(version, [Answer | DataError per item])``.

        Raises:
            Busy: the queue is full.
        """
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self._queue.put_nowait(_Job(list(items), max(1, int(top_k)), bool(raw_maps), fut))
        except queue.Full:
            raise Busy(f"{self._queue.maxsize} requests are already waiting; retry in a moment") from None
        return fut

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch, n = [job], len(job.items)
            deadline = time.perf_counter() + self.batch_wait
            while n < self.max_batch:
                try:
                    left = deadline - time.perf_counter()
                    nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
                n += len(nxt.items)
            loaded = self.loaded  # this batch's version, whatever a reload does meanwhile
            items = [i for j in batch for i in j.items]
            top_k = max(j.top_k for j in batch)
            try:
                answers = self.answer(loaded, items, top_k=top_k, raw_maps=any(j.raw_maps for j in batch))
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
                for j in batch:
                    j.future.set_exception(exc)
                continue
            if self._on_batch is not None:
                self._on_batch(len(items))
            start = 0
            for j in batch:
                part = answers[start : start + len(j.items)]
                start += len(j.items)
                if j.top_k < top_k:
                    for a in part:
                        if isinstance(a, Answer) and "top_k" in a.result:
                            a.result["top_k"] = a.result["top_k"][: j.top_k]
                j.future.set_result((loaded.version, part))

    def answer(self, loaded: Loaded, items: list, *, top_k: int = 1, raw_maps: bool = False) -> list:
        """Answers for ``items`` with one predictor, in order (a :class:`DataError` for an
        unreadable one, the others still answered)."""
        p, task = loaded.predictor, loaded.task_obj
        if task.reads_texts:
            return [Answer(_strip(pr.to_dict(), task.item_key)) for pr in p.predict(items, top_k=top_k)]
        paths = []
        tag = secrets.token_hex(6)
        try:
            for k, data in enumerate(items):
                path = self._tmp / f"{tag}-{k}"
                path.write_bytes(data)
                paths.append(path)
            if task.one_class:
                return self._defects(p, paths, raw_maps)
            skipped: list = []
            found = {pr.item: pr for pr in p.predict(paths, top_k=top_k, skipped=skipped)}
            why = {str(path): reason for path, reason in skipped}
            return [
                Answer(_strip(found[str(path)].to_dict(), task.item_key))
                if str(path) in found
                else DataError(f"upload: {why.get(str(path), 'not a readable image')}")
                for path in paths
            ]
        finally:
            for path in paths:
                path.unlink(missing_ok=True)

    def _defects(self, p, paths: list[Path], raw_maps: bool) -> list:
        try:
            maps, scores = p.maps(paths)
            per = list(zip(maps, scores))
        except DataError:  # one bad image: answer the others one by one
            per = []
            for path in paths:
                try:
                    m, s = p.maps([path])
                    per.append((m[0], s[0]))
                except DataError as exc:
                    per.append(DataError(f"upload: {str(exc).split(': ', 1)[-1]}"))
        thr = float(p.threshold)
        # 1.0 on the drawn map is the threshold; a combined head's map is only its patch part.
        cut = getattr(p.head, "map_cut", lambda t: t)(thr)
        out: list = []
        for x in per:
            if isinstance(x, DataError):
                out.append(x)
                continue
            m, s = np.asarray(x[0], np.float32), float(x[1])
            peak = np.unravel_index(int(np.argmax(m)), m.shape)
            verdict = "defect" if s >= thr else "good"
            norm = m / cut
            u8 = np.round(np.clip(norm / MAP_RANGE, 0, 1) * 255).astype(np.uint8)
            out.append(
                Answer(
                    {
                        "label": verdict,
                        "verdict": verdict,
                        "score": round(s, 6),
                        "threshold": round(thr, 6),
                        "normalised": round(s / thr, 6),
                        "peak": [int(peak[0]), int(peak[1])],
                    },
                    u8,
                    m if raw_maps else None,
                )
            )
        return out


def _strip(d: dict, key: str) -> dict:
    d.pop(key, None)
    return d
