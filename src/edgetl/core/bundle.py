"""The bundle: the self-describing, verifiable directory that ships to a device.

::

    manifest.json   format version, backbone, preprocessing, labels, target, precision,
                    head versions (current one marked), thresholds, metrics, sha256 of every file,
                    and (signed bundles) the release block and signatures
    backbone.*      the feature extractor the device runs (INT8 / FP16 / FP32; .onnx or .xml+.bin)
    model.*         backbone + current head + softmax fused, for apps that want one model file
    heads/vN.npz    head weights per version (np.load with allow_pickle=False)
    exemplars.npz   a small replay set of features per class, for on-device adapt (later
                    versions: exemplars/vN.npz)
    drift.npz       what the training features looked like, for drift scores on the device
                    (classification; later versions: drift/vN.npz)
    overview.npz    a tiled defect bundle's whole-frame head, scored beside the tiles (later
                    versions: overview/vN.npz)
    tokenizer.json  text bundles: the tokenizer
    report.json     FP32 vs quantized accuracy, feature cosine, parity, sizes, latency

Writing is atomic: a new bundle goes to a sibling temporary directory that is fsynced and renamed
into place, so a crash leaves either no bundle or a whole one. Later updates (``adapt``,
``rollback``, ``threshold``) hold the bundle's writer lock (:mod:`edgetl.core.lock`), add files first
and then replace ``manifest.json`` in one rename: the manifest is the single commit point, and
whatever it names is complete and hashed. Loading checks the manifest's schema, confines every
path to the bundle (no ``..``, no symlinks, regular files only), verifies every file's sha256,
and, where a trust policy is in force, the signatures (:mod:`edgetl.core.signing`). No pickles anywhere.

What is verified is what runs: a model or head file is read once into memory
(:meth:`Bundle.read_verified`), its sha256 checked on those bytes, and those same bytes handed to
ONNX Runtime, OpenVINO or ``np.load``. A file renamed into place after the check is never opened
by the runtime; it fails the check instead.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BundleError, TrustError, UnknownVersion
from .lock import LOCK_NAME, writer_lock
from .manifest import MAX_MANIFEST_BYTES, read_json, regular_file, validate
from .preprocess import PreprocessConfig

FORMAT = "edgetl-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Suffixes that can carry executable pickles; never allowed inside a bundle.
_FORBIDDEN = (".pkl", ".pickle", ".pt", ".pth", ".joblib")
# Files edgetl itself leaves in a bundle folder that are never listed: the lock, and temporaries
# of a writer that was killed (cleaned by the next writer).
_OWN_UNLISTED = re.compile(r"(\.edgetl\.lock|\..*\.tmp|\.staging-\d+.*|\.write-probe-\d+)")
# Version files edgetl writes; one the manifest does not list is a killed writer's orphan.
_VERSION_FILE = re.compile(r"((heads|exemplars|drift|overview)/v\d+\.npz|model-v\d+\.(onnx|xml|bin))")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
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


def file_entry(path: Path) -> dict:
    if path.suffix.lower() in _FORBIDDEN:
        raise BundleError(f"{path}: pickle-capable files ({path.suffix}) are not allowed in a bundle")
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def file_entries(root: Path) -> dict[str, dict]:
    """sha256 and size of every file below ``root`` except the manifest and dot-files, by relative
    path. Symlinks and special files are refused: a bundle holds regular files only."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                raise BundleError(f"{p}: is a symlink; a bundle holds regular files only")
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise BundleError(f"{p}: is not a regular file")
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel != MANIFEST and not name.startswith("."):
                out[rel] = file_entry(p)
    return dict(sorted(out.items()))


class VerifiedFile(io.BytesIO):
    """The bytes of one bundle file, checked against the manifest's sha256 on exactly these bytes;
    readable like the file (``np.load`` takes it), and printed as its path in messages."""

    def __init__(self, data: bytes, path: Path):
        super().__init__(data)
        self.path = Path(path)
        self.name = str(path)

    def __str__(self) -> str:
        return str(self.path)


