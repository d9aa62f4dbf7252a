"""What a bundle's manifest may say, checked before anything acts on it.

A manifest comes from a file anyone may have edited, so every field a device acts on is checked
here with a one-line error that names the field: types, ranges, and every path. A range comes from
what the value *does*, not from its type: a crop fraction sets how large an image is resized before
the centre crop (``input_size / crop_pct`` on the short side), so a crop of 0.001 inside (0, 1]
would resize to 224,000 pixels; it is bounded so the resized image holds at most
:data:`MAX_RESIZE_FACTOR` times the input's pixels. Mean and std are pixel statistics on a 0..1
scale, so values far outside it only turn answers into NaN or noise. The input size itself is
checked against the model's own input when the model is opened
(:func:`edgetl.core.sessions.bundle_session`), and the task against the bundle's contents
(:func:`edgetl.tasks.for_bundle`). Paths are *confined*: relative,
normalised (no ``..``, no ``.``, no empty or absolute parts), inside the bundle, listed in the
manifest's ``files`` with their sha256, and on disk a regular file reached through no symlink.
JSON read from a bundle is size-limited and its nesting depth bounded before it is parsed.

numpy-free and torch-free: this runs on the device before every load.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path, PurePosixPath

from ..errors import BundleError
from .backbone import TEXT
from .preprocess import (
    INPUT_SIZE_RANGE,
    INTERPOLATIONS,
    MAX_RESIZE_FACTOR,
    MEAN_RANGE,
    MIN_CROP_PCT,
    STD_RANGE,
)

MAX_MANIFEST_BYTES = 8 << 20  # a manifest of thousands of head versions is still far below this
MAX_JSON_BYTES = 64 << 20  # report.json and other JSON a bundle carries
MAX_JSON_DEPTH = 64
MAX_PATH_CHARS = 512
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _depth_ok(text: str, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON text nests no deeper than :data:`MAX_JSON_DEPTH` (counted outside strings), so
    ``json.loads`` cannot hit Python's recursion limit on a hostile file."""
    depth, in_str, escape = 0, False, False
    for ch in text:
        if in_str:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def loads_bounded(text: str | bytes, *, max_depth: int = MAX_JSON_DEPTH):
    """``json.loads`` for text from outside (a bundle, a request body) after checking it nests no
    deeper than ``max_depth``: a body of 100,000 ``[`` then fails in one line, not with
    ``RecursionError`` (which ``json`` raises past Python's recursion limit).

    Raises:
        ValueError: not UTF-8, not JSON, or nested too deep (the message says which).
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("not UTF-8 text") from None
    if not _depth_ok(text, max_depth):
        raise ValueError(f"nests deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise ValueError(f"nests deeper than {max_depth} levels") from None


def read_json(path: Path, *, limit: int = MAX_JSON_BYTES, what: str = "JSON file"):
    """Parse a JSON file from a bundle: a regular file (no symlink), at most ``limit`` bytes, at
    most :data:`MAX_JSON_DEPTH` deep.

    Raises:
        BundleError: anything else, in one line.
    """
    try:
        # O_NONBLOCK: opening a FIFO planted as the manifest must not wait for a writer forever
        # (it is refused below as not a regular file).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise BundleError(f"{path}: missing {what}") from None
    except OSError as exc:
        reason = "is a symlink" if exc.errno == 40 else (exc.strerror or str(exc))
        raise BundleError(f"{path}: cannot read the {what} ({reason})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{path}: the {what} is not a regular file")
        if st.st_size > limit:
            raise BundleError(f"{path}: the {what} is {st.st_size} bytes, over the {limit}-byte limit")
        raw = f.read(limit + 1)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{path}: the {what} is not UTF-8 text; the bundle is damaged, copy it again") from None
    if not _depth_ok(text):
        raise BundleError(f"{path}: the {what} nests deeper than {MAX_JSON_DEPTH} levels; not an edgetl file")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BundleError(f"{path}: unreadable {what} ({str(exc).splitlines()[0]}); the bundle is damaged") from None


def safe_relpath(rel, field: str) -> str:
    """``rel`` if it is a normalised relative POSIX path inside a bundle, else a BundleError."""
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"manifest: {field} must be a file name inside the bundle, got {rel!r}")
    if len(rel) > MAX_PATH_CHARS or "\x00" in rel or "\\" in rel or any(ord(c) < 32 for c in rel):
        raise BundleError(f"manifest: {field} {rel[:80]!r} is not a plain file name")
    p = PurePosixPath(rel)
    if p.is_absolute() or rel.startswith("/") or any(part in ("", ".", "..") for part in rel.split("/")):
        raise BundleError(f"manifest: {field} {rel!r} points outside the bundle; paths must be relative, without '..'")
    if p.name == "manifest.json" or any(part.startswith(".") for part in p.parts):
        raise BundleError(f"manifest: {field} {rel!r} names a file edgetl never lists")
    return rel


def regular_file(root: Path, rel: str) -> Path:
    """The path of ``rel`` inside ``root`` after checking that no component is a symlink and the
    file is a regular file (not a device, FIFO or directory).

    Raises:
        BundleError: a symlink, a non-regular file, or a missing one.
    """
    cur = Path(root)
    parts = rel.split("/")
    for i, part in enumerate(parts):
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            raise BundleError(f"{cur}: missing from the bundle; copy the whole bundle directory again") from None
        if stat.S_ISLNK(st.st_mode):
            raise BundleError(f"{cur}: is a symlink; a bundle's files must be regular files inside it")
        last = i == len(parts) - 1
        if last and not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{cur}: is not a regular file")
        if not last and not stat.S_ISDIR(st.st_mode):
            raise BundleError(f"{cur}: is not a folder")
    return cur


# --------------------------------------------------------------------------------- the schema
def _get(d: dict, key: str, types, where: str, *, required: bool = True):
    if key not in d:
        if required:
            raise BundleError(f"manifest: {where}{key} is missing")
        return None
    v = d[key]
    ok = isinstance(v, types) and not (
        isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,))
    )
    if not ok:
        names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise BundleError(f"manifest: {where}{key} should be {names}, got {type(v).__name__}")
    return v


def _number(d: dict, key: str, where: str, *, lo: float, hi: float, required: bool = True, integer: bool = False):
    v = _get(d, key, int if integer else (int, float), where, required=required)
    if v is None:
        return None
    if not (math.isfinite(float(v)) and lo <= v <= hi):
        raise BundleError(f"manifest: {where}{key} = {v!r} is outside [{lo:g}, {hi:g}]")
    return v


def _strings(v, field: str, *, max_items: int = 100_000, unique: bool = False) -> list[str]:
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) and x for x in v) or len(v) > max_items:
        raise BundleError(f"manifest: {field} should be a list of non-empty strings")
    if unique and len(set(v)) != len(v):
        raise BundleError(f"manifest: {field} lists a name twice")
    return list(v)


def _preprocess(pre: dict) -> None:
    where = "backbone.preprocess."
    if pre.get("kind") == TEXT:
        _number(pre, "max_length", where, lo=1, hi=65536, integer=True)
        return
    _number(pre, "input_size", where, lo=INPUT_SIZE_RANGE[0], hi=INPUT_SIZE_RANGE[1], integer=True)
    crop = _number(pre, "crop_pct", where, lo=0.0, hi=1.0)
    if crop < MIN_CROP_PCT:
        factor = 1 / crop**2 if crop > 0 else math.inf
        raise BundleError(
            f"manifest: {where}crop_pct = {crop!r} would resize an image to "
            f"{factor:.3g} times the model input's pixels before cropping; it must be at "
            f"least {MIN_CROP_PCT:g} (at most {MAX_RESIZE_FACTOR:g} times)"
        )
    interp = _get(pre, "interpolation", str, where)
    if interp not in INTERPOLATIONS:
        raise BundleError(f"manifest: {where}interpolation {interp!r} is not one of {', '.join(INTERPOLATIONS)}")
    for key in ("mean", "std"):
        v = _get(pre, key, (list, tuple), where)
        if len(v) != 3 or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v
        ):
            raise BundleError(f"manifest: {where}{key} should be 3 finite numbers")
        lo, hi = MEAN_RANGE if key == "mean" else STD_RANGE
        if not all(lo <= x <= hi for x in v):
            raise BundleError(
                f"manifest: {where}{key} = {list(v)!r} is not a pixel statistic on the 0..1 scale "
                f"(each in [{lo:g}, {hi:g}])"
            )
    if pre.get("roi") is not None:
        _roi(pre["roi"], where + "roi")


def _roi(roi, where: str) -> None:
    """A region of interest as :class:`edgetl.core.preprocess.Roi` stores it (checked here without
    numpy): four finite numbers, inside the frame when fractions, whole pixels otherwise."""
    if (
        not isinstance(roi, dict)
        or set(roi) - {"x", "y", "w", "h", "unit"}
        or roi.get("unit", "px") not in ("px", "fraction")
    ):
        raise BundleError(f"manifest: {where} should be {{x, y, w, h, unit: px | fraction}}")
    raw = [roi.get(k) for k in ("x", "y", "w", "h")]
    vals = [float(v) for v in raw if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise BundleError(f"manifest: {where} should hold four finite numbers x, y, w, h")
    x, y, w, h = vals
    frac = roi.get("unit") == "fraction"
    if (
        min(x, y) < 0
        or min(w, h) <= 0
        or (frac and (x + w > 1 + 1e-9 or y + h > 1 + 1e-9))
        or (not frac and (not all(float(v).is_integer() for v in vals) or max(x + w, y + h) > 1_000_000))
    ):
        raise BundleError(
            f"manifest: {where} {vals} is not a region of a frame (x, y >= 0, w, h > 0; fractions "
            "within 0..1, or whole pixels)"
        )


def validate(m: dict, *, where: str = "") -> None:
    """Check every field a device acts on; one :class:`BundleError` line for the first bad one.

    Raises:
        BundleError: a missing, mistyped or out-of-range field, or an unconfined path.
    """
    try:
        _validate(m)
    except BundleError as exc:
        raise BundleError(f"{where}: {exc}" if where else str(exc)) from None


def _validate(m: dict) -> None:
    _get(m, "task", str, "", required=False)  # which tasks exist is the task registry's business
    _strings(_get(m, "labels", (list, tuple), ""), "labels", unique=True)
    _get(m, "precision", str, "")
    _get(m, "runtime", str, "")
    backbone = _get(m, "backbone", dict, "")
    _get(backbone, "name", str, "backbone.")
    _preprocess(_get(backbone, "preprocess", dict, "backbone."))
    if "feature_shape" in backbone:  # a patch-feature backbone's (C, H, W)
        shape = _get(backbone, "feature_shape", (list, tuple), "backbone.")
        if len(shape) != 3 or not all(
            isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 100_000 for x in shape
        ):
            raise BundleError("manifest: backbone.feature_shape should be 3 positive integers")
    target = _get(m, "target", dict, "")
    _get(target, "name", str, "target.")
    if "providers" in target:
        _strings(target["providers"], "target.providers")
    for key in ("device", "fit_features", "float_precision"):
        _get(target, key, str, "target.", required=False)
    files = _get(m, "files", dict, "")
    if not files:
        raise BundleError("manifest: lists no files; the bundle is damaged")
    for rel, entry in files.items():
        safe_relpath(rel, "files entry")
        if not isinstance(entry, dict):
            raise BundleError(f"manifest: files[{rel!r}] should be an object with sha256 and bytes")
        digest = _get(entry, "sha256", str, f"files[{rel!r}].")
        if not _HEX64.fullmatch(digest):
            raise BundleError(f"manifest: files[{rel!r}].sha256 is not a sha256 hex digest")
        _number(entry, "bytes", f"files[{rel!r}].", lo=0, hi=1 << 40, integer=True)

    def listed(rel, field: str) -> None:
        safe_relpath(rel, field)
        if rel not in files:
            raise BundleError(f"manifest: {field} {rel!r} is not among the hashed files")

    models = _get(m, "models", dict, "")
    for role, rel in models.items():
        listed(rel, f"models.{role}")
    if "backbone" not in models:
        raise BundleError("manifest: models.backbone is missing")
    head = _get(m, "head", dict, "")
    current = _get(head, "current", int, "head.")
    versions = _get(head, "versions", (list, tuple), "head.")
    seen = set()
    for i, e in enumerate(versions):
        w = f"head.versions[{i}]."
        if not isinstance(e, dict):
            raise BundleError(f"manifest: head.versions[{i}] should be an object")
        v = _number(e, "version", w, lo=1, hi=1e9, integer=True)
        if v in seen:
            raise BundleError(f"manifest: head version {v} is listed twice")
        seen.add(v)
        listed(_get(e, "file", str, w), f"{w}file")
        for key in ("exemplars", "fused", "drift"):
            if e.get(key) is not None:
                listed(_get(e, key, str, w), f"{w}{key}")
        _strings(_get(e, "labels", (list, tuple), w), f"{w}labels", unique=True)
        _number(e, "unknown_threshold", w, lo=0.0, hi=1.0, required=False)
        _number(e, "threshold", w, lo=1e-12, hi=1e30, required=False)
    if current not in seen:
        raise BundleError(f"manifest: head.current = {current} is not one of the listed versions")
    thresholds = _get(m, "thresholds", dict, "", required=False) or {}
    for key, value in thresholds.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise BundleError(f"manifest: thresholds.{key} should be a finite number")
    state = _get(m, "state", dict, "", required=False)
    if state is not None:
        serial = _number(state, "serial", "state.", lo=0, hi=1 << 62, integer=True)
        _number(state, "selection_serial", "state.", lo=0, hi=serial, integer=True)
    ex = _get(m, "exemplars", dict, "", required=False)
    if ex and ex.get("file") is not None and ex["file"] in files:
        listed(ex["file"], "exemplars.file")
