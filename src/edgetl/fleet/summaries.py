"""Engine-free fleet learning: what a device sends, how the server checks it, how heads merge.

A fleet round is a short, fixed sequence of *steps*. In each step the server broadcasts a few
arrays and numbers (a :class:`Step`), every device answers with a :class:`Summary` of its own
labelled data computed by one of the device's **own** functions (:func:`respond`; the step only
names which and passes numbers, never code), and the server checks and merges the summaries
(:class:`Merger`). After the last step :meth:`Merger.result` is an edgetl head. The same code runs
under Flower (:mod:`edgetl.fleet.flower`), in the unit tests with no engine at all, and for the
single-machine "central" reference (one participant holding the union of the data).

Per head kind (``d`` features, ``k`` classes, ``n`` a device's rows):

========== ===================================================== ====================================
kind       steps and what a device sends                          merge
========== ===================================================== ====================================
ridge      ``moments``: n, per-class counts and feature sums      exact: sums of raw moments, then
           (k, d), Gram ``X^T X`` (d, d), float64;                standardise, then solve (GCV
           ``temperature-a``/``-b``: 2 x 33 numbers (leave-one-   penalty); temperature to ~1e-9
           out logits on the merged hat matrix)
prototype  ``moments`` (counts, sums, sums of squares);           exact: edgetl's prototype head on
           ``unit-sums``: per-class sums of unit centred rows     the union (mean, prototypes,
           on the shared mean; ``temperature-a``/``-b``           leave-one-out temperature)
linear     ``moments``; then R x ``fedavg``: the weights after    FedNCM start (class means on the
           E local gradient steps, with the device's weight sum   shared standardisation), then
                                                                  FedAvg + server Adam (FedAdam);
                                                                  E = 1 is exact distributed Adam
mlp        as linear (seeded start instead of FedNCM)             FedAvg + server Adam (no exact merge)
padim      ``padim``: per-position   count, mean (P, d) and       exact: Chan's parallel formula
           scatter (P, d(d+1)/2), float64
patchcore  ``patchcore``: the device's greedy k-centre coreset of   coreset of coresets: greedy
           its patch features (m, C) and its patch count          k-centre over the union
========== ===================================================== ====================================

**What summaries contain.** Counts, sums, sums of squares, Gram and scatter matrices, slope values
of a one-dimensional loss, or model weights: aggregates over a device's rows. No images, and no
feature vector of any single image -- except PatchCore, whose head *is* a memory bank of patch
features, so a device's summary is a subset of its own patch features (PatchCore devices share
raw patch features with the server; use PaDiM where that is not acceptable). Aggregates are not
anonymous: a device with very few rows of a class reveals about as much as those rows' features
(a class with one row sends that row's feature vector as its sum). Nothing here adds noise.

**What the server refuses.** :func:`check_summary` refuses, with one line naming the device and
the field, a summary of the wrong step or kind, unknown or missing arrays, wrong shapes or dtypes,
NaN or infinity, negative, fractional or huge counts (above ``max_rows``), counts that do not add
up, sums that cannot come from that many rows (a sum of squares below what the sum implies, a
negative scatter diagonal), a feature width or label set that does not match the round, and
duplicate or over-long labels. A refused device is left out of the merge (the round records why);
the round fails only when fewer than ``min_devices`` remain. A *plausible* lie (consistent but
made-up statistics) cannot be told from real data here; each device's own gate
(:mod:`edgetl.fleet.device`) is what protects it from a poisoned global head.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from ..core.manifest import loads_bounded
from . import _edgetl as et
from . import ridge as _ridge
from ._edgetl import FleetError

# What a round merges besides the devices: "current" makes the bundle's own training data (its
# replay exemplars, or its anomaly head's statistics) a participant, so classes no device holds
# are kept. One default for fleet serve, fleet simulate and the library; "none" is the opt-in.
DEFAULT_BASE = "current"
MAX_ROWS = 10_000_000  # rows (or images) one device may claim; more is refused as implausible
MAX_LABELS = 10_000
MAX_LABEL_CHARS = 200
MAX_FEATURES = 65_536
MAX_META_BYTES = 1 << 20
MAX_META_DEPTH = 16  # metadata is a flat object of labels and counts
# A feature's magnitude per row: pooled backbone features are O(1..100); a sum or Gram matrix
# implying rows beyond this (for the n the device declares) is not from a backbone, and would
# overflow the merge's float64 sums.
MAX_FEATURE_ABS = 1e6
TEMPERATURE_POINTS = 33
# edgetl's prototype head: cosines floor and temperature bounds (kept equal to edgetl.heads)
PROTO_NORM_EPS = 1e-6
PROTO_T_BOUNDS = (1.0, 30.0)
PROTO_T_DEFAULT = 10.0
ABSENT_MARGIN = 30.0


# ============================================================================================ messages
@dataclass
class Step:
    """What the server broadcasts: the kind, the step name, numbers (JSON) and arrays."""

    kind: str
    name: str
    index: int
    config: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)


@dataclass
class Summary:
    """What a device answers to one step: arrays plus JSON metadata (labels, counts)."""

    kind: str
    step: str
    arrays: dict
    meta: dict

    def to_wire(self) -> tuple[dict, str]:
        """(arrays, one JSON string) -- what goes into an ArrayRecord and a ConfigRecord."""
        return dict(self.arrays), json.dumps({"kind": self.kind, "step": self.step, **self.meta}, sort_keys=True)

    @classmethod
    def from_wire(cls, arrays: dict, meta_json: str, *, who: str = "a device") -> Summary:
        if not isinstance(meta_json, str) or len(meta_json) > MAX_META_BYTES:
            raise FleetError(f"{who}: summary metadata missing or larger than {MAX_META_BYTES} bytes")
        try:
            meta = loads_bounded(meta_json, max_depth=MAX_META_DEPTH)
        except ValueError as exc:
            raise FleetError(f"{who}: summary metadata is not usable JSON ({exc})") from None
        if not isinstance(meta, dict):
            raise FleetError(f"{who}: summary metadata is not an object")
        kind, step = meta.pop("kind", None), meta.pop("step", None)
        return cls(kind=kind, step=step, arrays=dict(arrays), meta=meta)


def step_to_wire(step: Step) -> tuple[dict, str]:
    return dict(step.arrays), json.dumps(
        {"kind": step.kind, "name": step.name, "index": step.index, "config": step.config}, sort_keys=True
    )


def _merge(kind):
    """The registered fleet merge called ``kind`` (FleetError naming the valid ones otherwise)."""
    return et.fleet_merge(kind)


def _is_merge(kind) -> bool:
    try:
        _merge(kind)
    except FleetError:
        return False
    return True


def step_from_wire(arrays: dict, meta_json: str) -> Step:
    """A broadcast as a device reads it: checked to be one of the steps it knows, nothing more."""
    if not isinstance(meta_json, str) or len(meta_json) > 16 * MAX_META_BYTES:
        raise FleetError("server step metadata missing or too large")
    try:
        m = loads_bounded(meta_json)
    except ValueError as exc:
        raise FleetError(f"server step metadata is not usable JSON ({exc})") from None
    if not isinstance(m, dict) or not _is_merge(m.get("kind")) or not isinstance(m.get("name"), str):
        raise FleetError(f"server step of unknown kind {m.get('kind') if isinstance(m, dict) else None!r}")
    if not isinstance(m.get("config"), dict):
        raise FleetError("server step without a config object")
    return Step(kind=m["kind"], name=m["name"], index=int(m.get("index", 0)), config=m["config"], arrays=dict(arrays))


# ============================================================================================ local data
@dataclass
class LocalData:
    """A participant's training data as the summaries see it: classification features ``X`` (n, d)
    with label names, or anomaly patch features ``F`` (N, C, H, W) of good images."""

    X: np.ndarray | None = None
    labels: list[str] | None = None
    F: np.ndarray | None = None

    @classmethod
    def classify(cls, X, labels) -> LocalData:
        X = np.asarray(X, np.float32)
        labels = [str(l) for l in labels]
        if X.ndim != 2 or X.shape[0] != len(labels) or X.shape[0] == 0:
            raise FleetError(f"local data: features {X.shape} do not match {len(labels)} labels")
        if not np.all(np.isfinite(X)):
            raise FleetError("local data: features hold NaN or infinity")
        return cls(X=X, labels=labels)

    @classmethod
    def anomaly(cls, F) -> LocalData:
        F = np.asarray(F, np.float32)
        if F.ndim != 4 or len(F) == 0 or not np.all(np.isfinite(F)):
            raise FleetError(f"local data: patch features must be finite (N, C, H, W), got {F.shape}")
        return cls(F=F)

    def local_labels(self) -> list[str]:
        return sorted(set(self.labels))

    def indices(self, order: list[str]) -> np.ndarray:
        pos = {l: i for i, l in enumerate(order)}
        missing = sorted(set(self.labels) - set(pos))
        if missing:
            raise FleetError(f"local labels {missing[:5]} are not in the round's label set")
        return np.array([pos[l] for l in self.labels], dtype=np.int64)


# ============================================================================================ checks
def _fail(who: str, what: str):
    raise FleetError(f"{who}: summary refused: {what}")


def _arr(s: Summary, name: str, who: str, *, shape=None, ndim=None, integer=False) -> np.ndarray:
    if name not in s.arrays:
        _fail(who, f"array {name!r} missing")
    a = np.asarray(s.arrays[name])
    if a.dtype.kind not in ("i", "u", "f"):
        _fail(who, f"array {name!r} has dtype {a.dtype}, expected numbers")
    if integer and a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            _fail(who, f"array {name!r} must hold whole counts")
    if ndim is not None and a.ndim != ndim:
        _fail(who, f"array {name!r} has shape {a.shape}, expected {ndim} dimensions")
    if shape is not None:
        want = tuple(shape)
        if a.shape != want:
            _fail(who, f"array {name!r} has shape {a.shape}, expected {want}")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        _fail(who, f"array {name!r} holds NaN or infinity")
    return a.astype(np.int64) if integer else a.astype(np.float64)


def _labels(meta: dict, who: str) -> list[str]:
    labels = meta.get("labels")
    if not isinstance(labels, list) or not labels or len(labels) > MAX_LABELS:
        _fail(who, f"labels must be a list of 1 to {MAX_LABELS} names")
    if not all(isinstance(l, str) and 0 < len(l) <= MAX_LABEL_CHARS for l in labels):
        _fail(who, f"labels must be non-empty strings of at most {MAX_LABEL_CHARS} characters")
    if len(set(labels)) != len(labels):
        _fail(who, "labels are listed twice")
    return labels


def _count(meta: dict, key: str, who: str, max_rows: int) -> int:
    v = meta.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(who, f"{key} must be a whole number, got {v!r}")
    if v < 1 or v > max_rows:
        _fail(who, f"{key} = {v} is outside 1..{max_rows}")
    return v


def check_summary(
    s: Summary,
    step: Step,
    *,
    who: str = "device",
    d: int | None = None,
    labels: list[str] | None = None,
    max_rows: int = MAX_ROWS,
    geometry: dict | None = None,
) -> Summary:
    """Refuse (:class:`FleetError`, one line) anything in ``s`` that does not fit ``step``.

    ``d`` is the round's feature width, ``labels`` the label set the step expects the device to
    answer over (None in the first step, where each device names its own), ``geometry`` the anomaly
    head's shapes (``P``, ``dims``, ``channels_in``, ``max_memory``).
    """
    if s.kind != step.kind or s.step != step.name:
        _fail(who, f"answers step {s.kind}/{s.step}, the round is at {step.kind}/{step.name}")
    merge = _merge(step.kind)
    want = merge.fleet_expected_arrays(step)
    if want is not None and set(s.arrays) != want:
        _fail(who, f"arrays {sorted(s.arrays)}, expected {sorted(want)}")
    ctx = {"d": d, "labels": labels, "max_rows": max_rows, **(geometry or {})}
    return merge.fleet_check(s, step, who, ctx)


def check_anomaly_images(s: Summary, who: str, max_rows: int) -> int:
    """The number of images an anomaly summary claims, refused outside 1..max_rows."""
    return _count(s.meta, "images", who, max_rows)


def check_classify(
    s: Summary, step: Step, who: str, *, d: int | None, labels: list[str] | None, max_rows: int
) -> Summary:
    """The checks of the classification merges' steps (moments, unit-sums, temperature, fedavg)."""
    if step.name == "moments":
        lab = _labels(s.meta, who)
        if labels is not None and not set(lab) <= set(labels):
            _fail(who, f"labels {sorted(set(lab) - set(labels))[:5]} are not in the round's label set")
        k = len(lab)
        n = _count(s.meta, "n", who, max_rows)
        counts = _arr(s, "count", who, shape=(k,), integer=True)
        # each count bounded first: k counts near 2**63 would wrap their int64 sum around to n
        if np.any(counts < 0) or np.any(counts > n) or int(counts.sum()) != n:
            _fail(who, f"class counts {counts.tolist()[:10]} are negative or do not add up to n = {n}")
        sums = _arr(s, "sum", who, ndim=2)
        if sums.shape[0] != k or (d is not None and sums.shape[1] != d) or not 0 < sums.shape[1] <= MAX_FEATURES:
            _fail(
                who,
                f"array 'sum' has shape {sums.shape}, expected ({k}, {d if d is not None else 'd'})"
                + (" (another backbone?)" if d is not None and sums.shape[1] != d else ""),
            )
        width = sums.shape[1]
        if np.abs(sums).max() > MAX_FEATURE_ABS * n:
            _fail(who, f"feature sums over {MAX_FEATURE_ABS:g} per row for n = {n} rows: not a backbone's features")
        if "gram" in s.arrays:
            g = _arr(s, "gram", who, shape=(width, width))
            diag = np.diag(g)
            if not np.allclose(g, g.T, rtol=1e-9, atol=1e-9 * max(1.0, float(np.abs(diag).max()))):
                _fail(who, "Gram matrix is not symmetric")
        else:
            diag = _arr(s, "sumsq", who, shape=(width,))
        if np.abs(diag).max() > MAX_FEATURE_ABS**2 * n:
            _fail(
                who, f"sums of squares over {MAX_FEATURE_ABS:g}^2 per row for n = {n} rows: not a backbone's features"
            )
        total = sums.sum(axis=0)
        # sum of squares >= (sum)^2 / n for every feature (Cauchy-Schwarz); a lie about n breaks it
        slack = 1e-6 * np.maximum(diag, 1.0)
        if np.any(diag < -1e-9) or np.any(diag + slack < total * total / n):
            _fail(who, f"sums of squares are smaller than n = {n} rows with these sums allow")
        return s
    if step.name == "unit-sums":
        k = len(labels)
        counts = _arr(s, "count", who, shape=(k,), integer=True)
        if np.any(counts < 0) or np.any(counts > max_rows) or counts.sum() > max_rows:
            _fail(who, "class counts are negative or implausibly large")
        sums = _arr(s, "sum", who, shape=(k, d))
        if np.any(np.linalg.norm(sums, axis=1) > counts + 1e-3 * np.maximum(counts, 1)):
            _fail(who, "unit-vector sums are longer than their counts allow")
        return s
    if step.name.startswith("temperature"):
        g = len(step.config["grid"])
        _arr(s, "slope", who, shape=(g,))
        c = _arr(s, "curv", who, shape=(g,))
        if np.any(c < -1e-9):
            _fail(who, "negative curvature of a convex loss")
        rows = s.meta.get("rows")
        if isinstance(rows, bool) or not isinstance(rows, int) or not 0 <= rows <= max_rows:
            _fail(who, f"rows must be a whole number in 0..{max_rows}")
        return s
    if step.name == "fedavg":
        for name, ref in step.arrays.items():
            if name in ("mean", "scale", "class_weight"):
                continue
            _arr(s, name, who, shape=np.asarray(ref).shape)
        w = s.meta.get("weight")
        if (
            isinstance(w, bool)
            or not isinstance(w, (int, float))
            or not math.isfinite(w)
            or not 0 < w <= max_rows * 1e3
        ):
            _fail(who, f"weight must be a positive finite number, got {w!r}")
        _count(s.meta, "n", who, max_rows)
        return s
    _fail(who, f"unknown step {step.name!r}")


