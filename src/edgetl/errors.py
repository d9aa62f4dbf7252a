"""The few error classes edgetl raises for things a user can fix.

Every message says what was received, what was expected and how to fix it, on one line.
The CLI prints ``error: <message>`` and exits non-zero; it never shows a traceback for these.
Anything that is *not* an :class:`EdgetlError` is a bug in edgetl and keeps its traceback.
"""

from __future__ import annotations


class EdgetlError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code = 2


class DataError(EdgetlError):
    """A dataset, image or CSV manifest is missing, empty or malformed."""


class ConfigError(EdgetlError):
    """An option, target profile or backbone name is invalid."""


class BundleError(EdgetlError):
    """A bundle is missing, tampered with, truncated, foreign or from another format version."""


class BundleBusy(BundleError):
    """Another process is writing the bundle (its writer lock is held); try again or ``--wait``."""

    exit_code = 4


class UnknownVersion(BundleError):
    """A head version was named that the bundle does not hold (the service answers it with 404)."""


class TrustError(BundleError):
    """A bundle or head version is unsigned, wrongly signed, or signed by a key the trust policy
    does not allow for what it did."""

    exit_code = 5


class GateError(EdgetlError):
    """An accuracy gate refused a result (quantization drop, or an on-device update)."""

    exit_code = 3


class MissingDependency(EdgetlError):
    """An optional package is needed for this step; the message names the extra to install."""


def require(module: str, *, extra: str, purpose: str):
    """Import ``module`` or raise :class:`MissingDependency` naming the pip extra that provides it.

    Example:
        >>> np = require("numpy", extra="base", purpose="arrays")
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised where the extra is absent
        raise MissingDependency(
            f"{purpose} needs the Python package '{module.split('.')[0]}' ({exc}); "
            f"install it with: pip install 'edgetl[{extra}]'"
        ) from exc
