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
    One-class patch heads (:mod:`edgetl.heads.patch`).
``image``
    Image-level one-class heads on pooled features (:mod:`edgetl.heads.oneclass`).
``defect``
    The detector scoring a patch head and an image head together (:mod:`edgetl.heads.defect`).

Fleet merges (:mod:`edgetl.fleet`) are looked up here too (:func:`fleet_merge`): each has a name
(``ridge``, ``linear``, ...), the head kind it produces, and its steps. The fleet registers the
merges whose arithmetic it owns (:func:`register_fleet_merge`); a head kind may also be its own merge
by subclassing :class:`FleetMerge` too and defining its methods.

This module imports no other heads module at import time, so every heads module can import it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError

__all__ = [
    "FAMILIES",
    "FleetMerge",
    "HeadKind",
    "ClassifyKind",
    "register",
    "unregister",
    "get",
    "names",
    "hint",
    "fleet_merge",
    "fleet_merge_names",
    "register_fleet_merge",
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


class ClassifyKind(HeadKind):
    """A classification head kind. The head object is :class:`edgetl.heads.classification.Head`;
    its arrays are float32 and always hold the feature centre ``mean`` (d,).

    Class attributes a kind sets:

    * :attr:`spec`: array name -> shape in symbols ``d`` (features), ``k`` (classes) and any other
      letter the kind wants checked for consistency (``h`` hidden units);
    * :attr:`uses_l2`: whether an L2 penalty is chosen for it (the built-in trainer's L2 search);
    * :attr:`convex`: its loss is convex in its weights (warm starts carry over, L-BFGS applies);
    * :attr:`calibration_keys`: config keys worth reporting next to a cross-fit candidate.
    """

    family = "classify"
    spec: ClassVar[dict[str, tuple[str, ...]]] = {}
    uses_l2: ClassVar[bool] = True
    convex: ClassVar[bool] = False
    calibration_keys: ClassVar[tuple[str, ...]] = ("scaling",)

    # ---- scoring ----------------------------------------------------------------------------
    def logits(self, a: dict, X: np.ndarray) -> np.ndarray:
        """Float32 logits (n, k) of float32 features ``X`` (n, d) under arrays ``a``."""
        raise NotImplementedError

    def graph_logits(self, a: dict, g: GraphBuilder, centred: str, d: int) -> str:
        """Add the nodes computing :meth:`logits` from ``centred`` (features minus ``mean``, the
        graph's first node) and return the logits' name. Same float32 operations in the same order."""
        raise NotImplementedError

    def scale_logits(self, a: dict, s: np.float32) -> dict:
        """Arrays whose logits are ``s`` times those of ``a`` (a temperature folded in)."""
        raise NotImplementedError

    # ---- training ---------------------------------------------------------------------------
    def fit(self, X, y, labels, *, cfg, X_val=None, y_val=None, sample_weight=None):
        """Train a head of this kind; the built-in kinds use :mod:`edgetl.heads.training`."""
        from .training import train_builtin

        return train_builtin(X, y, labels, cfg=cfg, X_val=X_val, y_val=y_val, sample_weight=sample_weight)

    def update(self, head, X, y, *, sample_weight=None):
        """The on-device retrain: the head fitted again, with its own settings, on the device's rows
        (numpy only). ``y`` indexes ``head.labels``."""
        from .classification import HeadConfig

        cfg = HeadConfig.from_dict(dict(head.meta.get("config") or {"kind": self.name}))
        return self.fit(X, y, list(head.labels), cfg=cfg, sample_weight=sample_weight)


# ---- built-in classification kinds ------------------------------------------------------------
def _standardised(a: dict, X: np.ndarray) -> np.ndarray:
    return (X - a["mean"]) / a["scale"]


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


@register
class Linear(ClassifyKind):
    """Multinomial logistic regression with an L2 penalty on standardised features."""

    name = "linear"
    convex = True
    spec = {"mean": ("d",), "scale": ("d",), "W": ("d", "k"), "b": ("k",)}

    def logits(self, a, X):
        return _standardised(a, X) @ a["W"] + a["b"]

    def graph_logits(self, a, g, centred, d):
        std = g.node("Div", [centred, g.const("scale", a["scale"])])
        return g.node("Add", [g.node("MatMul", [std, g.const("W", a["W"])]), g.const("b", a["b"])])

    def scale_logits(self, a, s):
        return {**a, "W": a["W"] * s, "b": a["b"] * s}


@register
class MLP(ClassifyKind):
    """One ReLU hidden layer, L2 on both weight matrices."""

    name = "mlp"
    spec = {
        "mean": ("d",),
        "scale": ("d",),
        "W1": ("d", "h"),
        "b1": ("h",),
        "W2": ("h", "k"),
        "b2": ("k",),
    }

    def logits(self, a, X):
        hidden = np.maximum(_standardised(a, X) @ a["W1"] + a["b1"], np.float32(0))
        return hidden @ a["W2"] + a["b2"]

    def graph_logits(self, a, g, centred, d):
        std = g.node("Div", [centred, g.const("scale", a["scale"])])
        hidden = g.node(
            "Relu", [g.node("Add", [g.node("MatMul", [std, g.const("W1", a["W1"])]), g.const("b1", a["b1"])])]
        )
        return g.node("Add", [g.node("MatMul", [hidden, g.const("W2", a["W2"])]), g.const("b2", a["b2"])])

    def scale_logits(self, a, s):
        return {**a, "W2": a["W2"] * s, "b2": a["b2"] * s}


def prototype_logits(X, mean, prototypes, logit_scale, b) -> np.ndarray:
    """Cosine of the centred rows to the unit class means, times the temperature, plus ``b``."""
    centred = X - mean
    sq = np.sum(centred * centred, axis=1, keepdims=True)
    unit = centred / np.sqrt(np.maximum(sq, np.float32(NORM_EPS**2)))
    return (unit @ prototypes) * logit_scale + b


@register
class Prototype(ClassifyKind):
    """Nearest class mean under cosine similarity, with a temperature; no optimiser, no L2."""

    name = "prototype"
    uses_l2 = False
    calibration_keys = ()
    spec = {"mean": ("d",), "prototypes": ("d", "k"), "logit_scale": (), "b": ("k",)}

    def logits(self, a, X):
        return prototype_logits(X, a["mean"], a["prototypes"], a["logit_scale"], a["b"])

    def graph_logits(self, a, g, centred, d):
        # Squared norm via MatMul with a ones column: avoids ReduceSumSquare, whose `axes` moved
        # from attribute to input in opset 18, so one graph builder serves every opset.
        sq = g.node("MatMul", [g.node("Mul", [centred, centred]), g.const("ones", np.ones((d, 1)))])
        norm = g.node("Sqrt", [g.node("Max", [sq, g.const("eps2", np.array(NORM_EPS**2))])])
        cos = g.node("MatMul", [g.node("Div", [centred, norm]), g.const("prototypes", a["prototypes"])])
        return g.node("Add", [g.node("Mul", [cos, g.const("logit_scale", a["logit_scale"])]), g.const("b", a["b"])])

    def scale_logits(self, a, s):
        return {**a, "logit_scale": (a["logit_scale"] * s).astype(np.float32), "b": a["b"] * s}


# ---- the other families: their head objects hold the kind's name and ask here --------------------
@register
class PatchCore(HeadKind):
    """A memory bank of good patch features; a patch scores its distance to the nearest."""

    name = "patchcore"
    family = "patch"


@register
class PaDiM(HeadKind):
    """A Gaussian per patch position; a patch scores its Mahalanobis distance."""

    name = "padim"
    family = "patch"


@register
class KNN(HeadKind):
    """Image-level: distance of the pooled feature to its nearest good images."""

    name = "knn"
    family = "image"


@register
class Gaussian(HeadKind):
    """Image-level: Mahalanobis distance of the pooled feature to the good images' Gaussian."""

    name = "gaussian"
    family = "image"


@register
class Combined(HeadKind):
    """The defect detector scoring a patch head and an image head together."""

    name = "combined"
    family = "defect"


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
