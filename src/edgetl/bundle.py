"""The bundle: the self-describing, verifiable directory that ships to a device.

::

    manifest.json   format version, backbone, preprocessing, labels, target, precision,
                    head versions (current one marked), thresholds, metrics, sha256 of every file
    backbone.*      the feature extractor the device runs (INT8 / FP16 / FP32; .onnx or .xml+.bin)
    model.*         backbone + current head + softmax fused, for apps that want one model file
    heads/vN.npz    head weights per version (np.load with allow_pickle=False)
    exemplars.npz   a small replay set of features per class, for on-device adapt
    report.json     FP32 vs quantized accuracy, feature cosine, parity, sizes, latency

Writing is atomic: everything goes to a sibling temporary directory that is fsynced and renamed
into place, so a crash leaves either no bundle or a whole one. Later updates (``adapt``,
``rollback``) add files first and then replace ``manifest.json`` in one rename: the manifest is the
single commit point, and whatever it names is complete and hashed. No pickles anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError
from .preprocess import PreprocessConfig

FORMAT = "edgetl-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Suffixes that can carry executable pickles; never allowed inside a bundle.
_FORBIDDEN = (".pkl", ".pickle", ".pt", ".pth", ".joblib")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file + fsync + rename: never a torn file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_npz_durably(path: Path, **arrays) -> None:
    """An uncompressed ``.npz`` of plain arrays (never object arrays: it loads with
    ``allow_pickle=False``), written like :func:`write_file_durably`."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_file_durably(path, buf.getvalue())