# ============================================================================================ devices
def respond(step: Step, data: LocalData, *, head_template=None) -> Summary:
    """A device's answer to ``step`` from its own data. The step selects one of the functions
    below by name and supplies numbers and arrays; nothing received is executed.

    ``head_template`` is the device's own current anomaly head (its config, channels and grid are
    used, never the server's).
    """
    return _merge(step.kind).fleet_respond(step, data, head_template)


def respond_classify(step: Step, data: LocalData, merge) -> Summary:
    """A device's answer to a classification merge's step (``merge`` supplies what differs)."""
    k = step.kind
    if step.name == "moments":
        labels = data.local_labels()
        y = data.indices(labels)
        X = data.X.astype(np.float64)
        sums = np.zeros((len(labels), X.shape[1]))
        np.add.at(sums, y, X)
        arrays = {"count": np.bincount(y, minlength=len(labels)).astype(np.int64), "sum": sums}
        if step.config.get("gram"):
            arrays["gram"] = X.T @ X
        else:
            arrays["sumsq"] = np.sum(X * X, axis=0)
        return Summary(k, step.name, arrays, {"labels": labels, "n": len(X)})
    labels = _step_labels(step)
    y = data.indices(labels)
    if step.name == "unit-sums":
        unit = _unit_rows(data.X, np.asarray(step.arrays["mean"], np.float32))
        sums = np.zeros((len(labels), unit.shape[1]))
        np.add.at(sums, y, unit)
        return Summary(
            k,
            step.name,
            {"count": np.bincount(y, minlength=len(labels)).astype(np.int64), "sum": sums},
            {"labels": labels},
        )
    if step.name.startswith("temperature"):
        grid = _grid(step)
        Z, t, w = merge.temperature_rows(step, data.X, y)
        slope, curv = _ridge.temperature_terms(Z, t, w, grid)
        return Summary(k, step.name, {"slope": slope, "curv": curv}, {"rows": len(Z)})
    if step.name == "fedavg":
        return merge.local_update(step, data.X, y, labels)
    raise FleetError(f"this device does not know step {k}/{step.name}")


