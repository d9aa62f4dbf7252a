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

Two ideas keep training fast on a Raspberry-Pi-class CPU:

* **Row-space basis.** With an L2 penalty the optimal first-layer weights lie in the span of the
  training rows: a component orthogonal to every row changes no training output and only adds
  penalty. One eigendecomposition of the n x n Gram matrix (or the d x d covariance when n >= d)
  gives orthogonal coordinates ``Z = X_std @ proj`` of width ``r <= min(n, d)``. The optimiser then
  works on ``r`` columns instead of ``d`` (500 instead of 1280 for a typical set), and the same
  basis serves every fold and every penalty of the automatic L2 search, because fold rows are a
  subset of all rows.
* **Preconditioned L-BFGS with warm starts.** In that basis the data term's curvature is nearly
  diagonal (the columns of ``Z`` are orthogonal), so scaling each coordinate by its curvature
  estimate makes the problem well conditioned and L-BFGS converges in tens of iterations; the L2
  path is walked from strong to weak penalty, each fit starting from the previous solution.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from ..core.bundle import write_npz_durably
from ..errors import BundleError, ConfigError, DataError, require

__all__ = ["HEAD_KINDS", "HeadConfig", "Head", "train_head", "softmax", "probability_graph", "L2_GRID", "MLP_L2_GRID"]

HEAD_KINDS = ("linear", "mlp", "prototype")

# One value per decade from "barely regularised" to "close to nearest-class-mean". The penalty is
# (l2 / 2) * ||W||^2 added to the *mean* (weighted) cross-entropy, so it does not scale with n;
# on standardised backbone features the useful optimum sits between 1e-3 and 1 in practice, and
# decade spacing is as fine as accuracy on a few hundred validation rows can resolve.
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
# The MLP's penalty acts on two stacked weight matrices, so it bites much harder than on a linear
# head: from l2 = 1 up, it flattens the network to chance. Its grid stops there, which also keeps
# the search (one Adam run per candidate and fold) affordable.
MLP_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
# Used when there are too few rows (or classes) for a 3-fold search to mean anything.
_DEFAULT_L2 = 1e-2
_CV_FOLDS = 3
_MIN_ROWS_FOR_CV = 2 * _CV_FOLDS

_FORMAT = "edgetl-head"
_FORMAT_VERSION = 1
_HEADER_KEY = "_header"
_MIN_OPSET = 13  # MatMul/Relu/Max/Sqrt with today's broadcasting rules; older runtimes lack them

# A class with no training rows gets zero weights and a bias this far below the lowest training
# logit of any present class: "very unlikely", yet bounded so the number stays friendly to later
# float16 / int8 handling of the fused model.
_ABSENT_MARGIN = 30.0
# Rows whose centred norm is below this are treated as the zero vector (cosine 0 to everything)
# rather than amplified noise; the ONNX graph applies the same floor.
_NORM_EPS = 1e-6
# Eigen-directions of the training features weaker than this fraction of the strongest are
# dropped: their curvature is far below the smallest penalty in the grid, so their optimal weight
# is ~0, and dividing by their tiny singular values would only amplify rounding error.
_RANK_RTOL = 1e-6
# Curvature of the softmax cross-entropy per unit of squared feature, used for the diagonal
# preconditioner: p(1 - p) is at most 1/4 and shrinks as predictions sharpen; 1/4 errs on the
# side of smaller (safe) steps, and L-BFGS's own scaling corrects the rest after one iteration.
_CURVATURE = 0.25
# L-BFGS stops when every preconditioned gradient entry is below this. Candidates of the L2
# search only need the right *predictions*, so they stop early; the fit that ships is polished
# (warm-started from the search) to a tolerance where the weights agree with a tight reference
# solver to <1% even at the weakest penalty.
_SEARCH_GTOL = 1e-4
_FINAL_GTOL = 1e-6

# Bounds of the prototype temperature. Cosines live in [-1, 1], so logits live in [-s, s]: below 1
# every probability is near uniform, above ~30 float32 softmax saturates to one-hot and the
# probabilities stop carrying information. Inside the bounds s is fitted to leave-one-out cosines.
_PROTO_SCALE_MIN = 1.0
_PROTO_SCALE_MAX = 30.0
_PROTO_SCALE_DEFAULT = 10.0

# Arrays each kind needs, with their shapes in terms of d (features), k (classes), h (hidden).
_SPECS: dict[str, dict[str, tuple[str, ...]]] = {
    "linear": {"mean": ("d",), "scale": ("d",), "W": ("d", "k"), "b": ("k",)},
    "mlp": {
        "mean": ("d",),
        "scale": ("d",),
        "W1": ("d", "h"),
        "b1": ("h",),
        "W2": ("h", "k"),
        "b2": ("k",),
    },
    "prototype": {"mean": ("d",), "prototypes": ("d", "k"), "logit_scale": (), "b": ("k",)},
}


