"""One writer at a time per bundle; readers never wait.

Every command that changes a bundle (``adapt``, ``rollback``, ``threshold``, a ``fit --force`` or
``export --force`` replacing it, a fleet round writing a merged head) holds an exclusive
``flock`` on ``.NAME.edgetl.lock`` *beside* the bundle ``NAME`` for the whole read-modify-write.
Beside, not inside: ``fit --force`` replaces the bundle folder, and a lock inside it would be
replaced too, so a writer queued on the old lock file and one arriving on the new one would both
write. The lock file beside the folder keeps one identity across the replacement. Each writer
re-reads the manifest
after taking the lock, writes its new files, switches the manifest, and only then lets go. Two
``adapt`` runs therefore give two versions (or, without ``--wait``, one version and one clear
refusal), never a lost update or a head file and a fused model from different runs.

Why ``flock``: the kernel releases it when the holding process dies, however it dies (``kill -9``,
a power cut), so a crashed writer leaves no stale lock to clean up; the lock file itself is only a
place to lock and to say who holds it. It is advisory and local: bundles on NFS mounts without
lock support are refused a lock with a message rather than written unsafely.

Readers take no lock: a manifest switch is one atomic rename, and :func:`edgetl.bundle.load_bundle`
re-reads the manifest once when a file it lists disappeared under it (the writer pruned it after a
switch).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from pathlib import Path

from ..errors import BundleBusy, BundleError

LOCK_NAME = ".edgetl.lock"  # inside a bundle: where earlier versions locked (cleaned, never used)

# The lock descriptors this process holds. A forked child shares each descriptor's open file, and
# with it the flock: a child that outlives the write (OpenVINO's telemetry sends from a forked
# multiprocessing.Process that waits up to 3 s on a network a line PC does not have) would keep the
# bundle locked after the writer let go, and the same process's next rollback would be refused. So
# every Python-level fork closes them in the child; closing the child's copy leaves the parent's
# lock alone (an explicit unlock would release it for both).
_HELD: set[int] = set()


def _forget_in_child() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def lock_path(bundle: str | Path) -> Path:
    """The writer lock of ``bundle``: ``.NAME.edgetl.lock`` in the folder that holds it (the
    resolved path, so a symlink to the bundle shares its lock)."""
    p = Path(bundle).resolve()
    return p.parent / f".{p.name}{LOCK_NAME}"


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it (best effort: only for the message)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        who = f"pid {info.get('pid')} on {info.get('host')}"
        return f"{info.get('operation', 'a write')} by {who} since {info.get('since')}"
    except (OSError, ValueError, UnicodeDecodeError):
        return "another edgetl process"


@contextlib.contextmanager
def writer_lock(bundle: str | Path, *, operation: str, wait: float = 0.0):
    """Hold the bundle's writer lock for the ``with`` block.

    Args:
        bundle: the bundle directory (must exist).
        operation: what the holder does, for the message another writer gets (``adapt``, ...).
        wait: seconds to wait for a busy lock (0: refuse at once).

    Raises:
        BundleBusy: another process holds the lock (exit code 4); the message says who and since when.
        BundleError: the bundle cannot be locked (read-only, or a file system without locks).
    """
    import fcntl

    path = lock_path(bundle)
    try:
        # O_NOFOLLOW: a lock file that is a symlink (to somewhere outside the bundle) is refused.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise BundleError(
                f"{bundle}: bundle is not writable: its lock {path.name} cannot be created beside it "
                f"({exc.strerror}); copy it somewhere writable or fix the permissions"
            ) from None
        if exc.errno == errno.ELOOP:
            raise BundleError(f"{path}: is a symlink; a bundle's files must be regular files inside it") from None
        raise BundleError(f"{bundle}: cannot open its lock file ({exc.strerror or exc})") from None
    try:
        deadline = time.monotonic() + max(0.0, wait)
        delay = 0.02
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise BundleError(
                        f"{bundle}: this file system cannot lock files ({exc.strerror}); keep bundles on a local disk"
                    ) from None
                if time.monotonic() >= deadline:
                    raise BundleBusy(
                        f"{bundle}: {_holder(fd)} is writing this bundle; try again when it is "
                        "done, or pass --wait SECONDS to queue behind it"
                    ) from None
                time.sleep(delay)
                delay = min(0.25, delay * 1.5)
        stamp = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "operation": operation,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with contextlib.suppress(OSError):  # the note is for messages only; the flock is the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(stamp).encode(), 0)
        _HELD.add(fd)
        yield
    finally:
        _HELD.discard(fd)
        os.close(fd)  # closing the descriptor releases the flock
