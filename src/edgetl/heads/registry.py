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

This module imports no other heads module at import time, so every heads module can import it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError

__all__ = [
    "FAMILIES",
    "NORM_EPS",
    "ClassifyKind",
    "DefectKind",
    "FleetMerge",
    "GraphBuilder",
    "HeadKind",
    "ImageKind",
    "PatchKind",
    "fleet_merge",
    "fleet_merge_names",
    "get",
    "hint",
    "known",
    "names",
    "parts",
    "prototype_logits",
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

    def named_candidates(self) -> list[dict] | None:
        """The settings a fit chooses among (by out-of-fold accuracy) when this kind is asked for by
        name; None: its settings as given."""
        return None

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

    def device_config(self, head):
        """The settings an on-device retrain of ``head`` uses: its own, with the L2 it chose fixed
        (no search on the device)."""
        from .classification import HeadConfig

        cfg = HeadConfig.from_dict(head.meta.get("config", {"kind": head.kind}))
        if cfg.l2 is None and head.meta.get("l2") is not None:
            cfg = HeadConfig.from_dict({**cfg.to_dict(), "l2": head.meta["l2"]})
        return cfg

    def update(self, head, X, y, *, labels=None, sample_weight=None):
        """The on-device retrain (numpy only): ``head`` refitted with :meth:`device_config` on the
        rows the device trains on (its new rows and its replay memory). ``y`` indexes ``labels``
        (default ``head.labels``; classes the device adds follow the head's own)."""
        labels = list(head.labels if labels is None else labels)
        return self.fit(X, y, labels, cfg=self.device_config(head), sample_weight=sample_weight)


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

    def named_candidates(self):
        # the features' own geometry (one scale) often generalises better on frozen features than
        # per-feature standardisation; which one wins is data's call
        return [{"kind": self.name, "scaling": "global"}, {"kind": self.name, "scaling": "feature"}]

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


# ---- patch heads (edgetl.heads.patch): a head object holds the kind's name and asks here ----------
class PatchKind(HeadKind):
    """A one-class patch head kind (:class:`edgetl.heads.patch.AnomalyHead`): fit and update on good
    images' patch features (N, C, H, W), squared patch distances in numpy and as ONNX nodes."""

    family = "patch"
    has_memory: ClassVar[bool] = False  # a bank of rows that grows with the data (bounded by config)

    def fit(self, F, cfg, *, size: int):
        raise NotImplementedError

    def update(self, head, F):
        raise NotImplementedError

    def memory_size(self, head) -> int:
        return 0

    def patch_d2(self, head, F) -> np.ndarray:
        """Squared distances (N, P) of features ``F`` (N, C, H, W), P = H * W positions."""
        raise NotImplementedError

    def graph_d2(self, b, head, x: str) -> str:
        """Nodes computing :meth:`patch_d2` of ``x`` on a :mod:`edgetl.heads.patch_graph` builder."""
        raise NotImplementedError

    def held_out(self, F, cfg, *, size: int, rng, groups, chosen):
        """(the head on all of ``F``, indices of the images scored, their held-out image scores);
        ``groups``: per row, the frame it was cut from (a frame's tiles are left out together)."""
        raise NotImplementedError


@register
class PatchCore(PatchKind):
    """A memory bank of good patch features; a patch scores its distance to the nearest."""

    name = "patchcore"
    has_memory = True

    def fit(self, F, cfg, *, size):
        from .patch import fit_patchcore

        return fit_patchcore(F, cfg, size=size)

    def update(self, head, F):
        from .patch import _update_patchcore

        return _update_patchcore(head, F)

    def memory_size(self, head):
        return int(head.arrays["memory"].shape[0])

    def patch_d2(self, head, F):
        N, P = F.shape[0], head.grid[0] * head.grid[1]
        X = F.reshape(N, head.channels_in, P).transpose(0, 2, 1)  # (N, P, C)
        mt2, mm = head.knn_constants()
        d2 = (np.sum(X * X, axis=-1, keepdims=True) + X @ mt2) + mm
        return np.min(d2, axis=-1)

    def held_out(self, F, cfg, *, size, rng, groups, chosen):
        # the full bank without the rows that came from the image scored (leave one image out)
        from .patch import maps_from_patches, patchcore_with_sources

        head, src = patchcore_with_sources(F, cfg, size=size)
        M = head.arrays["memory"].astype(np.float32)
        mm = np.sum(M * M, axis=1)[None, :]
        C, (H, W) = head.channels_in, head.grid
        S = np.zeros((len(chosen), H, W), np.float32)
        for j, i in enumerate(chosen):
            X = F[i].reshape(C, H * W).T
            d2 = (np.sum(X * X, axis=1, keepdims=True) - 2.0 * (X @ M.T)) + mm
            d2[:, groups[src] == groups[i]] = np.inf
            S[j] = np.sqrt(np.maximum(d2.min(axis=1), 0)).reshape(H, W)
        return head, chosen, maps_from_patches(S, head.operator)[1]

    def graph_d2(self, b, head, x):
        op, const, reduce = b.op, b.const, b.reduce
        C, P = head.channels_in, head.grid[0] * head.grid[1]
        mt2, mm = head.knn_constants()
        x = op("Reshape", [x, const("shape", np.array([0, C, P], np.int64))])
        x = op("Transpose", [x], perm=[0, 2, 1])  # (N, P, C)
        xx = reduce("ReduceSum", op("Mul", [x, x]), [-1], 1)
        xm = op("MatMul", [x, const("memory_t_x_minus2", mt2)])  # (N, P, K)
        d2 = op("Add", [op("Add", [xx, xm]), const("memory_sq", mm)])
        return reduce("ReduceMin", d2, [-1], 0)  # (N, P)


@register
class PaDiM(PatchKind):
    """A Gaussian per patch position; a patch scores its Mahalanobis distance."""

    name = "padim"

    def fit(self, F, cfg, *, size):
        from .patch import fit_padim

        return fit_padim(F, cfg, size=size)

    def update(self, head, F):
        from .patch import _update_padim

        return _update_padim(head, F)

    def patch_d2(self, head, F):
        N, P = F.shape[0], head.grid[0] * head.grid[1]
        mean, inv = head.padim_params()
        ch = head.arrays["channels"].astype(np.int64)
        X = F[:, ch].reshape(N, len(ch), P)
        if inv.ndim == 3:  # per position: (P, N, d)
            D = X.transpose(2, 0, 1) - mean[:, None, :]
            return np.sum((D @ inv) * D, axis=-1).T
        D = X.transpose(0, 2, 1) - mean[None]
        return np.sum((D @ inv) * D, axis=-1)

    def held_out(self, F, cfg, *, size, rng, groups, chosen):
        # 5-fold refits (whole frames per fold when rows are tiles)
        head = self.fit(F, cfg, size=size)
        scores = np.zeros(len(F), np.float32)
        order = rng.permutation(len(F))
        fold = np.empty(len(F), np.int64)
        fold[order] = np.arange(len(F)) % 5
        if len(np.unique(groups)) < len(F):
            g = np.unique(groups, return_inverse=True)[1]
            fold = rng.permutation(g.max() + 1)[g] % 5
        for f in range(min(5, len(F))):
            held = np.nonzero(fold == f)[0]
            rest = np.nonzero(fold != f)[0]
            if len(held) and len(rest):
                scores[held] = self.fit(F[rest], cfg, size=size).maps(F[held])[1]
        return head, np.arange(len(F)), scores

    def graph_d2(self, b, head, x):
        op, const, reduce = b.op, b.const, b.reduce
        C, P = head.channels_in, head.grid[0] * head.grid[1]
        mean, inv = head.padim_params()
        ch = head.arrays["channels"].astype(np.int64)
        if len(ch) != C or np.any(ch != np.arange(C)):
            x = op("Gather", [x, const("channels", ch)], axis=1)
        x = op("Reshape", [x, const("shape", np.array([0, len(ch), P], np.int64))])  # (N, d, P)
        if inv.ndim == 3:  # one Gaussian per position: work position-major
            x = op("Transpose", [x], perm=[2, 0, 1])  # (P, N, d)
            D = op("Sub", [x, const("mean", mean[:, None, :])])
            q = reduce("ReduceSum", op("Mul", [op("MatMul", [D, const("inv_cov", inv)]), D]), [-1], 0)  # (P, N)
            return op("Transpose", [q], perm=[1, 0])
        x = op("Transpose", [x], perm=[0, 2, 1])  # (N, P, d)
        D = op("Sub", [x, const("mean", mean[None])])
        return reduce("ReduceSum", op("Mul", [op("MatMul", [D, const("inv_cov", inv)]), D]), [-1], 0)


# ---- image-level one-class heads (edgetl.heads.oneclass) ------------------------------------------
class ImageKind(HeadKind):
    """An image-level one-class head kind (:class:`edgetl.heads.oneclass.ImageHead`) on pooled
    features (N, D): fit, update, float32 scoring constants, scores and their ONNX nodes."""

    family = "image"
    has_memory: ClassVar[bool] = False  # a bank of rows that grows with the data (bounded by config)
    parts = ("image",)  # a defect head scoring as an image kind uses its image part alone

    def fit(self, Z, cfg):
        raise NotImplementedError

    def update(self, head, Z):
        raise NotImplementedError

    def memory_size(self, head) -> int:
        return 0

    def images(self, head) -> int:
        return int(head.meta.get("images", self.memory_size(head)))

    def constants(self, head) -> dict:
        raise NotImplementedError

    def scores(self, head, Z, c: dict, *, exclude_self: bool = False) -> np.ndarray:
        raise NotImplementedError

    def held_out_scores(self, Z, cfg, *, folds: int, seed: int) -> np.ndarray:
        """Scores of the training images by heads that never saw them: ``folds``-fold refits."""
        order = np.random.default_rng(seed).permutation(len(Z))
        out = np.zeros(len(Z), np.float32)
        for f in range(min(folds, len(Z))):
            held = order[f::folds]
            rest = np.setdiff1d(order, held)
            out[held] = self.fit(Z[rest], cfg).scores(Z[held])
        return out

    def graph_scores(self, b, head, z: str) -> str:
        raise NotImplementedError


@register
class KNN(ImageKind):
    """Distance of the pooled feature to its nearest good images (a coreset memory)."""

    name = "knn"
    has_memory = True

    def fit(self, Z, cfg):
        from .oneclass import ImageHead
        from .patch import greedy_coreset

        idx = greedy_coreset(Z, min(cfg.max_images, len(Z)), seed=cfg.seed, projection=cfg.projection)
        return ImageHead(cfg, int(Z.shape[1]), {"memory": Z[idx]}, {"images": int(len(Z))})

    def update(self, head, Z):
        from .patch import greedy_coreset

        cfg = head.config
        pool = np.concatenate([head.arrays["memory"].astype(np.float32), Z])
        if len(pool) > cfg.max_images:
            pool = pool[greedy_coreset(pool, cfg.max_images, seed=cfg.seed, projection=cfg.projection)]
        return {"memory": pool}

    def memory_size(self, head):
        return int(head.arrays["memory"].shape[0])

    def constants(self, head):
        M = head.arrays["memory"].astype(np.float32)
        return {
            "mt2": (-2.0 * M.T).astype(np.float32),
            "mm": np.sum(M * M, axis=1)[None, :].astype(np.float32),
            "k": min(head.config.k, len(M)),
        }

    def scores(self, head, Z, c, *, exclude_self=False):
        d2 = (np.sum(Z * Z, axis=-1, keepdims=True) + Z @ c["mt2"]) + c["mm"]
        if exclude_self:
            d2[np.arange(len(Z)), np.arange(len(Z))] = np.inf
        k = min(c["k"], d2.shape[1] - (1 if exclude_self else 0))
        d2 = np.sort(d2, axis=1)[:, : max(k, 1)]
        return np.mean(np.sqrt(np.maximum(d2, np.float32(0))), axis=1).astype(np.float32)

    def held_out_scores(self, Z, cfg, *, folds, seed):
        # leave-one-out on the full memory: exact when no coreset thinned it
        import dataclasses

        full = self.fit(Z, dataclasses.replace(cfg, max_images=len(Z)))
        return full.scores(Z, exclude_self=True)

    def graph_scores(self, b, head, z):
        op, const, reduce = b.op, b.const, b.reduce
        zero = const("zero", np.array(0.0, np.float32))
        c = head.constants()
        zz = reduce("ReduceSum", op("Mul", [z, z]), [-1], 1)
        d2 = op(
            "Add",
            [op("Add", [zz, op("MatMul", [z, const("memory_t_x_minus2", c["mt2"])])]), const("memory_sq", c["mm"])],
        )  # (N, K)
        out = b.name("topk_values")
        b.nodes.append(
            b.onnx.helper.make_node(
                "TopK",
                [d2, const("k", np.array([c["k"]], np.int64))],
                [out, b.name("topk_indices")],
                name=b.name("TopK"),
                axis=-1,
                largest=0,
                sorted=1,
            )
        )
        return reduce("ReduceMean", op("Sqrt", [op("Max", [out, zero])]), [-1], 0)


@register
class Gaussian(ImageKind):
    """Mahalanobis distance of the pooled feature to the good images' Gaussian (exact moment merges)."""

    name = "gaussian"

    def fit(self, Z, cfg):
        from .oneclass import ImageHead, moments

        mean, m2, n = moments(Z)
        arrays: dict[str, np.ndarray] = {
            "mean": mean.astype(np.float32),
            "m2": m2.astype(np.float32),
            "count": np.asarray(n, np.int64),
        }
        return ImageHead(cfg, int(Z.shape[1]), arrays, {"images": int(n)})

    def update(self, head, Z):
        from .oneclass import moments
        from .patch import merge_moments

        a = head.arrays
        mean_b, m2_b, n_b = moments(Z)
        n_a = int(np.asarray(a["count"]).reshape(-1)[0])
        mean, m2, n = merge_moments(a["mean"].astype(np.float64), a["m2"].astype(np.float64), n_a, mean_b, m2_b, n_b)
        return {"mean": mean.astype(np.float32), "m2": m2.astype(np.float32), "count": np.asarray(n, np.int64)}

    def images(self, head):
        return int(np.asarray(head.arrays["count"]).reshape(-1)[0])

    def constants(self, head):
        from .oneclass import gaussian_params

        mean, inv = gaussian_params(head.arrays)
        return {"mean": mean, "inv": inv}

    def scores(self, head, Z, c, *, exclude_self=False):
        D = Z - c["mean"][None]
        d2 = np.sum((D @ c["inv"]) * D, axis=-1)
        return np.sqrt(np.maximum(d2, np.float32(0))).astype(np.float32)

    def graph_scores(self, b, head, z):
        op, const, reduce = b.op, b.const, b.reduce
        zero = const("zero", np.array(0.0, np.float32))
        c = head.constants()
        D = op("Sub", [z, const("mean", c["mean"][None])])
        d2 = reduce("ReduceSum", op("Mul", [op("MatMul", [D, const("inv_cov", c["inv"])]), D]), [-1], 0)
        return op("Sqrt", [op("Max", [d2, zero])])


class DefectKind(HeadKind):
    """A way a defect head (:class:`edgetl.heads.defect.DefectHead`) scores: which of its parts.
    ``fits``: a defect head is fitted as this kind (else it is only a view of a fitted one)."""

    family = "defect"
    fits: ClassVar[bool] = True


@register
class Combined(DefectKind):
    """The defect detector scoring a patch head and an image head together."""

    name = "combined"
    parts = ("patch", "image")


@register
class PatchPart(DefectKind):
    """A defect head scoring with its patch part alone (saved as that patch head)."""

    name = "patch"
    parts = ("patch",)
    fits = False


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