def _step_labels(step: Step) -> list[str]:
    labels = step.config.get("labels")
    if not isinstance(labels, list) or not all(isinstance(l, str) for l in labels) or len(labels) > MAX_LABELS:
        raise FleetError("server step without a valid label list")
    return labels


def _grid(step: Step) -> np.ndarray:
    grid = np.asarray(step.config.get("grid", []), np.float64)
    if grid.ndim != 1 or not 2 <= len(grid) <= 1025 or not np.all(np.isfinite(grid)) or np.any(np.diff(grid) <= 0):
        raise FleetError("server step with an invalid temperature grid")
    return grid


def _unit_rows(X: np.ndarray, mean32: np.ndarray) -> np.ndarray:
    """edgetl's prototype arithmetic: float32 centring and normalisation, then float64."""
    centred = X - mean32
    sq = np.sum(centred * centred, axis=1, keepdims=True)
    return (centred / np.sqrt(np.maximum(sq, np.float32(PROTO_NORM_EPS**2)))).astype(np.float64)


def proto_loo(step: Step, X, y):
    """Leave-one-out cosines of this device's rows against the *global* class sums (as edgetl's
    prototype head scores its temperature), restricted to usable rows and present classes."""
    a = step.arrays
    sums = np.asarray(a["sums"], np.float64)  # (d, k)
    weight = np.asarray(a["class_weight"], np.float64)
    unit = _unit_rows(X, np.asarray(a["mean"], np.float32))
    norms = np.linalg.norm(sums, axis=0)
    present = norms > PROTO_NORM_EPS
    protos = np.zeros_like(sums)
    protos[:, present] = sums[:, present] / norms[present]
    rows = np.arange(len(y))
    cos = unit @ protos
    own_dot = (unit @ sums)[rows, y]
    unit_sq = np.sum(unit * unit, axis=1)
    loo_sq = norms[y] ** 2 - 2 * own_dot + unit_sq
    w = weight[y]
    usable = (loo_sq > PROTO_NORM_EPS) & (w > 0)
    cols = np.flatnonzero(present)
    loo = cos.copy()
    u = rows[usable]
    loo[u, y[u]] = (own_dot[u] - unit_sq[u]) / np.sqrt(loo_sq[u])
    C = loo[usable][:, cols]
    return C, np.searchsorted(cols, y[usable]), w[usable]


