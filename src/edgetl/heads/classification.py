"""Small classification heads trained on frozen backbone features, in plain numpy.

Three kinds, all of which train and predict with numpy alone, because the same code retrains the
head on the device (no torch, scipy or scikit-learn there):

``linear``
    Multinomial logistic regression with an L2 penalty on standardised features. The default.
``mlp``
    One ReLU hidden layer, L2 on both weight matrices, full-batch Adam from a seeded init.
``prototype``
    Nearest class mean under cosine similarity, with a temperature so probabilities mean something.
    No optimiser, no L2: the cheapest head to retrain and the most robust with few rows per class.

A trained :class:`Head` holds float32 arrays (the feature standardisation included), saves to an
``.npz`` that loads with ``allow_pickle=False``, and exports to a small ONNX graph computing exactly
:meth:`Head.logits`.

Training lives in :mod:`edgetl.heads.training`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from ..core.bundle import write_npz_durably
from ..core.metrics import softmax
from ..errors import BundleError, ConfigError, DataError, require
from . import registry
from .registry import NORM_EPS, GraphBuilder

__all__ = ["HEAD_KINDS", "HeadConfig", "Head", "softmax"]

# The built-in classification kinds (a snapshot at import; kinds registered later are valid too,
# ask :func:`edgetl.heads.registry.names` for the current list).
HEAD_KINDS = registry.names("classify")

_FORMAT = "edgetl-head"
_FORMAT_VERSION = 1
_HEADER_KEY = "_header"
_MIN_OPSET = 13  # MatMul/Relu/Max/Sqrt with today's broadcasting rules; older runtimes lack them


def _kinds_hint() -> str:
    return registry.hint("classify")


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadConfig:
    """Options of :func:`train_head`; validated on construction.

    Attributes:
        kind: One of :data:`HEAD_KINDS`.
        l2: L2 penalty ``(l2 / 2) * ||W||^2`` on top of the mean cross-entropy; ``None`` picks it
            from :data:`edgetl.heads.training.L2_GRID` (validation accuracy, else 3-fold cross-validation). Ignored by
            ``prototype``.
        hidden: Hidden width of the ``mlp`` head.
        epochs: Maximum L-BFGS iterations (``linear``) or full-batch Adam steps (``mlp``).
        lr: Adam learning rate (``mlp`` only).
        seed: Seeds the MLP initialisation and the cross-validation folds.
        balance: Weight each row by ``n / (k * n_c)`` so every class counts equally (``k``
            counting the classes that have rows). The prototype head's class means are per class
            anyway; there it only weighs the temperature fit.
        scaling: ``feature`` (each feature standardised) or ``global`` (centred, one scale for all:
            the features' own geometry); linear and mlp heads.
        calibrate: Fit a temperature on out-of-fold logits and fold it into the head
            (:mod:`edgetl.heads.crossfit`), so a retrained head (``adapt``) stays calibrated.

    Raises:
        ConfigError: on an unknown kind or an out-of-range value.
    """

    kind: str = "linear"
    l2: float | None = None
    hidden: int = 256
    epochs: int = 300
    lr: float = 0.01
    seed: int = 0
    balance: bool = True
    calibrate: bool = False
    scaling: str = "feature"

    def __post_init__(self) -> None:
        if not registry.known(self.kind, "classify"):
            raise ConfigError(f"unknown head kind {self.kind!r}; {_kinds_hint()}")
        number = (int, float, np.integer, np.floating)
        if self.l2 is not None:
            if isinstance(self.l2, bool) or not isinstance(self.l2, number):
                raise ConfigError(f"l2 must be a number >= 0 or None (automatic), got {self.l2!r}")
            if not math.isfinite(self.l2) or self.l2 < 0:
                raise ConfigError(f"l2 must be a finite number >= 0 or None (automatic), got {self.l2!r}")
            object.__setattr__(self, "l2", float(self.l2))
        for name in ("hidden", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        lr_ok = isinstance(self.lr, number) and not isinstance(self.lr, bool)
        if not (lr_ok and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        object.__setattr__(self, "lr", float(self.lr))
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))
        if not isinstance(self.balance, (bool, np.bool_)):
            raise ConfigError(f"balance must be true or false, got {self.balance!r}")
        object.__setattr__(self, "balance", bool(self.balance))
        if self.scaling not in ("feature", "global"):
            raise ConfigError(f"scaling must be 'feature' or 'global', got {self.scaling!r}")
        if not isinstance(self.calibrate, (bool, np.bool_)):
            raise ConfigError(f"calibrate must be true or false, got {self.calibrate!r}")
        object.__setattr__(self, "calibrate", bool(self.calibrate))

    def to_dict(self) -> dict:
        """Return the options as a JSON-serialisable dict (the inverse of :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> HeadConfig:
        """Build a config from a dict such as :meth:`to_dict` wrote; missing keys take defaults.

        Raises:
            ConfigError: if ``d`` is not a dict, has unknown keys, or holds invalid values.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"head config must be a mapping, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"unknown head option(s) {unknown}; valid options: {', '.join(known)}")
        return cls(**d)


# --------------------------------------------------------------------------------------------
# the head
# --------------------------------------------------------------------------------------------


@dataclass
class Head:
    """A trained classification head.

    Attributes:
        kind: One of :data:`HEAD_KINDS`.
        labels: Class names; logit column ``j`` is ``labels[j]``.
        arrays: float32 parameters, the feature standardisation included. ``linear``: ``mean``,
            ``scale`` (d,), ``W`` (d, k), ``b`` (k,); logits = ``((x - mean) / scale) @ W + b``.
            ``mlp``: ``mean``, ``scale``, ``W1`` (d, h), ``b1``, ``W2`` (h, k), ``b2``.
            ``prototype``: ``mean`` (d,), unit-norm class means ``prototypes`` (d, k), the scalar
            ``logit_scale`` and ``b`` (k,); logits = ``logit_scale * cos(x - mean, prototype) + b``
            (``b`` is 0 except for classes without rows).
        meta: JSON-serialisable facts about training: ``l2`` (chosen or given; None for
            prototype), ``l2_search`` (method, metric, grid, scores, chosen), ``train_accuracy``,
            ``val_accuracy`` (when validation rows were given), ``config``, ``n_features``,
            ``n_classes``, ``n_train``, ``class_counts``, ``absent_classes``, and per kind
            ``optimizer`` / ``basis_rank`` or ``logit_scale``.
    """

    kind: str
    labels: list[str]
    arrays: dict[str, np.ndarray]
    meta: dict

    @property
    def n_features(self) -> int:
        """Width ``d`` of the feature vectors this head expects."""
        return int(self.arrays["mean"].shape[0])

    @property
    def n_classes(self) -> int:
        """Number of classes ``k`` (length of :attr:`labels`)."""
        return len(self.labels)

    def _check_input(self, X) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise DataError(
                f"features have shape {X.shape}; this head expects (n, {self.n_features}) "
                "(was it trained on another backbone?)"
            )
        return X.astype(np.float32, copy=False)

    def logits(self, X: np.ndarray) -> np.ndarray:
        """Raw class scores.

        Args:
            X: float32 features of shape ``(n, d)``.

        Returns:
            float32 array of shape ``(n, k)``.

        Raises:
            DataError: if ``X`` is not ``(n, n_features)``.
        """
        return registry.get(self.kind, "classify").logits(self.arrays, self._check_input(X))

    def proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities, the softmax of :meth:`logits`; rows sum to 1."""
        return softmax(self.logits(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Index of the most likely class per row (int64)."""
        return np.argmax(self.logits(X), axis=1).astype(np.int64)

    # ---- persistence ----------------------------------------------------------------------

    def save(self, path) -> None:
        """Write the head to ``path`` as an uncompressed ``.npz`` (atomically: temp file + rename).

        Labels and meta travel as UTF-8 JSON in a uint8 array, so the file holds no object arrays
        and :meth:`load` can refuse pickles.
        """
        path = Path(path)
        header = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "kind": self.kind,
            "labels": list(self.labels),
            "meta": self.meta,
        }
        blob = json.dumps(header, default=_json_default, sort_keys=True).encode("utf-8")
        payload = {name: np.asarray(arr, dtype=np.float32, order="C") for name, arr in self.arrays.items()}
        payload[_HEADER_KEY] = np.frombuffer(blob, dtype=np.uint8)
        write_npz_durably(path, **payload)

    @classmethod
    def from_arrays(cls, kind: str, labels: list[str], arrays: dict, meta: dict | None = None) -> Head:
        """A head from float arrays made elsewhere (a fleet round's merge), checked the way
        :meth:`load` checks a file: a known kind, the arrays it needs with shapes that fit, finite.

        Raises:
            DataError: the arrays do not make a ``kind`` head over ``labels``.
        """
        if not registry.known(kind, "classify"):
            raise DataError(f"head kind {kind!r} is not one of {', '.join(registry.names('classify'))}")
        arrays = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}
        problem = _check_arrays(kind, arrays, len(labels))
        if problem:
            raise DataError(problem)
        return cls(kind=kind, labels=list(labels), arrays=arrays, meta=dict(meta or {}))

    @classmethod
    def load(cls, path) -> Head:
        """Read a head written by :meth:`save` (never unpickles anything).

        Raises:
            BundleError: if the file is missing, unreadable, truncated, not an edgetl head, from a
                newer format version, or its arrays do not fit together.
        """
        if not hasattr(path, "read"):  # a path; a bundle hands the bytes it verified (VerifiedFile)
            path = Path(path)
            if not path.is_file():
                raise BundleError(f"{path}: no such head file")
        try:
            z = np.load(path, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise BundleError(f"{path}: not an edgetl head (a bare .npy array, not an .npz archive)")
            with z:
                raw = {name: z[name] for name in z.files}
        except BundleError:
            raise
        except Exception as exc:  # zipfile / pickle refusal / truncation: all "corrupt" to a user
            raise BundleError(f"{path}: cannot read head file ({type(exc).__name__}: {exc})") from None
        blob = raw.pop(_HEADER_KEY, None)
        if blob is None or blob.dtype != np.uint8 or blob.ndim != 1:
            raise BundleError(f"{path}: not an edgetl head (no '{_HEADER_KEY}' record)")
        try:
            header = json.loads(blob.tobytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise BundleError(f"{path}: head header is not valid JSON (file corrupt?)") from None
        if not isinstance(header, dict) or header.get("format") != _FORMAT:
            found = header.get("format") if isinstance(header, dict) else None
            raise BundleError(f"{path}: not an edgetl head (format {found!r}, expected {_FORMAT!r})")
        version = header.get("version")
        if not isinstance(version, int) or version > _FORMAT_VERSION or version < 1:
            raise BundleError(
                f"{path}: head format version {version!r}; this edgetl reads 1 to {_FORMAT_VERSION} (upgrade edgetl)"
            )
        kind, labels, meta = header.get("kind"), header.get("labels"), header.get("meta")
        if not isinstance(kind, str) or not registry.known(kind, "classify"):
            raise BundleError(f"{path}: unknown head kind {kind!r}; {_kinds_hint()}")
        if not isinstance(labels, list) or not labels or not all(isinstance(s, str) for s in labels):
            raise BundleError(f"{path}: head labels missing or not a list of strings")
        if not isinstance(meta, dict):
            raise BundleError(f"{path}: head meta missing or not an object")
        arrays = {}
        for name, arr in raw.items():
            if not np.issubdtype(arr.dtype, np.floating):
                raise BundleError(f"{path}: head array {name!r} has dtype {arr.dtype}; expected float32")
            arrays[name] = arr.astype(np.float32, copy=False)
        problem = _check_arrays(kind, arrays, len(labels))
        if problem:
            raise BundleError(f"{path}: {problem}")
        return cls(kind=kind, labels=list(labels), arrays=arrays, meta=meta)

    # ---- export ---------------------------------------------------------------------------
    def graph(self, opset: int = 18, ir_version: int | None = None):
        """The head as an ONNX graph to fuse behind a backbone: input ``head/features`` float32
        ``[batch, d]``, output ``probabilities`` ``[batch, k]`` (:meth:`proba`).

        The standardisation stays explicit Sub/Div nodes so the graph does the float32 arithmetic
        of :meth:`logits` in the same order; the prototype head L2-normalises inside the graph.
        Every other name starts with ``head/``, so nothing clashes with the backbone's.

        Raises:
            ConfigError: an opset below 13 (no MatMul/Max broadcasting as used here) or above what
                the installed ``onnx`` knows.
        """
        onnx = require("onnx", extra="base", purpose="building ONNX graphs")
        from onnx import TensorProto, helper, numpy_helper

        newest = onnx.defs.onnx_opset_version()
        if isinstance(opset, bool) or not isinstance(opset, int) or not _MIN_OPSET <= opset <= newest:
            raise ConfigError(f"opset must be an integer from {_MIN_OPSET} to {newest}, got {opset!r}")
        a, g = self.arrays, GraphBuilder(helper, numpy_helper)
        centred = g.node("Sub", ["head/features", g.const("mean", a["mean"])])
        logits = registry.get(self.kind, "classify").graph_logits(a, g, centred, self.n_features)
        inits, nodes = g.inits, g.nodes
        nodes.append(helper.make_node("Softmax", [logits], ["probabilities"], axis=-1, name="head/softmax"))
        graph = helper.make_graph(
            nodes,
            f"edgetl_{self.kind}_head",
            [helper.make_tensor_value_info("head/features", TensorProto.FLOAT, ["batch", self.n_features])],
            [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", self.n_classes])],
            initializer=inits,
        )
        opsets = [helper.make_opsetid("", opset)]
        model = helper.make_model(
            graph,
            opset_imports=opsets,
            producer_name="edgetl",
            doc_string=f"edgetl {self.kind} head; classes: {json.dumps(self.labels)}",
        )
        # The lowest IR version that carries this opset (older device runtimes accept it), unless
        # the backbone it joins has its own.
        model.ir_version = ir_version or helper.find_min_ir_version_for(opsets)
        onnx.checker.check_model(model)
        return model


def _check_arrays(kind: str, arrays: dict, k: int) -> str | None:
    """Return what is wrong with a head's arrays, or None when they fit together."""
    spec = registry.get(kind, "classify").spec
    missing = sorted(set(spec) - set(arrays))
    extra = sorted(set(arrays) - set(spec))
    if missing or extra:
        return f"{kind} head arrays do not match (missing {missing}, unexpected {extra})"
    dims: dict[str, int] = {"k": k}
    for name, shape in spec.items():
        arr = arrays[name]
        if arr.ndim != len(shape):
            return f"head array {name!r} has shape {arr.shape}; expected {len(shape)} dimensions"
        for axis, sym in zip(arr.shape, shape):
            if dims.setdefault(sym, axis) != axis:
                return f"head array {name!r} has shape {arr.shape}, inconsistent with the others ({sym}={dims[sym]})"
        if not np.all(np.isfinite(arr)):
            return f"head array {name!r} holds NaN or infinity"
    return None


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def prototype_logits(X, mean, prototypes, logit_scale, b) -> np.ndarray:
    """Cosine of the centred rows to the unit class means, times the temperature, plus ``b``."""
    centred = X - mean
    sq = np.sum(centred * centred, axis=1, keepdims=True)
    unit = centred / np.sqrt(np.maximum(sq, np.float32(NORM_EPS**2)))
    return (unit @ prototypes) * logit_scale + b