def file_entries(root: Path) -> dict[str, dict]:
    """sha256 and size of every file below ``root`` except the manifest, by relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith("."):
            rel = p.relative_to(root).as_posix()
            if p.suffix.lower() in _FORBIDDEN:
                raise BundleError(f"{p}: pickle-capable files ({p.suffix}) are not allowed in a bundle")
            out[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


@dataclass
class Bundle:
    """A loaded, verified bundle. Paths inside are resolved against ``path``."""

    path: Path
    manifest: dict

    @property
    def task(self) -> str:
        return self.manifest.get("task", "classify")

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def runtime(self) -> str:
        return self.manifest["runtime"]

    @property
    def float_precision(self) -> str:
        """What the bundle's models compute non-quantized ops in: f32 unless its profile opted
        into bf16 / f16 (bundles written before this was recorded mean f32)."""
        if self.precision == "bf16":
            return "bf16"
        return str(self.manifest.get("target", {}).get("float_precision", "f32"))

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.manifest["backbone"]["preprocess"])

    @property
    def head_version(self) -> int:
        return int(self.manifest["head"]["current"])

    def file(self, rel: str) -> Path:
        return self.path / rel

    def model_file(self, role: str = "backbone") -> Path:
        return self.path / self.manifest["models"][role]

    def head_entry(self, version: int | None = None) -> dict:
        version = self.head_version if version is None else version
        for entry in self.manifest["head"]["versions"]:
            if entry["version"] == version:
                return entry
        known = [e["version"] for e in self.manifest["head"]["versions"]]
        raise BundleError(f"{self.path}: no head version {version}; versions here: {known}")

    def load_head(self, version: int | None = None):
        from .heads import Head

        return Head.load(self.path / self.head_entry(version)["file"])


def read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not path.exists():
        raise BundleError(f"{path}: no such bundle; create one with: edgetl fit DATA --out {path}")
    if not mpath.is_file():
        raise BundleError(f"{path}: not an edgetl bundle (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{mpath}: unreadable manifest ({exc}); the bundle is damaged, re-export it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not an edgetl bundle (manifest format is {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {version} is not supported by this edgetl "
            f"(reads version {FORMAT_VERSION}); re-export it with a matching edgetl"
        )
    return manifest


def verify(path: Path, manifest: dict) -> None:
    """Check every file the manifest lists is present with the recorded size and sha256.

    Raises:
        BundleError: a file is missing, truncated or modified.
    """
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{path}: manifest lists no files; the bundle is damaged")
    for rel, entry in files.items():
        p = path / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise BundleError(f"{path}: manifest names a file outside the bundle ({rel})")
        if not p.is_file():
            raise BundleError(f"{p}: missing from the bundle; copy the whole bundle directory again")
        if p.stat().st_size != entry["bytes"]:
            raise BundleError(f"{p}: size {p.stat().st_size} != {entry['bytes']} in the manifest (truncated?); copy the bundle again")
        if sha256_file(p) != entry["sha256"]:
            raise BundleError(f"{p}: sha256 does not match the manifest (modified or corrupted); copy the bundle again")


def load_bundle(path: str | Path, *, verify_files: bool = True) -> Bundle:
    """Open a bundle, checking its format version and the hash of every file.

    Raises:
        BundleError: not a bundle, another format version, or a missing/tampered/truncated file.

    Example:
        >>> b = load_bundle("parts.bundle")  # doctest: +SKIP
        >>> b.labels, b.precision  # doctest: +SKIP
    """
    path = Path(path)
    manifest = read_manifest(path)
    if verify_files:
        verify(path, manifest)
    return Bundle(path, manifest)


def check_out_dir(out: Path, *, force: bool) -> None:
    """Refuse to replace a non-empty directory unless ``force``.

    Raises:
        BundleError: ``out`` is a non-empty directory (or a file) and ``force`` is not set.
    """
    if out.is_file():
        raise BundleError(f"{out}: is a file; choose a directory name for --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise BundleError(f"{out}: exists and is not empty; choose another --out or pass --force to replace it")


class BundleWriter:
    """Stage a new bundle in a temporary sibling directory, then move it into place in one rename.

    Usage::

        with BundleWriter(out, force=False) as w:
            shutil.copy(model, w.dir / "backbone.onnx")
            ...
            w.commit(manifest)      # hashes files, writes manifest.json, renames into place
    """

    def __init__(self, out: str | Path, *, force: bool = False):
        self.out = Path(out)
        check_out_dir(self.out, force=force)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".partial", dir=self.out.parent))
        self.committed = False

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            shutil.rmtree(self.dir, ignore_errors=True)

    def commit(self, manifest: dict) -> Bundle:
        manifest = dict(manifest)
        manifest["format"] = FORMAT
        manifest["format_version"] = FORMAT_VERSION
        manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        manifest["files"] = file_entries(self.dir)
        for p in self.dir.rglob("*"):
            if p.is_file():
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
        write_file_durably(self.dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False).encode())
        for d in [self.dir, *[p for p in self.dir.rglob("*") if p.is_dir()]]:
            fsync_dir(d)
        old = None
        if self.out.exists():
            # Move the old bundle aside first: at every instant one complete bundle is at ``out``
            # or at the aside name, never a mixture.
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.dir, self.out)
        fsync_dir(self.out.parent)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return Bundle(self.out, manifest)


def update_manifest(bundle: Bundle, changes: dict, *, exclude: list[str] = ()) -> Bundle:
    """Apply ``changes`` to the manifest and re-hash files, switching atomically (one rename).

    Files the new manifest refers to must already be written (durably) inside the bundle; files in
    ``exclude`` are left out of it (the caller deletes them after the switch).

    Raises:
        BundleError: the bundle directory is read-only or the disk is full; the old manifest stays.
    """
    manifest = dict(bundle.manifest)
    manifest.update(changes)
    try:
        manifest["files"] = {k: v for k, v in file_entries(bundle.path).items() if k not in set(exclude)}
        write_file_durably(bundle.path / MANIFEST, json.dumps(manifest, indent=2).encode())
    except OSError as exc:
        raise BundleError(
            f"{bundle.path}: cannot update the manifest ({exc.strerror or exc}); the previous head is still current"
        ) from None
    return Bundle(bundle.path, manifest)
