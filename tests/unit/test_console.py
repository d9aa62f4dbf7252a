"""Terminal output: silenced third-party output must not break later logging."""

import logging

from edgetl.core.console import quantizer_output


def test_a_handler_made_while_silenced_keeps_working_afterwards(capfd):
    # NNCF creates its stream handler on first use, which can fall inside a silenced block; a
    # second fit in the same process then logged into a closed file.
    log = logging.getLogger("edgetl-test-silenced")
    log.propagate = False
    with quantizer_output(quiet=True):
        handler = logging.StreamHandler()  # binds to the sys.stderr of this moment
        log.addHandler(handler)
        print("hidden on stdout")
    try:
        log.warning("a later warning")
    finally:
        log.removeHandler(handler)
    out, err = capfd.readouterr()
    assert "hidden on stdout" not in out
    assert "Logging error" not in err and "closed file" not in err
