"""Labelled text from CSV, TSV or JSON Lines files: find the columns, check every row, split.

A text dataset is one file with a text column and a label column, and optionally a ``split``
column (``train`` / ``val``). Column names are matched case-insensitively against common names
(:data:`TEXT_COLUMNS`, :data:`LABEL_COLUMNS`) unless given explicitly. Rows are checked the way
:mod:`edgetl.data` checks images: a row with empty text, a missing label, or a line that does not
parse is skipped and reported by file and line number (``--strict`` makes it fatal).

No torch, no tokenizer here: this module is on the device path (``eval`` and ``adapt``).

Example:
    >>> ds = load_text_dataset("tickets.csv", val_split=0.2, seed=0)  # doctest: +SKIP
    >>> ds.classes, len(ds.train), len(ds.val), len(ds.skipped)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ...errors import DataError
from ..classify.data import Dataset, stratified_split

TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")
# Checked in this order; the first column whose name matches is used.
TEXT_COLUMNS = ("text", "sentence", "content", "message", "description", "body", "utterance", "ticket")
LABEL_COLUMNS = ("label", "class", "category", "intent", "target", "tag")
_VAL_NAMES = ("val", "valid", "validation", "test")  # a test split is a holdout like val


def text_digest(text: str) -> str:
    """sha256 of the UTF-8 text: the feature cache's key for one row."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TextSample:
    """One labelled text; ``where`` is ``file:line`` for messages."""

    text: str
    label: str
    digest: str
    where: str

    @property
    def path(self) -> str:
        # data.stratified_split orders ties by ``path``; for a row that is its location.
        return self.where


def _pick(header: list[str], wanted: str | None, names: tuple[str, ...], role: str, where: Path) -> str:
    lowered = {h.strip().lower(): h for h in header}
    if wanted is not None:
        if wanted.lower() not in lowered:
            raise DataError(f"{where}: no {role} column {wanted!r}; columns are: {', '.join(header)}")
        return lowered[wanted.lower()]
    for name in names:
        if name in lowered:
            return lowered[name]
    raise DataError(
        f"{where}: no {role} column found among {', '.join(header) or '(none)'}; name it one of "
        f"{', '.join(names)} or pass --{role}-column"
    )


def is_text_data(path: str | Path) -> bool:
    """True when ``path`` is a CSV/TSV/JSONL file whose first record names a text column.

    A CSV image manifest (``path,label``) is not text data. Used by the CLI to route ``fit`` and
    ``eval``; reads only the first line.
    """
    p = Path(path)
    if not p.is_file() or p.suffix.lower() not in TEXT_SUFFIXES:
        return False
    try:
        with open(p, encoding="utf-8-sig", errors="replace") as f:
            first = f.readline()
    except OSError:
        return False
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        try:
            keys = list(json.loads(first))
        except (ValueError, TypeError):
            return False
    else:
        keys = next(csv.reader([first], delimiter="\t" if p.suffix.lower() == ".tsv" else ","), [])
    keys = [str(k).strip().lower() for k in keys]
    return any(k in TEXT_COLUMNS for k in keys) and "path" not in keys


def _records(path: Path):
    """Yield (line number, dict or None, error) for every non-blank record of the file."""
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the text file ({exc})") from None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                yield lineno, None, f"not valid JSON ({getattr(exc, 'msg', exc)})"
                continue
            if not isinstance(rec, dict):
                yield lineno, None, f"expected a JSON object, got {type(rec).__name__}"
                continue
            yield lineno, rec, None
        return
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(raw, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise DataError(f"{path}:1: unreadable header ({exc})") from None
    yield 1, {"__header__": header}, None
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield start, None, f"malformed row ({exc})"
            start = reader.line_num + 1
            continue
        lineno, start = start, reader.line_num + 1
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) > len(header):
            yield lineno, None, f"{len(row)} fields but the header has {len(header)} (unquoted delimiter in the text?)"
            continue
        yield lineno, dict(zip(header, row)), None