def ridge_rows(step: Step, X, y):
    """Leave-one-out logits of this device's rows under the merged ridge fit (present classes)."""
    a = step.arrays
    n = step.config.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise FleetError("server step without the round's row count")
    present = np.flatnonzero(np.asarray(a["present"]) > 0)
    fit = {
        "mean": np.asarray(a["mean"], np.float32),
        "scale": np.asarray(a["scale"], np.float32),
        "W": np.asarray(a["W"], np.float64),
        "b": np.asarray(a["b"], np.float64),
        "M": np.asarray(a["M"], np.float64),
        "offset": np.asarray(a["offset"], np.float64),
        "n": n,
    }
    keep = np.isin(y, present)
    Z = _ridge.ridge_loo_logits(X[keep], y[keep], fit)[:, present]
    return Z, np.searchsorted(present, y[keep]), np.ones(int(keep.sum()))


def local_fedavg(step: Step, X, y, labels, grads) -> Summary:
    """E local full-batch gradient steps on the class-weighted cross-entropy (global standardisation
    and class weights from the server), starting from the broadcast weights."""
    a = step.arrays
    cfg = step.config
    steps = int(cfg.get("local_steps", 1))
    lr = float(cfg.get("lr", 1.0))
    l2 = float(cfg.get("l2", 1e-2))
    if not (1 <= steps <= 1000 and 0 < lr <= 100 and 0 <= l2 <= 100):
        raise FleetError("server step with out-of-range local training settings")
    Xs = ((X - np.asarray(a["mean"], np.float32)) / np.asarray(a["scale"], np.float32)).astype(np.float64)
    w = np.asarray(a["class_weight"], np.float64)[y]
    weight = float(w.sum())
    params = {n: np.asarray(v, np.float64).copy() for n, v in a.items() if n not in ("mean", "scale", "class_weight")}
    Y = np.zeros((len(y), len(labels)))
    Y[np.arange(len(y)), y] = 1.0
    for _ in range(steps):
        g = grads(params, Xs, Y, w / weight, l2)
        for n in params:
            params[n] -= lr * g[n]
    return Summary(
        step.kind, "fedavg", {n: v.astype(np.float32) for n, v in params.items()}, {"weight": weight, "n": len(y)}
    )
