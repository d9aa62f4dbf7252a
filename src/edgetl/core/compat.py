"""What differs between the Pythons a device may run (3.10 on JetPack 6 / Ubuntu 22.04 up to 3.13).

``tomllib`` joined the standard library in 3.11; on 3.10 the ``tomli`` package (same API, the
code it was taken from) stands in, installed by the ``python_version < "3.11"`` dependency.
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised by the device-Python test on a 3.10 interpreter
    import tomli as tomllib

__all__ = ["tomllib"]
