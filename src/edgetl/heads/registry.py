"""One registry of head kinds: what differs between heads lives in one class per kind.

A head *kind* (``linear``, ``mlp``, ``prototype``, ``padim``, ...) is a :class:`HeadKind` subclass
registered with :func:`register`. The code that trains, scores, exports, saves and merges heads asks
the registry for the kind (:func:`get`) and calls its methods, instead of comparing kind names:
adding a kind is one class, and a name nobody registered fails with the list of valid ones.

Families group the kinds that share a head object:

``classify``
    Classification heads over pooled features (:class:`edgetl.heads.classification.Head`). The
    kind owns its arrays' shapes (:attr:`HeadKind.spec`), its numpy logits, the ONNX nodes computing
    the same logits, the way a temperature is folded into it, how it is fitted and re-fitted on the
    device, and the fleet merges that produce it.
``patch``
    One-class patch heads (:class:`edgetl.heads.patch.AnomalyHead`): the kind fits and updates the
    head, computes squared patch distances in numpy and as ONNX nodes, and its held-out scores.
``image``
    Image-level one-class heads on pooled features (:class:`edgetl.heads.oneclass.ImageHead`): fit,
    update, scoring constants, scores and their ONNX nodes.
``defect``
    Ways a defect head (:class:`edgetl.heads.defect.DefectHead`) scores: ``combined`` (both parts)
    and ``patch`` (its patch part alone); an image kind scores with the image part alone. Each
    says which parts it uses (:attr:`HeadKind.parts`).

Saved heads keep their format: a head file names its kind as before, and loading looks it up here.

Fleet merges (:mod:`edgetl.fleet`) are looked up here too (:func:`fleet_merge`): each has a name
(``ridge``, ``linear``, ...), the head kind it produces, and its steps. The fleet registers the
merges whose arithmetic it owns (:func:`register_fleet_merge`); a head kind may also be its own merge
by subclassing :class:`FleetMerge` too and defining its methods.

This module imports no other heads module, so every heads module can import it; the built-in kinds
live in :mod:`.kinds`, which imports the heads they drive and registers them when the package loads.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError

__all__ = [
    "FAMILIES",
    "NORM_EPS",
    "FleetMerge",
    "GraphBuilder",
    "HeadKind",
    "fleet_merge",
    "fleet_merge_names",
    "get",
    "hint",
    "known",
    "names",
    "parts",
    "register",
    "register_fleet_merge",
    "unregister",
]

FAMILIES = ("classify", "patch", "image", "defect")

# Rows whose centred norm is below this are treated as the zero vector (cosine 0 to everything)
# rather than amplified noise; the ONNX graph applies the same floor.
NORM_EPS = 1e-6

_KINDS: dict[str, HeadKind] = {}


class HeadKind:
    """One head kind. Subclasses set :attr:`name` and :attr:`family` and override what they do."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    # What a defect head scoring as this kind uses of its two parts ("patch", "image"); () for a
    # kind that is no defect-head mode.
    parts: ClassVar[tuple[str, ...]] = ()

    def __repr__(self) -> str:
        return f"<head kind {self.name} ({self.family})>"


class GraphBuilder:
    """What a kind's :meth:`ClassifyKind.graph_logits` uses to add ONNX nodes: float32 constants and
    nodes named under ``head/``, so nothing clashes with the backbone's names."""

    def __init__(self, helper, numpy_helper):
        self._helper, self._numpy_helper = helper, numpy_helper
        self.inits: list = []
        self.nodes: list = []

    def const(self, name: str, value) -> str:
        arr = np.asarray(value, dtype=np.float32, order="C")
        self.inits.append(self._numpy_helper.from_array(arr, f"head/{name}"))
        return f"head/{name}"

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = f"head/{op.lower()}_{len(self.nodes)}"
        self.nodes.append(self._helper.make_node(op, inputs, [out], name=f"head/{op}_{len(self.nodes)}", **attrs))
        return out


