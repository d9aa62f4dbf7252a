"""Numbers read from environment variables, checked like options: a value that is not a number,
not finite or out of range is one ConfigError line naming the variable, never a traceback deep
inside whatever used it (``int("abc")``, ``int(float("inf"))``).

numpy-free and torch-free: the device path reads these.
"""

from __future__ import annotations

import math
import os

from ..errors import ConfigError


def env_number(name: str, default: float, *, lo: float, hi: float, integer: bool = False) -> float:
    """``$name`` as a number in ``[lo, hi]`` (``default`` when unset or empty).

    Raises:
        ConfigError: not a number, not finite, not whole where ``integer``, or out of range.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    kind = "a whole number" if integer else "a number"
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(
            f"{name}={raw[:40]!r} is not {kind}; give {kind} from {lo:g} to {hi:g}, or unset it"
        ) from None
    if not math.isfinite(value) or not lo <= value <= hi or (integer and value != int(value)):
        raise ConfigError(f"{name}={raw[:40]!r}: give {kind} from {lo:g} to {hi:g}, or unset it")
    return int(value) if integer else value