def _kinds_hint() -> str:
    return "valid kinds: " + ", ".join(HEAD_KINDS)


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadConfig:
    """Options of :func:`train_head`; validated on construction.

    Attributes:
        kind: One of :data:`HEAD_KINDS`.
        l2: L2 penalty ``(l2 / 2) * ||W||^2`` on top of the mean cross-entropy; ``None`` picks it
            from :data:`L2_GRID` (validation accuracy, else 3-fold cross-validation). Ignored by
            ``prototype``.
        hidden: Hidden width of the ``mlp`` head.
        epochs: Maximum L-BFGS iterations (``linear``) or full-batch Adam steps (``mlp``).
        lr: Adam learning rate (``mlp`` only).
        seed: Seeds the MLP initialisation and the cross-validation folds.
        balance: Weight each row by ``n / (k * n_c)`` so every class counts equally (``k``
            counting the classes that have rows). The prototype head's class means are per class
            anyway; there it only weighs the temperature fit.

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

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
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

    def to_dict(self) -> dict:
        """Return the options as a JSON-serialisable dict (the inverse of :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
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


def softmax(z: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis; keeps a floating input's dtype.

    Args:
        z: Logits of any shape, classes on the last axis.

    Returns:
        Probabilities of the same shape; each row sums to 1.
    """
    z = np.asarray(z)
    if not np.issubdtype(z.dtype, np.floating):
        z = z.astype(np.float64)
    e = np.exp(z - np.max(z, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


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
        X = self._check_input(X)
        a = self.arrays
        if self.kind == "prototype":
            return _prototype_logits(X, a["mean"], a["prototypes"], a["logit_scale"], a["b"])
        Xs = (X - a["mean"]) / a["scale"]
        if self.kind == "linear":
            return Xs @ a["W"] + a["b"]
        hidden = np.maximum(Xs @ a["W1"] + a["b1"], np.float32(0))
        return hidden @ a["W2"] + a["b2"]

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
    def load(cls, path) -> "Head":
        """Read a head written by :meth:`save` (never unpickles anything).

        Raises:
            BundleError: if the file is missing, unreadable, truncated, not an edgetl head, from a
                newer format version, or its arrays do not fit together.
        """
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
                f"{path}: head format version {version!r}; this edgetl reads 1 to {_FORMAT_VERSION} "
                "(upgrade edgetl)"
            )
        kind, labels, meta = header.get("kind"), header.get("labels"), header.get("meta")
        if kind not in HEAD_KINDS:
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

    def to_onnx(self, *, input_name: str = "features", output_name: str = "logits", opset: int = 17):
        """Export :meth:`logits` as a standalone ONNX graph (no softmax: the caller appends it).

        Input is float32 ``[batch, d]`` with a symbolic ``batch`` dimension, output float32
        ``[batch, k]``. The standardisation is kept as explicit Sub/Div nodes so the graph does the
        same float32 arithmetic, in the same order, as :meth:`logits`. The prototype head
        L2-normalises inside the graph. Initialiser and node names start with ``head/`` so the
        graph can be merged behind a backbone without clashes.

        Args:
            input_name: Name of the graph input.
            output_name: Name of the graph output.
            opset: ONNX default-domain opset, 13 up to what the installed ``onnx`` knows.

        Returns:
            A checked ``onnx.ModelProto``.

        Raises:
            ConfigError: on a bad opset or names.
            MissingDependency: if ``onnx`` is not installed.
        """
        onnx = require("onnx", extra="train", purpose="exporting a head to ONNX")
        from onnx import TensorProto, helper, numpy_helper

        newest = onnx.defs.onnx_opset_version()
        if isinstance(opset, bool) or not isinstance(opset, int) or not _MIN_OPSET <= opset <= newest:
            raise ConfigError(f"opset must be an integer from {_MIN_OPSET} to {newest}, got {opset!r}")
        if not input_name or not output_name or input_name == output_name:
            raise ConfigError(
                "input_name and output_name must be two different non-empty names, "
                f"got {input_name!r}, {output_name!r}"
            )
        a = self.arrays
        inits = []
        nodes = []

        def const(name: str, value: np.ndarray) -> str:
            full = f"head/{name}"
            inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32, order="C"), full))
            return full

        def node(op: str, inputs: list[str], out: str | None = None) -> str:
            out = out or f"head/{op.lower()}_{len(nodes)}"
            nodes.append(helper.make_node(op, inputs, [out], name=f"head/{op}_{len(nodes)}"))
            return out

        centred = node("Sub", [input_name, const("mean", a["mean"])])
        if self.kind == "prototype":
            d = self.n_features
            # Squared norm via MatMul with a ones column: avoids ReduceSumSquare, whose `axes`
            # moved from attribute to input in opset 18, so one graph builder serves every opset.
            sq = node("MatMul", [node("Mul", [centred, centred]), const("ones", np.ones((d, 1)))])
            norm = node("Sqrt", [node("Max", [sq, const("eps2", np.array(_NORM_EPS**2))])])
            cos = node("MatMul", [node("Div", [centred, norm]), const("prototypes", a["prototypes"])])
            scaled = node("Mul", [cos, const("logit_scale", a["logit_scale"])])
            node("Add", [scaled, const("b", a["b"])], output_name)
        else:
            std = node("Div", [centred, const("scale", a["scale"])])
            if self.kind == "linear":
                node("Add", [node("MatMul", [std, const("W", a["W"])]), const("b", a["b"])], output_name)
            else:
                pre = node("Add", [node("MatMul", [std, const("W1", a["W1"])]), const("b1", a["b1"])])
                hidden = node("Relu", [pre])
                out = node("MatMul", [hidden, const("W2", a["W2"])])
                node("Add", [out, const("b2", a["b2"])], output_name)
        graph = helper.make_graph(
            nodes,
            f"edgetl_{self.kind}_head",
            [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", self.n_features])],
            [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", self.n_classes])],
            initializer=inits,
        )
        opsets = [helper.make_opsetid("", opset)]
        model = helper.make_model(
            graph,
            opset_imports=opsets,
            producer_name="edgetl",
            doc_string=f"edgetl {self.kind} head over {self.n_features} features; classes: "
            + json.dumps(self.labels),
        )
        # The lowest IR version that can carry this opset, so older device runtimes accept it.
        model.ir_version = helper.find_min_ir_version_for(opsets)
        onnx.checker.check_model(model)
        return model


def _prototype_logits(X, mean, prototypes, logit_scale, b) -> np.ndarray:
    centred = X - mean
    sq = np.sum(centred * centred, axis=1, keepdims=True)
    unit = centred / np.sqrt(np.maximum(sq, np.float32(_NORM_EPS**2)))
    return (unit @ prototypes) * logit_scale + b


def _check_arrays(kind: str, arrays: dict, k: int) -> str | None:
    """Return what is wrong with a head's arrays, or None when they fit together."""
    spec = _SPECS[kind]
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
                return (
                    f"head array {name!r} has shape {arr.shape}, "
                    f"inconsistent with the others ({sym}={dims[sym]})"
                )
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


# --------------------------------------------------------------------------------------------
# training: shared pieces
# --------------------------------------------------------------------------------------------


def _as_features(X, name: str) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise DataError(f"{name} must be a non-empty 2-D array (n, d), got shape {X.shape}")
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise DataError(f"{name} must hold numbers, got dtype {X.dtype}")
    X = X.astype(np.float32, copy=False)
    if not np.all(np.isfinite(X)):
        raise DataError(f"{name} holds NaN or infinity (a broken feature extraction?)")
    return X


def _as_targets(y, n: int, k: int, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{name} must be a 1-D array of {n} class indices, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= k):
        raise DataError(f"{name} holds class indices outside [0, {k}) (labels has {k} entries)")
    return y


def _class_weights(y: np.ndarray, k: int, balance: bool, sample_weight: np.ndarray | None) -> np.ndarray:
    """Per-row weights: ``n / (k_present * n_c)`` when balancing, times any sample weights."""
    n = y.shape[0]
    w = np.ones(n, dtype=np.float64)
    if balance:
        counts = np.bincount(y, minlength=k).astype(np.float64)
        present = counts > 0
        per_class = np.zeros(k)
        # k counts only classes that have rows, so the weights still average to 1.
        per_class[present] = n / (present.sum() * counts[present])
        w = per_class[y]
    if sample_weight is not None:
        w = w * sample_weight
    return w


def _weighted_score(y_true: np.ndarray, y_pred: np.ndarray, k: int, balance: bool, sample_weight) -> float:
    """Accuracy, class-balanced (mean per-class recall) when training is balanced.

    Scoring the L2 candidates the way the objective weighs rows keeps the search from preferring a
    penalty that simply favours the big classes.
    """
    w = _class_weights(y_true, k, balance, sample_weight)
    total = w.sum()
    if total <= 0:
        return 0.0
    return float(np.sum(w * (y_true == y_pred)) / total)


class _Basis:
    """Orthogonal coordinates of the row space of the standardised training features.

    ``Z = Xs @ proj`` has orthogonal columns with squared norms ``lam`` (the eigenvalues of the
    Gram / covariance matrix); weights ``Wz`` on ``Z`` become ``proj @ Wz`` on ``Xs``.
    """

    def __init__(self, Xs: np.ndarray):
        n, d = Xs.shape
        X64 = Xs.astype(np.float64)
        # Decompose whichever of the Gram (n x n) or covariance (d x d) matrix is smaller.
        gram = X64 @ X64.T if n < d else X64.T @ X64
        lam, vec = np.linalg.eigh(gram)
        if not lam[-1] > 0:  # every feature constant over the training rows: nothing to learn from
            self.Z = np.zeros((n, 1), dtype=np.float32)
            self.proj = np.zeros((d, 1), dtype=np.float32)
            self.lam = np.zeros(1)
            return
        keep = lam > _RANK_RTOL * lam[-1]
        lam, vec = lam[keep], vec[:, keep]
        if n < d:
            root = np.sqrt(lam)
            self.Z = (vec * root).astype(np.float32)
            self.proj = (X64.T @ (vec / root)).astype(np.float32)
        else:
            self.proj = vec.astype(np.float32)
            self.Z = Xs @ self.proj
        self.lam = lam

    @property
    def rank(self) -> int:
        return int(self.lam.shape[0])


def _stratified_folds(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index per row; each class is shuffled (seeded) and dealt round-robin across folds."""
    rng = np.random.default_rng(seed)
    fold = np.empty(y.shape[0], dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(idx.shape[0])]
        # Continue dealing where the previous class stopped, so fold sizes stay within one row.
        fold[idx] = (np.arange(idx.shape[0]) + offset) % folds
        offset = (offset + idx.shape[0]) % folds
    return fold


def _absent_bias(train_logits: np.ndarray) -> float:
    low = float(np.min(train_logits)) if train_logits.size else 0.0
    return math.floor(low) - _ABSENT_MARGIN


# --------------------------------------------------------------------------------------------
# training: linear (preconditioned L-BFGS)
# --------------------------------------------------------------------------------------------


def _lbfgs(fun, x0: np.ndarray, *, max_iter: int, gtol: float, memory: int = 10):
    """Minimise a smooth convex ``fun(x) -> (f, grad)`` with L-BFGS and Armijo backtracking.

    Written here because the device has no scipy. The problems are convex and preconditioned, so
    a unit step is almost always accepted and a backtracking (rather than Wolfe) search suffices;
    pairs with non-positive curvature are simply not stored.

    Returns:
        ``(x, iterations, converged)``.
    """
    x = x0.copy()
    f, g = fun(x)
    s_hist: list[np.ndarray] = []
    y_hist: list[np.ndarray] = []
    rho_hist: list[float] = []
    for it in range(max_iter):
        if np.max(np.abs(g)) <= gtol:
            return x, it, True
        q = g.copy()
        alphas = []
        for s, yv, rho in zip(reversed(s_hist), reversed(y_hist), reversed(rho_hist)):
            a = rho * float(s @ q)
            alphas.append(a)
            q -= a * yv
        gamma = float(s_hist[-1] @ y_hist[-1]) / float(y_hist[-1] @ y_hist[-1]) if s_hist else 1.0
        r = gamma * q
        for s, yv, rho, a in zip(s_hist, y_hist, rho_hist, reversed(alphas)):
            r += (a - rho * float(yv @ r)) * s
        direction = -r
        slope = float(g @ direction)
        if not slope < 0:  # not a descent direction: forget the history, use the gradient
            s_hist.clear(), y_hist.clear(), rho_hist.clear()
            direction, slope = -g, -float(g @ g)
        step = 1.0
        for _ in range(30):
            x_new = x + step * direction
            f_new, g_new = fun(x_new)
            if f_new <= f + 1e-4 * step * slope:
                break
            step *= 0.5
        else:  # no measurable decrease left: converged as far as float arithmetic can tell
            return x, it, True
        s, yv = x_new - x, g_new - g
        sy = float(s @ yv)
        if sy > 1e-12 * float(yv @ yv):
            s_hist.append(s), y_hist.append(yv), rho_hist.append(1.0 / sy)
            if len(s_hist) > memory:
                s_hist.pop(0), y_hist.pop(0), rho_hist.pop(0)
        decrease = f - f_new
        x, f, g = x_new, f_new, g_new
        if decrease <= 1e-12 * max(1.0, abs(f)):
            return x, it + 1, True
    return x, max_iter, bool(np.max(np.abs(g)) <= gtol)


def _fit_linear(Z, y, w, kp, l2, max_iter, gtol, init=None):
    """Multinomial logistic regression on basis coordinates ``Z`` (n x r) for ``kp`` classes.

    Minimises ``sum_i w_i * CE_i + (l2 / 2) ||Wz||^2`` (``w`` sums to 1); the intercept is not
    penalised. Returns ``(Wz, b, iterations, converged)`` in float64.
    """
    n, r = Z.shape
    wcol = w.astype(np.float64)
    # Diagonal curvature estimate per coordinate -> variable scaling (see module docstring).
    col_sq = (wcol @ (Z.astype(np.float64) ** 2)) if n else np.zeros(r)
    D = 1.0 / np.sqrt(_CURVATURE * col_sq + l2 + 1e-12)
    Db = 1.0 / math.sqrt(_CURVATURE)
    rows = np.arange(n)
    rk = r * kp

    def fun(theta):
        Wz = theta[:rk].reshape(r, kp) * D[:, None]
        b = theta[rk:] * Db
        # The big products run in float32 (twice the BLAS speed, ample precision for accuracy);
        # the log-sum-exp and the sums that L-BFGS compares run in float64.
        L = (Z @ Wz.astype(np.float32)).astype(np.float64) + b
        m = L.max(axis=1, keepdims=True)
        E = np.exp(L - m)
        se = E.sum(axis=1, keepdims=True)
        lse = m[:, 0] + np.log(se[:, 0])
        f = float(wcol @ (lse - L[rows, y])) + 0.5 * l2 * float(np.sum(Wz * Wz))
        G = E / se
        G[rows, y] -= 1.0
        G *= wcol[:, None]
        gW = (Z.T @ G.astype(np.float32)).astype(np.float64) + l2 * Wz
        return f, np.concatenate([(gW * D[:, None]).ravel(), G.sum(axis=0) * Db])

    if init is None:
        # Start from the weighted class priors: the best constant model, so the first steps go
        # straight to the features.
        prior = np.bincount(y, weights=wcol, minlength=kp) + 1e-12
        Wz0, b0 = np.zeros((r, kp)), np.log(prior / prior.sum())
        b0 -= b0.mean()
    else:
        Wz0, b0 = init
    theta0 = np.concatenate([(Wz0 / D[:, None]).ravel(), b0 / Db])
    theta, iters, converged = _lbfgs(fun, theta0, max_iter=max_iter, gtol=gtol)
    return theta[:rk].reshape(r, kp) * D[:, None], theta[rk:] * Db, iters, converged


# --------------------------------------------------------------------------------------------
# training: MLP (full-batch Adam)
# --------------------------------------------------------------------------------------------


def _fit_mlp(Z, y, w, kp, l2, cfg: HeadConfig, fan_in: int):
    """One-hidden-layer ReLU network on ``Z`` with full-batch Adam; float32 throughout.

    Full batch keeps every step identical run to run (no sampling order to seed) and lets numpy
    spend its time in a few large matrix products instead of many small ones. Returns float32
    ``(W1, b1, W2, b2)`` with ``W1`` on the columns of ``Z``.
    """
    n, r = Z.shape
    h = cfg.hidden
    rng = np.random.default_rng(cfg.seed)
    f32 = np.float32
    # He init with the *original* fan-in: the basis is an orthogonal map of the standardised
    # features, so pre-activations get the same variance as in feature space.
    W1 = (rng.standard_normal((r, h)) * math.sqrt(2.0 / fan_in)).astype(f32)
    b1 = np.zeros(h, dtype=f32)
    W2 = (rng.standard_normal((h, kp)) * math.sqrt(1.0 / h)).astype(f32)
    b2 = np.zeros(kp, dtype=f32)
    params = [W1, b1, W2, b2]
    m1 = [np.zeros_like(p) for p in params]
    m2 = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    wcol = w.astype(f32)[:, None]
    onehot = np.zeros((n, kp), dtype=f32)
    onehot[np.arange(n), y] = 1.0
    l2f, lr = f32(l2), cfg.lr
    ZT = np.ascontiguousarray(Z.T)
    for t in range(1, cfg.epochs + 1):
        pre = Z @ W1 + b1
        act = np.maximum(pre, f32(0))
        G = (softmax(act @ W2 + b2) - onehot) * wcol
        dact = G @ W2.T
        dact *= pre > 0
        grads = [ZT @ dact + l2f * W1, dact.sum(axis=0), act.T @ G + l2f * W2, G.sum(axis=0)]
        c1 = lr / (1.0 - beta1**t)
        c2 = 1.0 / (1.0 - beta2**t)
        for p, g, a, v in zip(params, grads, m1, m2):
            a *= f32(beta1)
            a += f32(1 - beta1) * g
            v *= f32(beta2)
            v += f32(1 - beta2) * (g * g)
            p -= f32(c1) * a / (np.sqrt(v * f32(c2)) + f32(eps))
    return W1, b1, W2, b2


# --------------------------------------------------------------------------------------------
# training: entry point
# --------------------------------------------------------------------------------------------


class _Trainer:
    """Fits one kind (linear / mlp) in the shared basis; used by the L2 search and the final fit."""

    def __init__(self, cfg: HeadConfig, basis: _Basis, y: np.ndarray, w: np.ndarray, k: int, d: int):
        self.cfg, self.basis, self.y, self.w, self.k, self.d = cfg, basis, y, w, k, d

    def fit(self, rows: np.ndarray | None, l2: float, init=None, gtol: float = _FINAL_GTOL) -> dict:
        """Fit on ``rows`` (None: all); returns a dict with basis-space params and class map."""
        Z = self.basis.Z if rows is None else self.basis.Z[rows]
        y = self.y if rows is None else self.y[rows]
        w = self.w if rows is None else self.w[rows]
        present = np.flatnonzero(np.bincount(y, minlength=self.k) > 0)
        remap = np.full(self.k, -1, dtype=np.int64)
        remap[present] = np.arange(present.shape[0])
        yp = remap[y]
        total = w.sum()
        wn = w / total if total > 0 else np.full(w.shape, 1.0 / max(1, w.shape[0]))
        fit = {"present": present, "iterations": 0, "converged": True}
        kp = present.shape[0]
        if kp < 2:  # one class: nothing to separate; a constant model is exact
            fit["const"] = True
            return fit
        if self.cfg.kind == "linear":
            if init is not None:  # warm starts come over all k classes; keep this fit's ones
                init = (init[0][:, present], init[1][present])
            Wz, b, iters, conv = _fit_linear(Z, yp, wn, kp, l2, self.cfg.epochs, gtol, init=init)
            fit.update(Wz=Wz, b=b, iterations=iters, converged=conv)
        else:
            fit["mlp"] = _fit_mlp(Z, yp, wn, kp, l2, self.cfg, self.d)
        return fit

    def present_logits(self, fit: dict, Z: np.ndarray) -> np.ndarray:
        if fit.get("const"):
            return np.zeros((Z.shape[0], fit["present"].shape[0]), dtype=np.float64)
        if "Wz" in fit:
            return (Z @ fit["Wz"].astype(np.float32)).astype(np.float64) + fit["b"]
        W1, b1, W2, b2 = fit["mlp"]
        return (np.maximum(Z @ W1 + b1, 0) @ W2 + b2).astype(np.float64)

    def predict(self, fit: dict, Z: np.ndarray) -> np.ndarray:
        return fit["present"][np.argmax(self.present_logits(fit, Z), axis=1)]


def _search_l2(trainer: _Trainer, *, y, k, cfg, sample_weight, Z_val=None, y_val=None):
    """Pick the L2 from the grid and fit the final head with it; returns ``(l2, record, fit)``.

    With validation rows each candidate is trained on all training rows and scored on them.
    Without, a seeded stratified 3-fold cross-validation scores out-of-fold predictions, then the
    head is refitted on all rows. Ties go to the larger penalty: the simpler model is the safer
    bet when accuracy cannot tell candidates apart.

    For the linear head the candidates are walked from strong to weak penalty, each warm-started
    from the previous one with a loose tolerance; the shipped fit is then polished to the final
    tolerance starting from the winner (validation) or from the mean of the winner's fold
    solutions (cross-validation) -- the folds share the basis, so their weights are comparable.
    """
    grid = _grid(cfg)
    metric = "balanced_accuracy" if cfg.balance else "accuracy"
    order = sorted(grid, reverse=True)
    loose = _SEARCH_GTOL if cfg.kind == "linear" else _FINAL_GTOL
    scores: dict[float, float] = {}
    fits: dict[float, list[dict]] = {l2: [] for l2 in order}
    if Z_val is not None:
        prev = None
        for l2 in order:
            prev = trainer.fit(None, l2, init=_warm(prev, cfg, k), gtol=loose)
            scores[l2] = _weighted_score(y_val, trainer.predict(prev, Z_val), k, cfg.balance, None)
            fits[l2].append(prev)
        method = "validation"
    else:
        n = y.shape[0]
        if n < _MIN_ROWS_FOR_CV or np.count_nonzero(np.bincount(y, minlength=k)) < 2:
            record = {
                "method": "default",
                "reason": f"fewer than {_MIN_ROWS_FOR_CV} rows or 2 classes: no {_CV_FOLDS}-fold search",
                "metric": None,
                "grid": list(grid),
                "scores": None,
                "chosen": _DEFAULT_L2,
            }
            return _DEFAULT_L2, record, trainer.fit(None, _DEFAULT_L2)
        fold = _stratified_folds(y, _CV_FOLDS, cfg.seed)
        oof = {l2: np.empty(n, dtype=np.int64) for l2 in order}
        for f in range(_CV_FOLDS):
            train_rows, val_rows = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
            Z_fold_val = trainer.basis.Z[val_rows]
            prev = None
            for l2 in order:
                prev = trainer.fit(train_rows, l2, init=_warm(prev, cfg, k), gtol=loose)
                oof[l2][val_rows] = trainer.predict(prev, Z_fold_val)
                fits[l2].append(prev)
        for l2 in order:
            scores[l2] = _weighted_score(y, oof[l2], k, cfg.balance, sample_weight)
        method = f"{_CV_FOLDS}-fold"
    best = max(scores.values())
    chosen = max(l2 for l2, s in scores.items() if s >= best - 1e-12)
    record = {
        "method": method,
        "metric": metric,
        "grid": list(grid),
        "scores": [scores[l2] for l2 in grid],
        "chosen": chosen,
    }
    if cfg.kind != "linear":
        # An MLP fit depends only on (rows, l2, seed): the validation winner *is* the final fit.
        final = fits[chosen][0] if method == "validation" else trainer.fit(None, chosen)
    else:
        final = trainer.fit(None, chosen, init=_mean_start(fits[chosen], trainer.k))
    return chosen, record, final


def _grid(cfg: HeadConfig) -> tuple[float, ...]:
    return L2_GRID if cfg.kind == "linear" else MLP_L2_GRID


def _mean_start(candidates: list[dict], k: int):
    """Average the basis-space weights of fits over all classes, as a warm start (None if unusable)."""
    usable = [c for c in candidates if "Wz" in c]
    if not usable:
        return None
    r = usable[0]["Wz"].shape[0]
    Wz, b, seen = np.zeros((r, k)), np.zeros(k), np.zeros(k)
    for c in usable:
        Wz[:, c["present"]] += c["Wz"]
        b[c["present"]] += c["b"]
        seen[c["present"]] += 1
    seen = np.maximum(seen, 1)
    return Wz / seen, b / seen


def _warm(prev: dict | None, cfg: HeadConfig, k: int):
    if prev is None or cfg.kind != "linear":
        return None
    return _mean_start([prev], k)


def train_head(X, y, labels, *, cfg: HeadConfig = HeadConfig(), X_val=None, y_val=None, sample_weight=None) -> Head:
    """Train a classification head on frozen-backbone features (see :func:`_train_head`).

    BLAS runs single-threaded here: the matrices are small (a few hundred rows), and OpenBLAS
    threads spinning for busy cores made training 5-10x slower on 2-core machines (measured:
    0.5 s vs 2.5-5 s for 500 x 1280 x 10 with automatic L2).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a base dependency
        return _train_head(X, y, labels, cfg=cfg, X_val=X_val, y_val=y_val, sample_weight=sample_weight)
    with threadpool_limits(limits=1, user_api="blas"):
        return _train_head(X, y, labels, cfg=cfg, X_val=X_val, y_val=y_val, sample_weight=sample_weight)


def _train_head(
    X,
    y,
    labels,
    *,
    cfg: HeadConfig = HeadConfig(),
    X_val=None,
    y_val=None,
    sample_weight=None,
) -> Head:
    """Train a classification head on frozen-backbone features.

    Args:
        X: float32 features ``(n, d)``.
        y: int64 class indices into ``labels``, shape ``(n,)``. A label may have no rows: it is
            never predicted (zero weights, a very low bias).
        labels: Class names, ``k`` unique strings.
        cfg: Head kind and hyper-parameters.
        X_val: Optional validation features; with ``y_val`` they choose the automatic L2 (and
            ``meta["val_accuracy"]`` is recorded). They are never trained on.
        y_val: Class indices of ``X_val``.
        sample_weight: Optional non-negative per-row weights, multiplied with the class balancing
            (e.g. to down-weight replayed exemplars).

    Returns:
        The trained :class:`Head`; identical inputs and seed give bit-identical arrays.

    Raises:
        DataError: on malformed features, labels, targets or weights.
        ConfigError: if ``cfg`` is not a :class:`HeadConfig`.
    """
    if not isinstance(cfg, HeadConfig):
        raise ConfigError(f"cfg must be a HeadConfig, got {type(cfg).__name__}; {_kinds_hint()}")
    labels = [] if isinstance(labels, str) else list(labels)
    names_ok = all(isinstance(s, str) and s for s in labels) and len(set(labels)) == len(labels)
    if len(labels) < 2 or not names_ok:
        raise DataError(f"labels must be a list of at least 2 unique non-empty strings, got {labels[:5]!r}")
    k = len(labels)
    X = _as_features(X, "X")
    n, d = X.shape
    y = _as_targets(y, n, k, "y")
    if sample_weight is not None:
        sample_weight = np.asarray(sample_weight, dtype=np.float64)
        if sample_weight.shape != (n,) or not np.all(np.isfinite(sample_weight)) or np.any(sample_weight < 0):
            raise DataError(
                f"sample_weight must be {n} finite non-negative numbers, got shape {sample_weight.shape}"
            )
        if not np.any(sample_weight > 0):
            raise DataError("sample_weight is zero for every row; nothing to train on")
    if (X_val is None) != (y_val is None):
        raise DataError("X_val and y_val must be given together")
    if X_val is not None:
        X_val = _as_features(X_val, "X_val")
        if X_val.shape[1] != d:
            raise DataError(f"X_val has {X_val.shape[1]} features but X has {d}")
        y_val = _as_targets(y_val, X_val.shape[0], k, "y_val")

    counts = np.bincount(y, minlength=k)
    w = _class_weights(y, k, cfg.balance, sample_weight)
    meta: dict = {
        "kind": cfg.kind,
        "config": cfg.to_dict(),
        "n_features": d,
        "n_classes": k,
        "n_train": n,
        "class_counts": counts.tolist(),
        "absent_classes": [labels[c] for c in np.flatnonzero(counts == 0)],
    }
    mean64 = X.mean(axis=0, dtype=np.float64)
    mean = mean64.astype(np.float32)

    if cfg.kind == "prototype":
        arrays = _train_prototype(X, y, w, sample_weight, k, mean, meta)
    else:
        std = X.std(axis=0, dtype=np.float64)
        # A constant feature (std 0, or a few float32 ulps of wobble around its value) keeps scale 1
        # so it centres to ~0 instead of being blown up into unit-variance rounding noise.
        varies = (std > 1e-6 * np.abs(mean64)) & (std > 1e-12)
        scale = np.where(varies, std, 1.0).astype(np.float32)
        Xs = (X - mean) / scale
        basis = _Basis(Xs)
        meta["basis_rank"] = basis.rank
        trainer = _Trainer(cfg, basis, y, w, k, d)
        fit = None
        if cfg.l2 is None:
            Z_val = None if X_val is None else ((X_val - mean) / scale) @ basis.proj
            l2, meta["l2_search"], fit = _search_l2(
                trainer, y=y, k=k, cfg=cfg, sample_weight=sample_weight, Z_val=Z_val, y_val=y_val
            )
        else:
            l2 = cfg.l2
            meta["l2_search"] = {"method": "fixed", "metric": None, "grid": None, "scores": None}
            meta["l2_search"]["chosen"] = l2
        if fit is None:
            fit = trainer.fit(None, l2)
        meta["l2"] = l2
        meta["optimizer"] = (
            {"name": "lbfgs", "iterations": fit["iterations"], "converged": fit["converged"]}
            if cfg.kind == "linear"
            else {"name": "adam", "steps": cfg.epochs, "lr": cfg.lr}
        )
        arrays = _expand(cfg.kind, fit, trainer, basis, k, mean, scale, cfg.hidden)

    head = Head(kind=cfg.kind, labels=labels, arrays=arrays, meta=meta)
    meta["train_accuracy"] = float(np.mean(head.predict(X) == y))
    if X_val is not None:
        meta["val_accuracy"] = float(np.mean(head.predict(X_val) == y_val))
    return head


def _expand(kind, fit, trainer: _Trainer, basis: _Basis, k, mean, scale, hidden) -> dict:
    """Map a basis-space fit back to float32 feature-space arrays over all ``k`` classes."""
    present = fit["present"]
    absent = np.setdiff1d(np.arange(k), present)
    low = _absent_bias(trainer.present_logits(fit, basis.Z))
    d = mean.shape[0]
    if kind == "linear":
        W = np.zeros((d, k), dtype=np.float32)
        b = np.zeros(k, dtype=np.float32)
        if not fit.get("const"):
            W[:, present] = (basis.proj.astype(np.float64) @ fit["Wz"]).astype(np.float32)
            b[present] = fit["b"]
        b[absent] = low
        return {"mean": mean, "scale": scale, "W": W, "b": b}
    W2 = np.zeros((hidden, k), dtype=np.float32)
    b2 = np.zeros(k, dtype=np.float32)
    if fit.get("const"):
        W1 = np.zeros((d, hidden), dtype=np.float32)
        b1 = np.zeros(hidden, dtype=np.float32)
    else:
        W1z, b1, W2p, b2p = fit["mlp"]
        W1 = basis.proj @ W1z
        W2[:, present], b2[present] = W2p, b2p
    b2[absent] = low
    return {"mean": mean, "scale": scale, "W1": W1, "b1": b1, "W2": W2, "b2": b2}


def _train_prototype(X, y, w, sample_weight, k, mean, meta) -> dict:
    """Cosine nearest-class-mean with a leave-one-out fitted temperature."""
    n, d = X.shape
    centred = X - mean
    sq = np.sum(centred * centred, axis=1, keepdims=True)
    unit = (centred / np.sqrt(np.maximum(sq, np.float32(_NORM_EPS**2)))).astype(np.float64)
    sw = np.ones(n) if sample_weight is None else sample_weight
    onehot = np.zeros((n, k))
    onehot[np.arange(n), y] = sw
    sums = unit.T @ onehot  # (d, k) weighted sums of unit rows per class
    norms = np.linalg.norm(sums, axis=0)
    present = norms > _NORM_EPS
    protos = np.zeros((d, k))
    protos[:, present] = sums[:, present] / norms[present]

    # Temperature: a similarity scale fitted on training cosines would grow without bound (the
    # prototypes were built from those very rows), so each row is scored against its own class
    # mean *without itself* -- a leave-one-out estimate that costs no refit -- and the scale
    # minimising weighted cross-entropy there is kept, within [_PROTO_SCALE_MIN, _PROTO_SCALE_MAX].
    rows = np.arange(n)
    cos = unit @ protos
    own_dot = (unit @ sums)[rows, y]
    unit_sq = np.sum(unit * unit, axis=1)
    loo_sq = norms[y] ** 2 - 2 * sw * own_dot + sw**2 * unit_sq
    usable = (loo_sq > _NORM_EPS) & (w > 0)
    s = _PROTO_SCALE_DEFAULT
    cols = np.flatnonzero(present)
    if usable.any() and cols.shape[0] >= 2:
        loo = cos.copy()
        u = rows[usable]
        loo[u, y[u]] = (own_dot[u] - sw[u] * unit_sq[u]) / np.sqrt(loo_sq[u])
        C = loo[usable][:, cols]
        target = np.searchsorted(cols, y[usable])
        wu = w[usable] / w[usable].sum()
        s = _fit_temperature(C, target, wu)
    meta["logit_scale"] = s
    meta["l2"] = None
    meta["l2_search"] = {"method": "none", "grid": None, "scores": None, "metric": None, "chosen": None}
    b = np.zeros(k, dtype=np.float32)
    b[~present] = -(s + _ABSENT_MARGIN)
    return {
        "mean": mean,
        "prototypes": protos.astype(np.float32),
        "logit_scale": np.array(s, dtype=np.float32),
        "b": b,
    }


def _fit_temperature(C: np.ndarray, target: np.ndarray, w: np.ndarray) -> float:
    """Scale ``s`` minimising ``sum w_i CE(s * C_i, target_i)``, by bisection on the derivative.

    The loss is convex in ``s`` (cross-entropy of logits linear in ``s``), so its derivative
    ``E_p[C] - C_target`` is increasing and bisection is exact and deterministic.
    """
    rows = np.arange(C.shape[0])

    def slope(s: float) -> float:
        p = softmax(s * C)
        return float(w @ (np.sum(p * C, axis=1) - C[rows, target]))

    lo, hi = _PROTO_SCALE_MIN, _PROTO_SCALE_MAX
    if slope(lo) >= 0:
        return lo
    if slope(hi) <= 0:
        return hi
    for _ in range(40):  # 29 / 2^40: far below float32 resolution
        mid = 0.5 * (lo + hi)
        if slope(mid) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def probability_graph(head: Head, *, opset: int, ir_version: int | None = None):
    """The head as the graph fused behind a backbone: input ``head/features``, output
    ``probabilities`` (:meth:`Head.logits` then a softmax)."""
    onnx = require("onnx", extra="base", purpose="building ONNX graphs")
    g = head.to_onnx(input_name="head/features", output_name="head/logits", opset=opset)
    g.graph.node.append(onnx.helper.make_node("Softmax", ["head/logits"], ["probabilities"], axis=-1, name="head/softmax"))
    del g.graph.output[:]
    g.graph.output.append(onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT,
                                                             ["batch", head.n_classes]))
    if ir_version is not None:
        g.ir_version = ir_version
    return g