def read_verified(root: Path, rel: str, entry: dict) -> bytes:
    """The bytes of ``root/rel`` if they are the ones ``entry`` (its manifest ``files`` entry)
    records: one open (no symlink, a regular file), one read, the hash over what was read.

    Raises:
        BundleError: missing, not a regular file, another size or another sha256.
    """
    p = regular_file(root, rel)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise BundleError(f"{p}: cannot open it ({exc.strerror or exc}); copy the bundle again") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # swapped for a FIFO or device after the check
            raise BundleError(f"{p}: is not a regular file")
        data = f.read(int(entry["bytes"]) + 1)
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise BundleError(
            f"{p}: sha256 does not match the manifest (modified or replaced since it was checked); "
            "copy the bundle again"
        )
    return data


@dataclass
class Bundle:
    """A loaded, verified bundle. Paths inside are resolved against ``path``; ``signers`` says
    who signed what when a trust policy checked it."""

    path: Path
    manifest: dict
    signers: dict = field(default_factory=dict)

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

    def relative(self, path: str | Path) -> str:
        """``path`` (inside the bundle) as the manifest names it."""
        path = Path(path)
        try:
            return path.relative_to(self.path).as_posix()
        except ValueError:
            pass
        if path.is_absolute():
            raise BundleError(f"{path}: is not inside the bundle {self.path}")
        return path.as_posix()  # already relative to the bundle

    def read_verified(self, path: str | Path) -> bytes:
        """The bytes of one listed file, hashed as read: what a runtime or loader is handed, so
        nothing swapped in after :func:`load_bundle`'s check is ever run (see the module docstring).

        Raises:
            BundleError: not a file the manifest lists, or not the bytes it lists.
        """
        rel = self.relative(path)
        entry = self.manifest["files"].get(rel)
        if entry is None:
            raise BundleError(f"{self.path / rel}: not among the bundle's hashed files")
        return read_verified(self.path, rel, entry)

    def open_verified(self, path: str | Path) -> VerifiedFile:
        """:meth:`read_verified` as a readable file object (for ``np.load`` and the head loaders)."""
        return VerifiedFile(self.read_verified(path), self.path / self.relative(path))

    def head_entry(self, version: int | None = None) -> dict:
        version = self.head_version if version is None else version
        for entry in self.manifest["head"]["versions"]:
            if entry["version"] == version:
                return entry
        known = [e["version"] for e in self.manifest["head"]["versions"]]
        raise UnknownVersion(f"{self.path}: no head version {version}; versions here: {known}")


def _manifest_stamp(path: Path):
    try:
        st = os.stat(path / MANIFEST)
        return st.st_ino, st.st_mtime_ns, st.st_size
    except OSError:
        return None


def read_manifest(path: Path) -> dict:
    """The manifest of the bundle at ``path``, schema-checked (files are not verified here).

    Raises:
        BundleError: no bundle, not a bundle, another format version, or a malformed field.
    """
    path = Path(path)
    mpath = path / MANIFEST
    if not path.exists():
        raise BundleError(f"{path}: no such bundle; create one with: edgetl fit DATA --out {path}")
    if not mpath.is_file() and not mpath.is_symlink():
        raise BundleError(f"{path}: not an edgetl bundle (no {MANIFEST})")
    manifest = read_json(mpath, limit=MAX_MANIFEST_BYTES, what="manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(
            f"{path}: not an edgetl bundle (manifest format is "
            f"{manifest.get('format') if isinstance(manifest, dict) else None!r})"
        )
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {version} is not supported by this edgetl "
            f"(reads version {FORMAT_VERSION}); re-export it with a matching edgetl"
        )
    validate(manifest, where=str(mpath))
    return manifest


def verify(path: Path, manifest: dict) -> None:
    """Check every file the manifest lists: confined, a regular file, the recorded size and sha256.

    Raises:
        BundleError: a file is missing, truncated, modified, a symlink or not a regular file.
    """
    for rel, entry in manifest["files"].items():
        p = regular_file(path, rel)
        if p.stat().st_size != entry["bytes"]:
            raise BundleError(
                f"{p}: size {p.stat().st_size} != {entry['bytes']} in the manifest (truncated?); copy the bundle again"
            )
        try:
            actual = sha256_file(p)
        except OSError as exc:  # removed or replaced since the check above (a writer pruning it)
            raise BundleError(f"{p}: cannot read it ({exc.strerror or exc}); copy the bundle again") from None
        if actual != entry["sha256"]:
            raise BundleError(f"{p}: sha256 does not match the manifest (modified or corrupted); copy the bundle again")


