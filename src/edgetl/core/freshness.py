"""A device's memory of the newest signed state it accepted, kept outside the bundle.

A signature says who made a state, not that it is the latest: a copy of yesterday's signed
``manifest.json`` (and its files) is as well signed as today's. So every signed state carries a
serial that each write increments (:func:`edgetl.core.signing.next_state`), and a device with a
trust policy records, per bundle path, the highest serials and the newest release (its signed
issue time) it has accepted. A state or release older than the record is refused (exit 5): a
replay, or a rollback nobody signed. A rollback the owner wants is a *new* state, written by
``edgetl rollback --sign KEY`` with a higher serial; an older release installed on purpose is
re-released (``fit`` / ``export --sign``), or its path's record removed by the device's operator.

The record lives where the device keeps its own state, not in the bundle (whoever can replace the
bundle could replace a record inside it): ``EDGETL_FRESHNESS``, else
``$XDG_STATE_HOME/edgetl/freshness.json`` (``~/.local/state/...``). It is updated under an
exclusive ``flock`` and replaced atomically; a device that cannot keep it refuses signed bundles
rather than accept them without the check.

numpy-free and torch-free: this runs on the device before every load under a trust policy.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from ..errors import ConfigError, TrustError

_MAX_BYTES = 4 << 20  # one small record per bundle path


def record_file() -> Path:
    env = os.environ.get("EDGETL_FRESHNESS")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "edgetl" / "freshness.json"


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot keep this device's freshness record ({exc.strerror or exc}); set "
            "EDGETL_FRESHNESS to a writable file outside the bundles"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(path: Path) -> dict:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read this device's freshness record ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as f:
        raw = f.read(_MAX_BYTES + 1)
    try:
        data = json.loads(raw.decode()) if len(raw) <= _MAX_BYTES else None
    except (UnicodeDecodeError, ValueError, RecursionError):
        data = None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        # Refuse rather than silently forget every high-water mark.
        raise ConfigError(
            f"{path}: this device's freshness record is damaged; restore it, or remove it to "
            "accept the bundles' current states afresh"
        )
    return data


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(
            f"{path}: cannot update this device's freshness record ({exc.strerror or exc}); set "
            "EDGETL_FRESHNESS to a writable file outside the bundles"
        ) from None


def check_and_record(bundle_path: str | Path, manifest: dict) -> None:
    """Refuse ``manifest`` (already verified against a trust policy) if this device has accepted a
    newer state or release at ``bundle_path``; otherwise raise the record to it.

    Raises:
        TrustError: an older signed state or release than the one accepted before (exit 5).
        ConfigError: the record cannot be read or written.
    """
    from .signing import digest, state_serials

    release = manifest["release"]
    rel_digest, issued = digest(release), int(release.get("issued_ns", 0))
    serial, selection = state_serials(manifest)
    path = record_file()
    key = str(Path(bundle_path).resolve())
    fix = (
        "a replayed copy? To go back on purpose the owner signs a rollback (edgetl rollback --sign KEY), "
        f"which is a newer state; record: {path}"
    )
    with _locked(path):
        data = _read(path)
        rec = data.get(key)
        if rec is not None and rec.get("release") == rel_digest:
            if serial < int(rec.get("serial", 0)) or selection < int(rec.get("selection_serial", 0)):
                raise TrustError(
                    f"{bundle_path}: this signed state (serial {serial}) is older than one this device "
                    f"already accepted (serial {rec.get('serial')}); refusing it ({fix})"
                )
        elif rec is not None and issued <= int(rec.get("issued_ns", 0)):
            raise TrustError(
                f"{bundle_path}: this signed release is not newer than the one this device already "
                f"accepted at this path; refusing it ({fix})"
            )
        new = {"release": rel_digest, "issued_ns": issued, "serial": serial, "selection_serial": selection}
        if rec != new:
            data[key] = new
            _write(path, data)
