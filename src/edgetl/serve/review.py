"""The review store: items a person confirmed or corrected, kept in a folder the operator chose,
until an update learns from them.

::

    DIR/review.json          what this folder is (format, task), written once
    DIR/.lock                held by the one ``edgetl serve`` that uses the folder
    DIR/items/<id>.<ext>     the image as it was uploaded (or the text, as .txt)
    DIR/items/<id>.json      its label, the prediction it corrects, and the update that used it
    DIR/adapt-<time>.csv     what one update was given (path,label or text,label), kept as a record

Crash-safe: each file is written to a temporary name, flushed and renamed (one atomic step), the
data file before its record, so a power cut leaves an item whole or absent; a data file without
its record (cut between the two) and temporary files are removed when the store opens.

Bounded: at most ``max_items`` items and ``max_bytes`` bytes. When full, the oldest items that an
update already learned from make room; a store full of items no update has used yet refuses
more (:class:`StoreFull`), since those labels are a person's work that nothing has kept yet.

Names in this folder are made here (a random id and a suffix from the image's own format): no
string from a request ever becomes a path.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

from .. import tasks
from ..core.bundle import fsync_dir, write_file_durably
from ..errors import ConfigError, DataError, EdgetlError

FORMAT = "edgetl-review"
FORMAT_VERSION = 1
ID = re.compile(r"[0-9a-f]{16}")
# Pillow's format name -> the suffix the image readers accept (others are stored as PNG).
SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}
MAX_LABEL = 64
KEEP_RECORDS = 20


class StoreFull(EdgetlError):
    """The review store is full of items no update has learned from yet."""


def check_label(label) -> str:
    """A class name as a person may give it: 1..64 printable characters, no surrounding spaces.

    Raises:
        DataError: anything else (the message says what was received).
    """
    if (
        not isinstance(label, str)
        or not label
        or len(label) > MAX_LABEL
        or label != label.strip()
        or not label.isprintable()
    ):
        raise DataError(
            f"label {str(label)[:80]!r}: give a class name of 1 to {MAX_LABEL} printable characters "
            "without surrounding spaces"
        )
    if label == "unknown":
        raise DataError(
            "label 'unknown' is the answer for inputs under the confidence threshold; give the class the item really is"
        )
    return label


class ReviewStore:
    """Confirmed items in ``root`` (see the module docstring).

    Raises (on open):
        ConfigError: ``root`` is a non-empty folder that is not a review store, one made for
            another task, or one another ``edgetl serve`` holds.
    """

    def __init__(self, root: str | Path, *, task: str, max_items: int = 5000, max_bytes: int = 1 << 30):
        self.root = Path(root)
        self.task = task
        self.max_items, self.max_bytes = int(max_items), int(max_bytes)
        self.items_dir = self.root / "items"
        self._lock = threading.Lock()
        self._claim()
        self.index: dict[str, dict] = {}
        self.recovered = self._recover()

    # ---- opening ----------------------------------------------------------------------------
    def _claim(self) -> None:
        import fcntl

        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--review {self.root}: cannot create the folder ({exc.strerror})") from None
        marker = self.root / "review.json"
        if marker.is_file():
            try:
                info = json.loads(marker.read_text())
            except (OSError, ValueError):
                info = {}
            if info.get("format") != FORMAT:
                raise ConfigError(f"--review {self.root}: review.json there is not an edgetl review store's")
            if info.get("task") != self.task:
                raise ConfigError(
                    f"--review {self.root}: this review store holds {info.get('task')} items, the "
                    f"bundle is a {self.task} bundle; give another folder"
                )
        elif any(p.name not in (".lock",) for p in self.root.iterdir()):
            raise ConfigError(
                f"--review {self.root}: a non-empty folder that is not an edgetl review store; give "
                "an empty or new folder"
            )
        self._fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(
                    f"--review {self.root}: another edgetl serve uses this review store; give each "
                    "service its own folder"
                ) from None
            raise ConfigError(f"--review {self.root}: cannot lock the folder ({exc.strerror})") from None
        if not marker.is_file():
            write_file_durably(
                marker,
                json.dumps(
                    {"format": FORMAT, "format_version": FORMAT_VERSION, "task": self.task, "created": _now()}, indent=2
                ).encode(),
            )
        self.items_dir.mkdir(exist_ok=True)

    def _recover(self) -> dict:
        """Load the records; remove what a crash left half-written. -> counts of what was removed."""
        removed = {"temporary": 0, "orphans": 0, "bad_records": 0}
        names = {p.name for p in self.items_dir.iterdir()}
        for name in sorted(names):
            p = self.items_dir / name
            if name.startswith(".") and name.endswith(".tmp"):
                p.unlink(missing_ok=True)
                removed["temporary"] += 1
            elif name.endswith(".json"):
                try:
                    meta = json.loads(p.read_text())
                    ok = (
                        ID.fullmatch(meta.get("id", ""))
                        and name == f"{meta['id']}.json"
                        and (self.items_dir / meta["file"]).is_file()
                        and (self.items_dir / meta["file"]).stat().st_size == meta["bytes"]
                    )
                except (OSError, ValueError, KeyError, TypeError):
                    ok = False
                if ok:
                    self.index[meta["id"]] = meta
                else:
                    p.unlink(missing_ok=True)
                    removed["bad_records"] += 1
        kept = {m["file"] for m in self.index.values()}
        for name in names:
            if not name.endswith(".json") and not name.startswith(".") and name not in kept:
                (self.items_dir / name).unlink(missing_ok=True)
                removed["orphans"] += 1
        return removed

    def close(self) -> None:
        """Release the folder (a second call does nothing: the descriptor number may already
        belong to another file of this process)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    # ---- reading ----------------------------------------------------------------------------
    @property
    def bytes(self) -> int:
        return sum(m["bytes"] for m in self.index.values())

    def get(self, item_id: str) -> dict | None:
        return self.index.get(item_id) if isinstance(item_id, str) and ID.fullmatch(item_id) else None

    def payload(self, item_id: str) -> bytes | None:
        meta = self.get(item_id)
        if meta is None:
            return None
        try:
            return (self.items_dir / meta["file"]).read_bytes()
        except OSError:
            return None

    @staticmethod
    def pending_in(meta: dict, version: int) -> bool:
        """Not yet learned by the current head: never used, or used by a version that a rollback
        undid (a later version number than the current one)."""
        used = meta.get("adapted_in")
        return used is None or used > version

    def listing(self, version: int, *, limit: int = 60) -> list[dict]:
        rows = sorted(self.index.values(), key=lambda m: m["created"], reverse=True)
        return [{**m, "pending": self.pending_in(m, version)} for m in rows[:limit]]

    def summary(self, version: int) -> dict:
        pending: dict[str, int] = {}
        for m in self.index.values():
            if self.pending_in(m, version):
                pending[m["label"]] = pending.get(m["label"], 0) + 1
        return {
            "items": len(self.index),
            "bytes": self.bytes,
            "max_items": self.max_items,
            "max_bytes": self.max_bytes,
            "pending": dict(sorted(pending.items())),
            "pending_total": sum(pending.values()),
            "used": len(self.index) - sum(pending.values()),
        }

    # ---- writing ----------------------------------------------------------------------------
    def put(
        self,
        item_id: str,
        payload: bytes | str,
        *,
        label: str,
        suffix: str,
        info: dict,
        version: int,
        current: int | None = None,
    ) -> dict:
        """Store an item with its label, or relabel it when ``item_id`` is already here.

        ``version`` is the head version that answered the item; ``current`` the one live now
        (default: the same), which decides what an update already learned (what may make room).

        Raises:
            StoreFull: no room without dropping an item no update has learned from.
            BundleError-like OSError: the disk refused the write (nothing half-written stays).
        """
        if not ID.fullmatch(item_id):
            raise DataError(f"id {item_id[:40]!r}: not a prediction id")
        with self._lock:
            old = self.index.get(item_id)
            if old is not None:
                meta = {**old, "label": label, "labelled": _now(), "adapted_in": None}
                write_file_durably(self.items_dir / f"{item_id}.json", json.dumps(meta).encode())
                self.index[item_id] = meta
                return meta
            data = payload.encode("utf-8") if isinstance(payload, str) else payload
            self._make_room(len(data), version if current is None else current)
            name = f"{item_id}{suffix}"
            meta = {
                "id": item_id,
                "file": name,
                "bytes": len(data),
                "label": label,
                "created": _now(),
                "labelled": _now(),
                "head_version": version,
                "adapted_in": None,
                **info,
            }
            write_file_durably(self.items_dir / name, data)
            try:
                write_file_durably(self.items_dir / f"{item_id}.json", json.dumps(meta).encode())
            except BaseException:
                (self.items_dir / name).unlink(missing_ok=True)
                raise
            self.index[item_id] = meta
            return meta

    def _make_room(self, size: int, version: int) -> None:
        if size > self.max_bytes:
            raise StoreFull(f"an item of {size} bytes is larger than the review store's limit of {self.max_bytes}")
        used = sorted((m for m in self.index.values() if not self.pending_in(m, version)), key=lambda m: m["created"])
        total = self.bytes
        while used and (len(self.index) + 1 > self.max_items or total + size > self.max_bytes):
            victim = used.pop(0)
            total -= victim["bytes"]
            self._drop(victim["id"])
        if len(self.index) + 1 > self.max_items or total + size > self.max_bytes:
            raise StoreFull(
                f"the review store {self.root} is full ({len(self.index)} items, {total / 1e6:.1f} MB) of "
                "items no update has learned from; run an update (adapt) or remove items"
            )

    def _drop(self, item_id: str) -> None:
        meta = self.index.pop(item_id)
        # the record first: a crash in between leaves an orphan data file, removed on the next open
        (self.items_dir / f"{item_id}.json").unlink(missing_ok=True)
        (self.items_dir / meta["file"]).unlink(missing_ok=True)
        fsync_dir(self.items_dir)

    def remove(self, item_id: str) -> bool:
        with self._lock:
            if self.get(item_id) is None:
                return False
            self._drop(item_id)
            return True

    # ---- what an update learns from ---------------------------------------------------------
    def adapt_input(self, version: int) -> tuple[Path, list[str], Path | None]:
        """Write what ``edgetl.adapt`` reads for the pending items: (data, their ids, a folder
        to remove afterwards or None).

        Classification: a ``path,label`` CSV manifest beside ``items/``; text: a ``text,label``
        CSV; defects: a folder ``good/`` of links to the items confirmed good (an update of a
        defect detector learns from good images only).

        Raises:
            DataError: nothing pending that an update can learn from.
        """
        with self._lock:
            rows = sorted((m for m in self.index.values() if self.pending_in(m, version)), key=lambda m: m["created"])
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{time.time_ns() % 1_000_000:06d}"
            task = tasks.get(self.task)
            if task.one_class:
                rows = [m for m in rows if m["label"] == "good"]
                if not rows:
                    raise DataError(
                        "no confirmed good images waiting: a defect detector learns from good images; "
                        "mark some predictions good first"
                    )
                folder = self.root / f"adapt-{stamp}"
                (folder / "good").mkdir(parents=True)
                for m in rows:
                    _link(self.items_dir / m["file"], folder / "good" / m["file"])
                return folder, [m["id"] for m in rows], folder
            if not rows:
                raise DataError("no confirmed or corrected items waiting for an update; confirm some predictions first")
            out = io.StringIO()
            w = csv.writer(out)
            if task.reads_texts:
                w.writerow(["text", "label"])
                for m in rows:
                    w.writerow([(self.items_dir / m["file"]).read_text(encoding="utf-8"), m["label"]])
            else:
                w.writerow(["path", "label"])
                for m in rows:
                    w.writerow([f"items/{m['file']}", m["label"]])
            path = self.root / f"adapt-{stamp}.csv"
            write_file_durably(path, out.getvalue().encode("utf-8"))
            self._prune_records()
            return path, [m["id"] for m in rows], None

    def _prune_records(self) -> None:
        records = sorted(self.root.glob("adapt-*.csv"))
        for old in records[:-KEEP_RECORDS]:
            old.unlink(missing_ok=True)

    def mark_used(self, ids: list[str], version: int) -> None:
        with self._lock:
            for item_id in ids:
                meta = self.index.get(item_id)
                if meta is None:
                    continue
                meta = {**meta, "adapted_in": int(version)}
                write_file_durably(self.items_dir / f"{item_id}.json", json.dumps(meta).encode())
                self.index[item_id] = meta


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copyfile(src, dst)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{time.time_ns() // 1000 % 1_000_000:06d}Z"
