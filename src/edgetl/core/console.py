"""What the user sees on the terminal while edgetl works: status lines, progress bars, and where
the third-party libraries' own output goes. Everything here writes to stderr (stdout carries
``--json``), and nothing at all with ``--quiet``, which reaches the library as the edgetl
logger's level (the CLI sets ERROR) or as an explicit ``quiet``."""

from __future__ import annotations

import contextlib
import io
import logging
import sys


def quiet_requested(quiet: bool = False) -> bool:
    return quiet or not logging.getLogger("edgetl").isEnabledFor(logging.WARNING)


def status(message: str, *, quiet: bool = False) -> None:
    """One line on stderr saying what a long step is doing."""
    if not quiet_requested(quiet):
        print(f"{message} ...", file=sys.stderr, flush=True)


def progress(total: int, *, desc: str, quiet: bool):
    """A tqdm bar on a terminal; nothing when piped, in CI, or with --quiet."""
    from tqdm import tqdm

    disable = quiet_requested(quiet) or not sys.stderr.isatty() or total == 0
    return tqdm(total=total, desc=desc, unit="img", disable=disable, leave=False, file=sys.stderr)


class _Discard(io.TextIOBase):
    """A stream that drops what it is given and is never closed: a logging handler a library
    creates while its output is silenced keeps this stream, and a closed devnull file there made
    every later log line of a second in-process fit raise "I/O operation on closed file"."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)


_DISCARD = _Discard()


@contextlib.contextmanager
def quantizer_output(quiet: bool = False):
    """Where NNCF's and Optimum's progress bars go: stderr (stdout carries ``--json``), or nowhere
    with ``--quiet``."""
    if quiet_requested(quiet):
        with contextlib.redirect_stdout(_DISCARD), contextlib.redirect_stderr(_DISCARD):
            yield
    else:
        with contextlib.redirect_stdout(sys.stderr):
            yield


def one_line(text) -> str:
    """Text for one line of output: control characters (a newline in a file name or a label) are
    escaped, so no input can forge or break a line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def clip(text, limit: int) -> str:
    """``text`` on one line, at most ``limit`` characters: cut at a word boundary with an ellipsis,
    so a shortened message never ends mid-word."""
    text = one_line(text)
    if len(text) <= limit:
        return text
    cut = text[: max(1, limit - 1)]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:") + "…"


# A path or label printed in a table.
safe = one_line
