"""Built-in example datasets, made offline and deterministically (``edgetl example NAME OUT``).

* ``surfaces``: eight classes of material photographs (:func:`edgetl.datasets.images.make_surfaces`);
* ``defects``: good textures and synthetic defects with masks, MVTec layout
  (:func:`edgetl.datasets.images.make_defects`);
* ``tickets``: maintenance tickets in five classes (:func:`edgetl.datasets.tickets.make_tickets`).
"""

from __future__ import annotations

import inspect

from ..errors import ConfigError
from .images import make_defects, make_surfaces
from .tickets import make_tickets

EXAMPLES = {"surfaces": make_surfaces, "defects": make_defects, "tickets": make_tickets}


def make_example(name: str, out_dir, *, seed: int = 0, force: bool = False, **options) -> dict:
    """Build the example dataset ``name`` into ``out_dir``; ``options`` go to its maker.

    Raises:
        ConfigError: ``name`` is not one of :data:`EXAMPLES`, or an option is invalid.
        DataError: ``out_dir`` is not empty and ``force`` is not set.
    """
    if name not in EXAMPLES:
        raise ConfigError(f"unknown example {name!r}; choose one of: {', '.join(sorted(EXAMPLES))}")
    maker = EXAMPLES[name]
    try:
        inspect.signature(maker).bind(out_dir, seed=seed, force=force, **options)
    except TypeError as exc:
        allowed = [p for p in inspect.signature(maker).parameters if p not in ("out", "out_dir", "seed", "force")]
        raise ConfigError(f"example {name!r}: {exc}; its options are {', '.join(allowed)}") from None
    return maker(out_dir, seed=seed, force=force, **options)