def register(cls: type[HeadKind]) -> type[HeadKind]:
    """Register head kind ``cls`` (a class decorator); its :attr:`HeadKind.name` must be new.

    Raises:
        ConfigError: no name, an unknown family, or the name taken by another class.
    """
    name, family = getattr(cls, "name", ""), getattr(cls, "family", "")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"head kind class {cls.__name__} has no name")
    if family not in FAMILIES:
        raise ConfigError(f"head kind {name!r}: family {family!r} is not one of {', '.join(FAMILIES)}")
    old = _KINDS.get(name)
    if old is not None and type(old) is not cls:
        raise ConfigError(f"head kind {name!r} is registered already (by {type(old).__name__})")
    _KINDS[name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove a registered kind (a kind a test registered for itself); unknown names are ignored."""
    _KINDS.pop(name, None)
    _MERGES.pop(name, None)


def names(family: str | None = None) -> tuple[str, ...]:
    """The registered kinds' names, in registration order (of ``family`` only when given)."""
    return tuple(n for n, k in _KINDS.items() if family is None or k.family == family)


def hint(family: str | None = None) -> str:
    return "valid kinds: " + ", ".join(names(family))


def get(name: Any, family: str | None = None) -> Any:
    """The registered kind called ``name`` (of ``family`` when given).

    Raises:
        ConfigError: no such kind (the message lists the valid ones).
    """
    kind = _KINDS.get(name) if isinstance(name, str) else None
    if kind is None or (family is not None and kind.family != family):
        what = f"{family} head kind" if family else "head kind"
        raise ConfigError(f"unknown {what} {name!r}; {hint(family)}")
    return kind


def known(name: Any, family: str | None = None) -> bool:
    """Whether ``name`` is a registered kind (of ``family`` when given)."""
    kind = _KINDS.get(name) if isinstance(name, str) else None
    return kind is not None and (family is None or kind.family == family)


def parts(name: str) -> tuple[str, ...]:
    """The parts a defect head scoring as ``name`` uses (() when ``name`` is no defect-head mode)."""
    return _KINDS[name].parts if known(name) else ()


# ---- fleet merges -------------------------------------------------------------------------------
class FleetMerge:
    """A fleet merge: how a round of devices' summaries becomes one head (:mod:`edgetl.fleet`).

    ``name`` is what a round is asked for (``--kind``), ``head_kind`` the registered kind of the
    head it returns, ``anomaly`` whether devices answer from patch features with their own head as
    template. The methods (the merger passes itself, holding the round's settings and ``state``):

    * ``fleet_steps(merger) -> list[str]``: the round's step names, in order;
    * ``fleet_broadcast(merger, name, index) -> (config, arrays)``: what the server sends;
    * ``fleet_respond(step, data, template) -> Summary``: a device's answer (numpy, its own data);
    * ``fleet_check(summary, step, who, ctx)``: refuse (``FleetError``) a summary that does not fit;
    * ``fleet_absorb(merger, step, ok)``: fold the valid summaries into ``merger.state``;
    * ``fleet_result(merger, provenance) -> head``: the merged head.

    A head kind that is also a :class:`FleetMerge` (a subclass of both) is its own merge, under its
    own name.
    """

    name: ClassVar[str] = ""
    head_kind: ClassVar[str] = ""
    anomaly: ClassVar[bool] = False

    def fleet_expected_arrays(self, step) -> set | None:
        """The array names a summary for ``step`` must hold exactly (None: the check decides)."""
        return None

    def fleet_geometry(self, template) -> dict:
        """Shapes of the server's own head that the checks compare summaries with."""
        return {}


_MERGES: dict[str, Any] = {}


def register_fleet_merge(cls: type[FleetMerge]) -> type[FleetMerge]:
    """Register fleet merge ``cls`` (a class decorator); its ``head_kind`` must be registered."""
    if not cls.name:
        raise ConfigError(f"fleet merge class {cls.__name__} has no name")
    get(cls.head_kind)
    _MERGES[cls.name] = cls()
    return cls


def _own_merge(kind: HeadKind) -> bool:
    return isinstance(kind, FleetMerge)


def fleet_merge_names() -> tuple[str, ...]:
    """Every merge a fleet round can run: the registered merges, then the kinds that merge themselves."""
    return (*_MERGES, *(n for n, k in _KINDS.items() if n not in _MERGES and _own_merge(k)))


def fleet_merge(name: Any) -> Any:
    """The fleet merge called ``name``.

    Raises:
        ConfigError: no such merge (the message lists the valid ones).
    """
    merge = _MERGES.get(name) if isinstance(name, str) else None
    if merge is None and isinstance(name, str) and name in _KINDS and _own_merge(_KINDS[name]):
        merge = _KINDS[name]
    if merge is None:
        raise ConfigError(f"head kind {name!r} has no fleet merge; choose one of {', '.join(fleet_merge_names())}")
    return merge
