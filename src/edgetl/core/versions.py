"""Head versions inside a bundle: how a new one is written and made current, for every task.

A new version's files are written beside the old ones (``heads/vN.npz``, the task's other files,
the fused ``model-vN.*`` through a staging name and a rename), and only then does one atomic
manifest switch (:func:`edgetl.core.bundle.update_manifest`) make version N current: a power cut
before it leaves the old version current and whole, after it the new one. The caller holds the
bundle's writer lock (:func:`for_update`). The fused models of all but the three most recent
versions are pruned (a PaDiM one is 13 MB); heads are always kept, and a rollback regenerates the
fused model of the version it brings back.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import BundleError
from .bundle import Bundle, load_bundle, update_manifest, updating
from .fuse import fuse, model_files

KEEP_FUSED = 3


def _fault(point: str) -> None:
    """Test hook: ``EDGETL_FAULT=<point>`` ends the process here (exit 70), like a power cut would;
    the crash tests need a deterministic point inside the write (docs/SECURITY.md, "Test hook")."""
    if os.environ.get("EDGETL_FAULT") == point:
        os._exit(70)


def for_update(bundle: str | Path | Bundle, *, operation: str, dry_run: bool = False, wait: float = 0.0):
    """The bundle to work on: under its writer lock, as it is now, for a real update; simply
    loaded for a dry run (which writes nothing)."""
    path = bundle.path if isinstance(bundle, Bundle) else Path(bundle)
    if dry_run:
        return contextlib.nullcontext(load_bundle(path))
    return updating(path, operation=operation, wait=wait)


def fused_name(b: Bundle, version: int) -> str:
    suffix = Path(b.manifest["models"]["fused"]).suffix
    return f"model{suffix}" if version == 1 else f"model-v{version}{suffix}"


def fused_files(name: str) -> list[str]:
    return [p.as_posix() for p in model_files(Path(name))]


def next_version(b: Bundle) -> int:
    return max(e["version"] for e in b.manifest["head"]["versions"]) + 1


@contextlib.contextmanager
def new_version_files(b: Bundle, rels: list[str]):
    """Writing a new version's files: if one fails (a full disk, a read-only file system), the ones
    already written are removed and one :class:`BundleError` says the current version stays."""
    try:
        yield
    except OSError as exc:
        for rel in rels:
            (b.path / rel).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                (b.path / rel).parent.rmdir()  # a folder this update made, if it is empty
        raise BundleError(
            f"{b.path}: cannot write the new head ({exc.strerror or exc}); v{b.head_version} stays current"
        ) from None


def write_fused(b: Bundle, version: int, head, meta: dict) -> str:
    """Write version ``version``'s single-file model (backbone + ``head``'s graph) through a
    staging name and a rename: a crash leaves no half file under the final name. Returns its name
    inside the bundle."""
    name = fused_name(b, version)
    target = b.path / name
    staging = b.path / f".staging-{os.getpid()}{target.suffix}"
    # The backbone is fused from the bytes whose hash the release lists (a private copy), never
    # from its path: a backbone swapped in after the check would otherwise end up inside a fused
    # model that this writer then hashes and signs.
    backbone = b.model_file("backbone")
    source = b.path / f".staging-{os.getpid()}-backbone{backbone.suffix}"
    copies = [source] + ([source.with_suffix(".bin")] if backbone.suffix == ".xml" else [])
    try:
        source.write_bytes(b.read_verified(backbone))
        if backbone.suffix == ".xml":
            source.with_suffix(".bin").write_bytes(b.read_verified(backbone.with_suffix(".bin")))
        fuse(source, head, staging, meta={**meta, "head_version": version})
        if name.endswith(".xml"):
            os.replace(staging.with_suffix(".bin"), target.with_suffix(".bin"))
        os.replace(staging, target)
    finally:
        for p in (staging, staging.with_suffix(".bin"), *copies):
            p.unlink(missing_ok=True)
    return name


def switch_version(
    b: Bundle,
    changes: dict,
    *,
    add: Sequence[str] = (),
    drop: Sequence[str] = (),
    signer=None,
    operation: str = "adapt",
    new_version: dict | None = None,
) -> Bundle:
    """Atomically make ``changes`` current (the files in ``add`` hashed in), then delete the files
    in ``drop``, which the new manifest no longer lists. The caller holds the writer lock."""
    _fault("before-switch")
    new = update_manifest(b, changes, add=add, drop=drop, signer=signer, operation=operation, new_version=new_version)
    _fault("after-switch")
    for rel in drop:
        (b.path / rel).unlink(missing_ok=True)
    return new


def add_version(
    b: Bundle,
    head,
    entry: dict,
    *,
    meta: dict,
    changes: dict,
    files: dict | None = None,
    signer=None,
    operation: str = "adapt",
) -> Bundle:
    """Write ``head`` as the next version and make it current.

    Args:
        b: the bundle, loaded under its writer lock.
        head: the new head (``save(path)`` and ``graph(opset, ir_version)``), saved as
            ``heads/vN.npz`` and fused behind the backbone.
        entry: the version's manifest entry (labels, provenance, thresholds ...); ``version``,
            ``file``, ``created`` and ``fused`` are filled in here.
        meta: what the fused model records about itself.
        changes: other manifest fields the switch sets (labels, thresholds ...).
        files: the version's other files, ``{name in the bundle: write(path)}``.

    Raises:
        BundleError: a file cannot be written (nothing changes) or the bundle is read-only.
    """
    version = next_version(b)
    entry = {
        "version": version,
        "file": f"heads/v{version}.npz",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **entry,
    }
    files = {entry["file"]: head.save, **(files or {})}
    with new_version_files(b, [*files, *fused_files(fused_name(b, version))]):
        for rel, write in files.items():
            (b.path / rel).parent.mkdir(exist_ok=True)
            write(b.path / rel)
        fused = write_fused(b, version, head, meta)
    written = list(files)
    entry = dict(entry, fused=fused)
    versions = b.manifest["head"]["versions"] + [entry]
    keep = {e["version"] for e in versions[-KEEP_FUSED:]}
    pruned, drop = [], []
    for e in versions:
        if e["version"] not in keep and e.get("fused"):
            drop += [f for f in fused_files(e["fused"]) if f in b.manifest["files"]]
            e = dict(e, fused=None)
        pruned.append(e)
    return switch_version(
        b,
        {
            **changes,
            "head": {"current": version, "versions": pruned},
            "models": {**b.manifest["models"], "fused": fused},
        },
        add=[*written, *fused_files(fused)],
        drop=drop,
        signer=signer,
        operation=operation,
        new_version=entry,
    )
