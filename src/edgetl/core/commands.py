"""What every ``edgetl`` command does with a failure, shared by the main CLI and the command groups
that live beside their packages (fleet, report, serve): a user mistake is one ``error:`` line and
its exit code, never a traceback; a bug keeps its traceback.

No click here (this is the bottom layer): the lines go to stderr directly, so any command-line
front end, click's or another, gets the same behaviour."""

from __future__ import annotations

import errno
import functools
import sys

from ..errors import EdgetlError
from .console import one_line

# OS errors that are the machine's, not edgetl's: a full disk, a file-size limit, a read-only or
# vanished folder. They get one line too; anything else is a bug and keeps its traceback.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EFBIG,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EBUSY,
    errno.ENOENT,
    errno.EIO,
    errno.ENAMETOOLONG,
    # a folder where a file belongs (or the reverse), e.g. a folder named heads/v2.npz
    errno.EISDIR,
    errno.ENOTDIR,
}


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def handle_errors(fn):
    """Turn EdgetlError into ``error: message`` + its exit code; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgetlError as exc:
            _say(f"error: {one_line(exc)}")
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            _say("interrupted; nothing was written")
            sys.exit(130)
        except MemoryError:
            _say("error: out of memory; lower EDGETL_MAX_MEGAPIXELS or --batch sizes, or free memory")
            sys.exit(2)
        except OSError as exc:
            if exc.errno not in ENVIRONMENT_ERRNOS:
                raise
            where = f"{one_line(exc.filename)}: " if exc.filename else ""
            _say(f"error: {where}{exc.strerror}; nothing was changed")
            sys.exit(2)

    return wrapper
