"""Fleet learning: one head that knows what every device learned, without moving images.

Engine-free core (numpy only): :mod:`edgetl.fleet.summaries` (what a device sends for each head
kind, how the server checks and merges it), :mod:`edgetl.fleet.ridge` (a closed-form ridge head
that produces edgetl's ``linear`` arrays), :mod:`edgetl.fleet.device` (a device's summaries and the
gate that accepts or refuses a global head as a new version) and :mod:`edgetl.fleet.server` (a
round for a server bundle, and its new version). :mod:`edgetl.fleet.flower` runs rounds on Flower
(``pip install 'edgetl[fleet]'``; simulation: ``'edgetl[fleet-sim]'``), :mod:`edgetl.fleet.cli` is
the ``edgetl fleet`` command group. Every call into the rest of edgetl goes through
:mod:`edgetl.fleet._edgetl`.
"""

# The fleet's own merges register with edgetl's head-kind registry when the package loads, before
# anything here asks for one (every fleet module is imported after this package).
from . import merges  # noqa: F401
from ._edgetl import FleetError, fleet_merge_names
from .device import Device
from .merger import Merger, run_local
from .server import FleetRound, run_round
from .summaries import LocalData, Summary, check_summary, respond

# The merges a round can run when this package is imported (head kinds registered later that merge
# themselves are valid too: edgetl.heads.registry.fleet_merge_names()).
KINDS = fleet_merge_names()

__all__ = [
    "KINDS",
    "Device",
    "FleetError",
    "FleetRound",
    "LocalData",
    "Merger",
    "Summary",
    "check_summary",
    "respond",
    "run_local",
    "run_round",
]