def load_bundle(path: str | Path, *, verify_files: bool = True, trust=None) -> Bundle:
    """Open a bundle, checking its manifest, the hash of every file and, with a trust policy (``trust``,
    or the ``EDGETL_TRUST`` file), its signatures.

    A reader takes no lock. When a file the manifest lists vanished or changed because a writer
    switched the manifest meanwhile, the new manifest is read and checked once more.

    Raises:
        BundleError: not a bundle, another format version, a malformed manifest, or a
            missing / tampered / truncated / unconfined file.
        TrustError: the trust policy refuses it.

    Example:
        >>> b = load_bundle("parts.bundle")  # doctest: +SKIP
        >>> b.labels, b.precision  # doctest: +SKIP
    """
    from .freshness import check_and_record
    from .signing import policy_from_env, verify_trust

    path = Path(path)
    policy = trust if trust is not None else policy_from_env()
    for attempt in (0, 1, 2):
        stamp = _manifest_stamp(path)
        manifest = read_manifest(path)
        try:
            if verify_files:
                verify(path, manifest)
            signers = {}
            if policy is not None:
                signers = verify_trust(manifest, policy, str(path))
                # A newer state may have been accepted (by another reader) since this one was read:
                # the retry below then reads that newer one instead of refusing.
                check_and_record(path, manifest)
            break
        except BundleError:
            if attempt < 2 and _manifest_stamp(path) != stamp:
                continue  # a writer switched versions while we read: check what is current now
            raise
    return Bundle(path, manifest, signers)


def is_bundle(path: Path) -> bool:
    """Whether ``path`` holds an edgetl manifest (readable, right format); files not verified."""
    try:
        return read_json(Path(path) / MANIFEST, limit=MAX_MANIFEST_BYTES).get("format") == FORMAT
    except (BundleError, AttributeError):
        return False


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a in b.parents or b in a.parents


