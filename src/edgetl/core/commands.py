"""What every ``edgetl`` command does with a failure, shared by the main CLI and the command groups
that live beside their packages (fleet, report, serve): a user mistake is one ``error:`` line and
its exit code, never a traceback; a bug keeps its traceback."""

from __future__ import annotations

import errno
import functools
import sys

import click

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


def handle_errors(fn):
    """Turn EdgetlError into ``error: message`` + its exit code; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgetlError as exc:
            click.echo(f"error: {one_line(exc)}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(130)
        except MemoryError:
            click.echo("error: out of memory; lower EDGETL_MAX_MEGAPIXELS or --batch sizes, or free memory", err=True)
            sys.exit(2)
        except OSError as exc:
            if exc.errno not in ENVIRONMENT_ERRNOS:
                raise
            where = f"{one_line(exc.filename)}: " if exc.filename else ""
            click.echo(f"error: {where}{exc.strerror}; nothing was changed", err=True)
            sys.exit(2)

    return wrapper