def scan_texts(
    path: str | Path,
    *,
    strict: bool = False,
    text_column: str | None = None,
    label_column: str | None = None,
    require_label: bool = True,
) -> tuple[list[TextSample], list[TextSample] | None, list[tuple[str, str]], dict]:
    """Read and check every row of a text dataset file.

    Args:
        path: a ``.csv``, ``.tsv`` or ``.jsonl`` file.
        strict: raise on the first bad row instead of skipping it.
        text_column: name of the text column (default: the first of :data:`TEXT_COLUMNS`).
        label_column: name of the label column (default: the first of :data:`LABEL_COLUMNS`).
        require_label: False to read unlabelled text (labels come back as ``""``).

    Returns:
        (train rows, validation rows or None when there is no ``split`` column,
        skipped ``[(file:line, reason)]``, ``{"text": column, "label": column}``).

    Raises:
        DataError: the file is missing, unreadable, has no usable columns, or (``strict``) a bad row.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected a .csv, .tsv or .jsonl file with text and label columns")
    if path.suffix.lower() not in TEXT_SUFFIXES:
        raise DataError(f"{path}: expected a {', '.join(TEXT_SUFFIXES)} file with text and label columns")
    train: list[TextSample] = []
    val: list[TextSample] = []
    skipped: list[tuple[str, str]] = []
    cols: dict = {}
    has_split = False

    def bad(lineno: int, reason: str) -> None:
        where = f"{path}:{lineno}"
        if strict:
            raise DataError(f"{where}: {reason} (--strict makes bad rows fatal)")
        skipped.append((where, reason))

    for lineno, rec, error in _records(path):
        if error is not None:
            bad(lineno, error)
            continue
        if "__header__" in rec or not cols:
            keys = rec["__header__"] if "__header__" in rec else list(rec)
            cols = {"text": _pick(keys, text_column, TEXT_COLUMNS, "text", path)}
            try:
                cols["label"] = _pick(keys, label_column, LABEL_COLUMNS, "label", path)
            except DataError:
                if require_label:
                    raise
                cols["label"] = None
            cols["split"] = next((k for k in keys if k.strip().lower() == "split"), None)
            has_split = has_split or cols["split"] is not None
            if "__header__" in rec:
                continue
        text = rec.get(cols["text"])
        text = "" if text is None else str(text)
        label = rec.get(cols["label"]) if cols["label"] else ""
        label = "" if label is None else str(label).strip()
        if not text.strip():
            bad(lineno, "empty text")
            continue
        if require_label and not label:
            bad(lineno, f"missing label (column {cols['label']!r})")
            continue
        split = str(rec.get(cols["split"]) or "train").strip().lower() if cols.get("split") else "train"
        if split not in ("train", *_VAL_NAMES):
            bad(lineno, f"split {split!r} is not train, val or test")
            continue
        sample = TextSample(text, label, text_digest(text), f"{path}:{lineno}")
        (val if split in _VAL_NAMES else train).append(sample)
    return train, (val if has_split else None), skipped, cols


def load_text_dataset(
    path: str | Path,
    *,
    val: str | Path | None = None,
    val_split: float | None = 0.2,
    seed: int = 0,
    strict: bool = False,
    text_column: str | None = None,
    label_column: str | None = None,
) -> Dataset:
    """Find, check and split a labelled text dataset.

    Args:
        path: CSV / TSV / JSONL with text and label columns (and optionally ``split``).
        val: a separate validation file (overrides any ``split`` column).
        val_split: fraction held out per class when there is no validation set; None: none held
            out (``fit`` scores every row out of fold instead).
        seed: seeds the split.
        strict: make bad rows fatal instead of skipped.

    Raises:
        DataError: unreadable file, no usable rows, fewer than 2 classes, or a validation class
            with no training rows.
    """
    if val_split is not None and not 0.0 < val_split < 1.0:
        raise DataError(f"--val-split must be between 0 and 1, got {val_split}")
    path = Path(path)
    train, explicit_val, skipped, cols = scan_texts(
        path, strict=strict, text_column=text_column, label_column=label_column
    )
    if val is not None:
        vtrain, vval, vskipped, _ = scan_texts(val, strict=strict, text_column=text_column, label_column=label_column)
        explicit_val = vtrain + (vval or [])
        skipped += vskipped
    if not train:
        raise DataError(f"{path}: no usable labelled rows ({len(skipped)} skipped); expected text and label columns")
    classes = sorted({s.label for s in train})
    if len(classes) < 2:
        raise DataError(f"{path}: found {len(classes)} class ({', '.join(classes)}); classification needs at least 2")
    if explicit_val is not None:
        unknown = sorted({s.label for s in explicit_val} - set(classes))
        if unknown:
            raise DataError(
                f"{val or path}: validation class {unknown[0]!r} has no training rows; "
                "every validation class must also appear in training"
            )
        return Dataset(path, "text-split", classes, train, explicit_val, skipped, {"method": "explicit"}, cols)
    if val_split is None:
        return Dataset(path, "text", classes, train, [], skipped, {"method": "out-of-fold"}, cols)
    tr, va = stratified_split(train, fraction=val_split, seed=seed)
    return Dataset(path, "text", classes, tr, va, skipped, {"method": "stratified"}, cols)


def read_lines(path: str | Path) -> list[str]:
    """Non-blank lines of a plain text file (``predict --file``), one text per line."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]