def check_out_dir(out: Path, *, force: bool, data: str | Path | None = None) -> None:
    """Refuse an ``--out`` that would destroy anything but an edgetl bundle.

    Without ``force`` the directory must be new or empty. With ``force`` an existing edgetl bundle
    may be replaced, and only that: never the training data (or a folder holding it), never a
    mount point, never a folder that is not a bundle or that holds files the bundle does not list.

    Raises:
        BundleError: one line naming what is there and how to pick another ``--out``.
    """
    out = Path(out)
    fix = "pick another --out (a new or empty folder, or an existing edgetl bundle to replace with --force)"
    if out.is_symlink():
        raise BundleError(f"{out}: is a symlink; {fix}")
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out}: is a file; choose a directory name for --out")
    if data is not None and Path(data).exists() and _overlaps(out, Path(data)):
        raise BundleError(f"{out}: holds or lies inside the training data {data}; {fix}")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise BundleError(f"{out}: exists and is not empty; choose another --out or pass --force to replace it")
    if os.path.ismount(out):
        raise BundleError(f"{out}: is a mount point; {fix}")
    if not is_bundle(out):
        raise BundleError(
            f"{out}: is not an edgetl bundle (no readable {MANIFEST}); --force only replaces bundles; {fix}"
        )
    listed = set(read_json(out / MANIFEST, limit=MAX_MANIFEST_BYTES).get("files", {}))
    # Folders edgetl writes: those of listed files, and the version folders. Anything in another
    # folder, any other folder (empty too) and any symlink is the user's, and stops the replace.
    own_dirs = {"", "heads", "exemplars", "drift", "overview"} | {str(Path(rel).parent.as_posix()) for rel in listed}
    own_dirs = {"" if d == "." else d for d in own_dirs}
    foreign = []
    for dirpath, dirnames, filenames in os.walk(out):
        here = Path(dirpath).relative_to(out).as_posix()
        here = "" if here == "." else here
        for name in dirnames:
            rel = f"{here}/{name}" if here else name
            if (Path(dirpath) / name).is_symlink() or rel not in own_dirs:
                foreign.append(rel + "/")
        dirnames[:] = [
            d for d in dirnames if (f"{here}/{d}" if here else d) in own_dirs and not (Path(dirpath) / d).is_symlink()
        ]
        for name in filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(out).as_posix()
            if p.is_symlink() or (
                rel != MANIFEST
                and rel not in listed
                and not _OWN_UNLISTED.fullmatch(name)
                and not _VERSION_FILE.fullmatch(rel)
            ):
                foreign.append(rel)
    if foreign:
        shown = ", ".join(sorted(foreign)[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise BundleError(f"{out}: holds files that are not part of the bundle ({shown}); move them out or {fix}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_sibling_leftovers(out: Path) -> list[Path]:
    """Remove the staging (``.NAME.PID.*.partial``) and aside (``.NAME.old-PID``) folders that a
    killed ``fit`` / ``export`` of ``out`` left beside it; those of a live process are kept."""
    removed = []
    pattern = re.compile(re.escape(f".{out.name}.") + r"(?:(\d+)\..*\.partial|old-(\d+))")
    parent = out.parent if out.parent.exists() else None
    for p in parent.iterdir() if parent else ():
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m.group(1) or m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_WRITE_FIX = {
    errno.ENOSPC: "free some disk space",
    errno.EDQUOT: "free some disk space",
    errno.EFBIG: "raise the file-size limit (ulimit -f)",
    errno.EROFS: "write to a writable disk",
    errno.EACCES: "fix the permissions or pick another --out",
    errno.EPERM: "fix the permissions (is it immutable? lsattr) or pick another --out",
    errno.EBUSY: "pick another --out (not a mount point)",
}


def write_error(where: Path, exc: OSError, what: str = "nothing was written") -> BundleError:
    """One line for an OSError while writing a bundle, with the fix for the common causes."""
    fix = _WRITE_FIX.get(exc.errno or 0, "check the disk and the folder's permissions")
    return BundleError(f"{exc.filename or where}: {exc.strerror or exc} while writing the bundle; {what}; {fix}")


class BundleWriter:
    """Stage a new bundle in a temporary sibling directory, then move it into place in one rename.

    Usage::

        with BundleWriter(out, force=False, data=DATA) as w:
            shutil.copy(model, w.dir / "backbone.onnx")
            ...
            w.commit(manifest)      # hashes files, writes manifest.json, renames into place

    An OSError while staging (full disk, file-size limit, permissions) becomes one
    :class:`BundleError` line, and nothing is left behind.
    """

    def __init__(self, out: str | Path, *, force: bool = False, data: str | Path | None = None, signer=None):
        self.out = Path(out)
        self.force = force
        self.signer = signer
        check_out_dir(self.out, force=force, data=data)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            clean_sibling_leftovers(self.out)
            # The pid in the name lets a later writer tell a dead process's staging from a live one's.
            self.dir = self.out.with_name(f".{self.out.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
            self.dir.mkdir(mode=0o700)
        except OSError as exc:
            raise write_error(self.out, exc) from None
        self.committed = False

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            shutil.rmtree(self.dir, ignore_errors=True)
        if isinstance(exc, OSError):
            raise write_error(self.out, exc) from None

    def commit(self, manifest: dict) -> Bundle:
        manifest = dict(manifest)
        manifest["format"] = FORMAT
        manifest["format_version"] = FORMAT_VERSION
        manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        manifest["files"] = file_entries(self.dir)
        if self.signer is not None:
            from .signing import sign_release

            manifest = sign_release(manifest, self.signer)
        validate(manifest, where=str(self.out / MANIFEST))
        try:
            for p in self.dir.rglob("*"):
                if p.is_file():
                    with open(p, "rb+") as f:
                        os.fsync(f.fileno())
            write_file_durably(self.dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False).encode())
            for d in [self.dir, *[p for p in self.dir.rglob("*") if p.is_dir()]]:
                fsync_dir(d)
            # Readable as the user's umask says (the staging folder was private while incomplete).
            os.chmod(self.dir, 0o777 & ~_umask())
            # Under the bundle's writer lock, which lives beside it and so outlives the
            # replacement: no adapt is half-way through the old bundle, and one queued behind this
            # replace then updates the new bundle under the same lock as any later writer.
            old = None
            with writer_lock(self.out, operation="replace (fit --force)"):
                if self.out.exists():
                    check_out_dir(self.out, force=self.force)  # still only a bundle of ours
                    old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
                    os.replace(self.out, old)  # one complete bundle at ``out`` or aside, never a mixture
                os.replace(self.dir, self.out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            fsync_dir(self.out.parent)
        except OSError as exc:
            raise write_error(self.out, exc, "the previous bundle, if any, is still in place") from None
        self.committed = True
        return Bundle(self.out, manifest)


def clean_leftovers(b: Bundle) -> list[str]:
    """What a killed writer left inside the bundle, removed by the next writer (which holds the
    lock): temporaries, and version files the manifest does not list. Only edgetl's own names."""
    removed = []
    listed = set(b.manifest["files"])
    for dirpath, _, filenames in os.walk(b.path):
        for name in filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(b.path).as_posix()
            own_temp = _OWN_UNLISTED.fullmatch(name) and name != LOCK_NAME
            orphan = _VERSION_FILE.fullmatch(rel) and rel not in listed
            if (own_temp or orphan) and not p.is_symlink():
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(rel)
    return removed


@contextlib.contextmanager
def updating(path: str | Path, *, operation: str, wait: float = 0.0, trust=None):
    """Hold the writer lock, then load the bundle as it is *now* (verified) and clear what killed
    writers left; the block reads and writes that bundle.

    Raises:
        BundleBusy: another writer holds the lock (and ``wait`` ran out).
        BundleError / TrustError: as :func:`load_bundle`.
    """
    path = Path(path)
    if not (path / MANIFEST).exists():
        read_manifest(path)  # the one-line "no such bundle" / "not a bundle" error
    with writer_lock(path, operation=operation, wait=wait):
        b = load_bundle(path, trust=trust)
        clean_leftovers(b)
        yield b


def update_manifest(
    bundle: Bundle,
    changes: dict,
    *,
    add: Sequence[str] = (),
    drop: Sequence[str] = (),
    signer=None,
    operation: str = "adapt",
    new_version: dict | None = None,
) -> Bundle:
    """Apply ``changes`` to the manifest and switch atomically (one rename). The caller holds the
    writer lock (:func:`updating`).

    The file list changes only as asked: the files in ``add`` (already written durably inside the
    bundle) are hashed in, those in ``drop`` are left out (the caller deletes them after the
    switch); an orphan lying in the folder is never adopted. With ``signer`` the new state (and
    ``new_version``) is signed; a signed bundle updated without a key loses its state signature,
    and where a trust policy is in force that is refused before anything is written.

    Raises:
        BundleError: the bundle directory is read-only or the disk is full; the old manifest stays.
        TrustError: a trust policy is in force and there is no key to sign the change with.
    """
    from .signing import next_state, policy_from_env, sign_update, verify_trust

    manifest = dict(bundle.manifest)
    manifest.update(changes)
    manifest["state"] = next_state(bundle.manifest, operation)  # every write moves the serial on
    try:
        files = {k: v for k, v in manifest["files"].items() if k not in set(drop)}
        for rel in add:
            files[rel] = file_entry(regular_file(bundle.path, rel))
        manifest["files"] = dict(sorted(files.items()))
        policy = policy_from_env()
        if signer is not None:
            manifest = sign_update(manifest, signer, operation, new_version)
            if policy is not None:  # never write a state this device itself would refuse
                verify_trust(manifest, policy, str(bundle.path))
        elif manifest.get("signatures"):
            if policy is not None:
                raise TrustError(
                    f"{bundle.path}: this device checks signatures, so {operation} needs a key to sign "
                    "with: --sign KEY or EDGETL_SIGN_KEY"
                )
            manifest["signatures"] = {
                k: v for k, v in manifest["signatures"].items() if k not in ("state", "selection", "thresholds")
            }
            # Allowed (a device without a policy may), but the bundle silently stops loading
            # wherever a policy is in force: the writer hears it now, not from the device later.
            logging.getLogger("edgetl").warning(
                "%s: signed bundle, %s without a key: the new state is unsigned, so devices with a trust "
                "policy will refuse it; sign with --sign KEY or EDGETL_SIGN_KEY",
                bundle.path,
                operation,
            )
        validate(manifest, where=str(bundle.path / MANIFEST))
        write_file_durably(bundle.path / MANIFEST, json.dumps(manifest, indent=2).encode())
    except OSError as exc:
        raise BundleError(
            f"{bundle.path}: cannot update the manifest ({exc.strerror or exc}); the previous head is still current"
        ) from None
    return Bundle(bundle.path, manifest)
