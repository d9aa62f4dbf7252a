"""Find labelled images on disk, check them, and split them.

Layouts understood (checked in this order):

* ``DATA/train/<class>/*`` + ``DATA/val/<class>/*`` — an explicit validation set;
* ``DATA/<class>/*`` — ImageFolder; a stratified, seeded split makes the validation set;
* ``DATA.csv`` or ``DATA/labels.csv`` — a manifest with ``path,label`` (and optionally ``split``
  and ``group``) columns, paths relative to the CSV's folder and never outside it.

Groups. Small datasets are rarely independent images: many frames of one part, one shift, one
camera. A random split puts near-copies of a validation image into training, and the validation
figure then measures memorisation. When images carry a group — ``DATA/<class>/<group>/*``, a
``group`` column, or ``group_by`` (a CSV column, ``folder``, or ``regex:PATTERN`` on the file name)
— the split keeps every group on one side (:func:`group_split`).

Every image is decoded once here, so a truncated or non-image file is found before any model runs.
Bad files are skipped and reported (``Dataset.skipped``) unless ``strict`` is set.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ...core.preprocess import decode
from ...errors import DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
# Holdout folders beside train/ (and split values of a CSV), in order of preference: a test/
# folder is a holdout like val/ (reported as such; nothing is chosen on it).
log = logging.getLogger("edgetl")

_VAL_DIRS = ("val", "valid", "validation", "test")


@dataclass(frozen=True)
class Sample:
    """One labelled image; ``digest`` is the sha256 of the file's bytes (the cache key's core);
    ``group`` what it belongs with (a part, a session), or "" for an image of its own."""

    path: Path
    label: str
    digest: str
    group: str = ""


@dataclass
class Dataset:
    """A checked labelled dataset (images, or texts): classes in a fixed (sorted) order, a train and
    a validation list."""

    root: Path
    layout: str
    classes: list[str]
    # Samples of the task's own kind: image Samples here, TextSamples for text data.
    train: list
    val: list
    skipped: list = field(default_factory=list)  # (path or row, reason)
    # How the validation set was made: "explicit", "stratified" or "grouped (<source>)", with
    # group counts and the classes left without validation images.
    split: dict = field(default_factory=dict)
    columns: dict = field(default_factory=dict)  # text data: the text and label columns used

    def counts(self) -> dict[str, dict[str, int]]:
        tr, va = Counter(s.label for s in self.train), Counter(s.label for s in self.val)
        return {c: {"train": tr[c], "val": va[c]} for c in self.classes}


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


class CheckedImages:
    """Content hashes of images that decoded fully before, kept in the cache as empty files
    (``root/checked/ab/<sha256>``). A file whose bytes hash to one of them is that same image, so
    a second ``fit`` on the same data hashes every file but decodes none."""

    def __init__(self, root: str | Path):
        self.dir = Path(root) / "checked"

    def _path(self, digest: str) -> Path:
        return self.dir / digest[:2] / digest

    def __contains__(self, digest: str) -> bool:
        return self._path(digest).exists()

    def add(self, digest: str) -> None:
        p = self._path(digest)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()


def check_image(path: Path, checked: CheckedImages | None = None) -> str:
    """Decode ``path`` fully (unless ``checked`` knows its content) and return the sha256 of its bytes.

    Raises:
        DataError: unreadable, truncated or not an image.
    """
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    digest = hashlib.sha256(blob).hexdigest()
    if checked is not None and digest in checked:
        return digest
    with decode(io.BytesIO(blob), path):
        pass
    if checked is not None:
        checked.add(digest)
    return digest


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files_under(folder: Path, broken: list | None = None) -> list[Path]:
    """Regular files below ``folder`` (links to files followed); links that lead nowhere or into a
    loop are collected in ``broken`` so they can be reported instead of silently dropped."""
    out = []
    for p in folder.rglob("*"):
        if p.name.startswith("."):
            continue
        if p.is_file():
            out.append(p)
        elif p.is_symlink() and not p.exists() and broken is not None:
            broken.append((p, "a symlink that leads nowhere (or into a loop)"))
    return sorted(out)


def _scan_folder(root: Path, broken: list) -> list[tuple[Path, str, str]]:
    """ImageFolder: (path, label, group) for every file below ``root/<class>/``; an image in a
    sub-folder ``root/<class>/<group>/...`` belongs to that group (named ``<class>/<group>``).
    Links that lead nowhere are added to ``broken``."""
    items = []
    for cdir in _class_dirs(root):
        for p in _files_under(cdir, broken):
            rel = p.relative_to(cdir).parts
            items.append((p, cdir.name, f"{cdir.name}/{rel[0]}" if len(rel) > 1 else ""))
    loose = [p for p in root.iterdir() if p.is_file() and is_image_name(p)]
    if loose and not items:
        raise DataError(
            f"{root}: images lie directly in the folder; put each class in its own sub-folder "
            f"({root}/<class>/image.jpg) or list them in a CSV with path,label columns"
        )
    return items


def _scan_csv(csv_path: Path, group_column: str | None = None):
    """CSV manifest -> (train items, val items or None when there is no split column); items are
    (path, label, group), the group from ``group_column`` (default: a ``group`` column if any)."""
    base = csv_path.parent.resolve()
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv_path}: cannot read the CSV manifest ({exc})") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise DataError(f"{csv_path}: the CSV manifest is empty; expected path,label rows")
    header = [h.strip().lower() for h in rows[0]]
    if "path" in header and "label" in header:
        ip, il = header.index("path"), header.index("label")
        isplit = header.index("split") if "split" in header else None
        rows = rows[1:]
    elif "path" in header or "label" in header:
        missing = "label" if "path" in header else "path"
        raise DataError(
            f"{csv_path}: the header has no {missing!r} column (columns: {', '.join(header)}); expected "
            "path,label[,split][,group]"
        )
    else:
        ip, il, isplit = 0, 1, None
        header = []
    wanted = (group_column or "group").strip().lower()
    igroup = header.index(wanted) if wanted in header else None
    if group_column and igroup is None:
        raise DataError(f"{csv_path}: no column {group_column!r} to group by; columns: {', '.join(header) or 'none'}")
    train: list[tuple[Path, str, str]] = []
    val: list[tuple[Path, str, str]] = []
    seen: dict[Path, tuple[int, str, str]] = {}
    for lineno, row in enumerate(rows, start=2 if header else 1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= max(ip, il):
            raise DataError(f"{csv_path}:{lineno}: expected path,label, got {row!r}")
        rel, label = row[ip].strip(), row[il].strip()
        if not label:
            raise DataError(f"{csv_path}:{lineno}: empty label for {rel!r}")
        path = (base / rel).resolve()
        if not path.is_relative_to(base):
            raise DataError(
                f"{csv_path}:{lineno}: {rel!r} points outside the CSV's folder {base}; "
                "keep images below the folder that holds the CSV"
            )
        split = row[isplit].strip().lower() if isplit is not None and len(row) > isplit else "train"
        if split not in ("train", *_VAL_DIRS):
            raise DataError(f"{csv_path}:{lineno}: split {split!r} is not train, val or test")
        group = row[igroup].strip() if igroup is not None and len(row) > igroup else ""
        side = "val" if split in _VAL_DIRS else "train"
        if path in seen:
            first, first_label, first_side = seen[path]
            what = (
                f"under two labels ({first_label!r} and {label!r})"
                if first_label != label
                else "in both train and val"
                if first_side != side
                else "twice"
            )
            raise DataError(
                f"{csv_path}:{lineno}: {rel!r} is listed {what} (first on line {first}); list each image once"
            )
        seen[path] = (lineno, label, side)
        (val if side == "val" else train).append((path, label, group))
    return train, (val if isplit is not None else None)


def _find_layout(root: Path, group_column: str | None = None, broken: list | None = None):
    """-> (layout name, train items, val items or None); broken links are added to ``broken``."""
    broken = [] if broken is None else broken
    if not root.exists():
        raise DataError(f"{root}: no such file or folder; give an image folder or a CSV manifest")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise DataError(f"{root}: expected a folder of class sub-folders or a .csv manifest")
        train, val = _scan_csv(root, group_column)
        return "csv", train, val
    subdirs = {p.name.lower(): p for p in _class_dirs(root)}
    val_dir = next((subdirs[n] for n in _VAL_DIRS if n in subdirs), None)
    if "train" in subdirs and val_dir is not None:
        others = sorted(n for n in _VAL_DIRS if n in subdirs and subdirs[n] != val_dir)
        if others:
            log.warning(
                "%s: %s/ is the holdout; %s left out (score it with: edgetl eval BUNDLE %s)",
                root,
                val_dir.name,
                ", ".join(f"{n}/" for n in others),
                subdirs[others[0]],
            )
        return "train+val", _scan_folder(subdirs["train"], broken), _scan_folder(val_dir, broken)
    if set(subdirs) == {"train"}:  # train/ alone: its images, scored out of fold
        return "train+val", _scan_folder(subdirs["train"], broken), None
    split_like = sorted(n for n in ("train", *_VAL_DIRS) if n in subdirs)
    if split_like:
        # never silently a class named "train" or "test"
        raise DataError(
            f"{root}: a {'/ '.join(split_like)}/ folder beside {len(subdirs) - len(split_like)} other "
            "folder(s) is not a layout edgetl knows: use train/<class>/ with val/<class>/ (or valid/, "
            "validation/, test/) as the holdout, or DATA/<class>/ without split folders"
        )
    if not subdirs and (root / "labels.csv").is_file():
        train, val = _scan_csv(root / "labels.csv", group_column)
        return "csv", train, val
    return "folder", _scan_folder(root, broken), None


def _check_all(items, *, strict: bool, skipped: list, checked: CheckedImages | None = None) -> list[Sample]:
    out = []
    for path, label, group in items:
        if not is_image_name(path):
            reason = "not an image file (unknown extension)"
        else:
            try:
                out.append(Sample(path, label, check_image(path, checked), group))
                continue
            except DataError as exc:
                if strict:
                    raise DataError(f"{exc} (--strict makes bad files fatal)") from None
                reason = str(exc).split(": ", 1)[-1]
        if strict and is_image_name(path):
            raise DataError(f"{path}: {reason}")
        skipped.append((path, reason))
    return out


def stratified_split(samples: list, *, fraction: float, seed: int):
    """Seeded split keeping class proportions; every class with >= 2 images gets >= 1 in val."""
    by_class: dict[str, list] = defaultdict(list)
    for s in samples:
        by_class[s.label].append(s)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda s: (s.digest, str(s.path)))
        rng.shuffle(group)
        n_val = 0 if len(group) < 2 else min(len(group) - 1, max(1, round(len(group) * fraction)))
        val += group[:n_val]
        train += group[n_val:]
    return train, val


def group_split(samples: list[Sample], *, fraction: float, seed: int) -> tuple[list[Sample], list[Sample], dict]:
    """A seeded split that keeps every group on one side and each class near ``fraction`` in val.

    Groups are taken in a seeded order; a group goes to validation while its classes are below
    their validation quota and it is not the last training group of any of its classes. Images
    without a group are groups of one. Returns (train, val, info); ``info`` names the classes
    that got no validation image (too few groups).
    """
    by_group: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by_group[s.group or f"\0{s.digest}:{s.path}"].append(s)
    per_class = Counter(s.label for s in samples)
    quota = {c: (0 if n < 2 else max(1, round(n * fraction))) for c, n in per_class.items()}
    groups_of: dict[str, set[str]] = defaultdict(set)
    for g, members in by_group.items():
        for s in members:
            groups_of[s.label].add(g)
    rng = random.Random(seed)
    order = sorted(by_group, key=lambda g: (min(s.digest for s in by_group[g]), g))
    rng.shuffle(order)
    in_val: Counter = Counter()
    train_groups = {c: set(gs) for c, gs in groups_of.items()}
    val_groups: set[str] = set()
    for g in order:
        counts = Counter(s.label for s in by_group[g])
        wanted = any(in_val[c] < quota[c] for c in counts)
        keeps_train = all(len(train_groups[c]) > 1 for c in counts)
        if wanted and keeps_train:
            val_groups.add(g)
            in_val.update(counts)
            for c in counts:
                train_groups[c].discard(g)
    train = [s for g in order if g not in val_groups for s in by_group[g]]
    val = [s for g in order if g in val_groups for s in by_group[g]]
    key = lambda s: (s.label, str(s.path))  # noqa: E731 - stable output order
    info = {
        "groups": len(by_group),
        "val_groups": len(val_groups),
        "classes_without_val": sorted(c for c in per_class if in_val[c] == 0 and per_class[c] >= 2),
    }
    return sorted(train, key=key), sorted(val, key=key), info


def regroup(samples: list[Sample], group_by: str | None, layout: str) -> tuple[list[Sample], str]:
    """Apply ``group_by`` to scanned samples -> (samples, where their groups come from)."""
    import dataclasses

    if group_by == "none":
        return [dataclasses.replace(s, group="") for s in samples], "none"
    if group_by and group_by.startswith("regex:"):
        try:
            pattern = re.compile(group_by[len("regex:") :])
        except re.error as exc:
            raise DataError(f"--group-by {group_by!r}: not a valid regular expression ({exc})") from None
        out = []
        for s in samples:
            m = pattern.search(s.path.name)
            g = (m.group(1) if m and m.groups() else m.group(0)) if m else ""
            out.append(dataclasses.replace(s, group=f"{s.label}/{g}" if g else ""))
        return out, f"regex {pattern.pattern!r} on file names"
    if group_by == "folder" and layout not in ("folder", "train+val"):
        raise DataError(f"--group-by folder needs DATA/<class>/<group>/ folders; this dataset is a {layout}")
    if any(s.group for s in samples):
        return samples, ("csv column" if layout == "csv" else "folder DATA/<class>/<group>/")
    return samples, "none"


def scan_images(
    root: str | Path, *, strict: bool = False, checked: CheckedImages | None = None, group_by: str | None = None
) -> tuple[str, list[Sample], list[Sample] | None, list]:
    """Discover and decode every image under ``root`` (not those ``checked`` already knows);
    labels (and groups) as the layout gives them.

    Returns:
        (layout, samples, explicit val samples or None, skipped [(path, reason)]).
    """
    root = Path(root)
    column = group_by if group_by and group_by not in ("none", "folder") and not group_by.startswith("regex:") else None
    if column and not (root.is_file() or (root / "labels.csv").is_file()):
        raise DataError(
            f"--group-by {group_by!r}: a column name needs a CSV manifest; for folders use "
            "--group-by folder (DATA/<class>/<group>/) or --group-by 'regex:PATTERN'"
        )
    skipped: list[tuple[Path, str]] = []
    layout, train_items, val_items = _find_layout(root, column, skipped)
    train = _check_all(train_items, strict=strict, skipped=skipped, checked=checked)
    val = _check_all(val_items, strict=strict, skipped=skipped, checked=checked) if val_items is not None else None
    return layout, train, val, skipped


def load_dataset(
    root: str | Path,
    *,
    val: str | Path | None = None,
    val_split: float | None = 0.2,
    seed: int = 0,
    strict: bool = False,
    min_classes: int = 2,
    checked: CheckedImages | None = None,
    group_by: str | None = None,
) -> Dataset:
    """Find, check and split a labelled image dataset.

    Args:
        root: an ImageFolder, a ``train``/``val`` pair, or a CSV manifest.
        val: a separate validation folder or CSV (overrides any split in ``root``).
        val_split: fraction held out per class when no validation set is given; None: none held
            out (``fit`` scores every item out of fold instead).
        seed: seeds the split.
        strict: make unreadable files fatal instead of skipped.
        min_classes: 2 for classification.
        checked: images known to decode (a cache), which are hashed but not decoded again.
        group_by: where groups come from: ``None`` (a ``group`` column or ``<class>/<group>/``
            folders when present), ``none``, ``folder``, ``regex:PATTERN`` or a CSV column.

    Raises:
        DataError: missing path, no usable images, too few classes, a class with no usable image.

    Example:
        >>> ds = load_dataset("parts/", val_split=0.2, seed=0)  # doctest: +SKIP
        >>> ds.classes, len(ds.train), len(ds.val)  # doctest: +SKIP
    """
    if val_split is not None and not 0.0 < val_split < 1.0:
        raise DataError(f"--val-split must be between 0 and 1, got {val_split}")
    root = Path(root)
    layout, train, explicit_val, skipped = scan_images(root, strict=strict, checked=checked, group_by=group_by)
    train, grouping = regroup(train, group_by, layout)
    if val is not None:
        vlayout, vtrain, vval, vskipped = scan_images(val, strict=strict, checked=checked)
        explicit_val = vtrain + (vval or [])
        skipped += vskipped
    found = Counter(lbl for _, lbl in [(s.path, s.label) for s in train])
    if not train:
        raise DataError(
            f"{root}: no usable training images found ({len(skipped)} skipped); expected "
            f"{root}/<class>/<image>.jpg|png|bmp|tif|webp or a CSV manifest"
        )
    expected = _expected_classes(root, layout)
    empty = sorted(c for c in expected if found[c] == 0)
    if empty:
        raise DataError(
            f"{root}: class {empty[0]!r} has no usable image"
            + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else "")
            + "; add images or remove the folder"
        )
    classes = sorted(found)
    if len(classes) < min_classes:
        raise DataError(
            f"{root}: found {len(classes)} class ({', '.join(classes)}); classification needs at "
            f"least {min_classes}. For good-only defect data use --task anomaly"
        )
    if explicit_val is not None:
        unknown = sorted({s.label for s in explicit_val} - set(classes))
        if unknown:
            raise DataError(
                f"{val or root}: validation class {unknown[0]!r} has no training images; "
                "every validation class must also appear in training"
            )
        return Dataset(root, layout, classes, train, explicit_val, skipped, {"method": "explicit"})
    if val_split is None:
        return Dataset(
            root,
            layout,
            classes,
            sorted(train, key=lambda s: str(s.path)),
            [],
            skipped,
            {"method": "out-of-fold", **({"groups_from": grouping} if grouping != "none" else {})},
        )
    if grouping != "none":
        tr, va, info = group_split(train, fraction=val_split, seed=seed)
        return Dataset(root, layout, classes, tr, va, skipped, {"method": "grouped", "groups_from": grouping, **info})
    tr, va = stratified_split(train, fraction=val_split, seed=seed)
    return Dataset(root, layout, classes, tr, va, skipped, {"method": "stratified"})


def _expected_classes(root: Path, layout: str) -> list[str]:
    """Class folders that exist on disk, so an all-bad class is reported rather than dropped."""
    if layout == "folder":
        return [p.name for p in _class_dirs(root)]
    if layout == "train+val":
        return [p.name for p in _class_dirs(root / "train")] if (root / "train").is_dir() else []
    return []


def list_images(paths: list[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of image paths for ``predict``.

    Raises:
        DataError: a path does not exist, or nothing in it looks like an image.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p}: no such file or folder")
        if p.is_dir():
            found = [f for f in _files_under(p) if is_image_name(f)]
            if not found:
                raise DataError(f"{p}: no image files (.jpg .png .bmp .tif .webp) in this folder")
            out += found
        else:
            out.append(p)
    return out
