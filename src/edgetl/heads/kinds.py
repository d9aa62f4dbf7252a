"""The built-in head kinds, one class each, registered with :mod:`.registry` when ``edgetl.heads``
is imported: classification (linear, mlp, prototype), patch (patchcore, padim), image-level
(knn, gaussian) and the defect head's scoring modes (combined, patch).

They sit above the heads they drive (:mod:`.classification`, :mod:`.training`, :mod:`.crossfit`,
:mod:`.patch`, :mod:`.oneclass`, :mod:`.heldout`), which import only the registry's mechanism, so no
heads module imports one that imports it back. A kind defined elsewhere (a test, a plugin) subclasses
a family base here and registers itself the same way.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

# Only the registry at import time: every kind is registered before any heads module that reads the
# registry's names (HEAD_KINDS, PATCH_KINDS, ...) is imported; the heads they drive are imported
# inside the methods that use them.
from .registry import NORM_EPS, GraphBuilder, HeadKind, register

__all__ = ["ClassifyKind", "DefectKind", "ImageKind", "PatchKind"]


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
        from .crossfit import train_builtin

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


@register
class Prototype(ClassifyKind):
    """Nearest class mean under cosine similarity, with a temperature; no optimiser, no L2."""

    name = "prototype"
    uses_l2 = False
    calibration_keys = ()
    spec = {"mean": ("d",), "prototypes": ("d", "k"), "logit_scale": (), "b": ("k",)}

    def logits(self, a, X):
        from .classification import prototype_logits

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
        from .heldout import same_group
        from .patch import maps_from_patches, patchcore_with_sources

        head, src = patchcore_with_sources(F, cfg, size=size)
        M = head.arrays["memory"].astype(np.float32)
        mm = np.sum(M * M, axis=1)[None, :]
        C, (H, W) = head.channels_in, head.grid
        S = np.zeros((len(chosen), H, W), np.float32)
        for j, i in enumerate(chosen):
            X = F[i].reshape(C, H * W).T
            d2 = (np.sum(X * X, axis=1, keepdims=True) - 2.0 * (X @ M.T)) + mm
            d2[:, same_group(groups, [i], src)[0]] = np.inf
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
        # refits on folds of whole frames (each row its own frame when rows are not tiles)
        from .heldout import refit_scores

        scores = refit_scores(
            lambda rest, held: self.fit(F[rest], cfg, size=size).maps(F[held])[1], len(F), seed=rng, groups=groups
        )
        return self.fit(F, cfg, size=size), np.arange(len(F)), scores

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

    def scores(self, head, Z, c: dict) -> np.ndarray:
        raise NotImplementedError

    def held_out_scores(self, Z, cfg, *, folds: int, seed: int, groups=None) -> np.ndarray:
        """Scores of the training images by heads that saw neither them nor any image of their group
        (``groups``: one entry per row, None: each row its own): ``folds``-fold refits over whole groups."""
        from .heldout import refit_scores

        return refit_scores(
            lambda rest, held: self.fit(Z[rest], cfg).scores(Z[held]), len(Z), folds=folds, seed=seed, groups=groups
        )

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

    def scores(self, head, Z, c):
        return self._mean_nearest(Z, c, c["k"])

    @staticmethod
    def _mean_nearest(Z, c, k: int, masked=None) -> np.ndarray:
        """Mean distance to the ``k`` nearest memory rows, ``masked`` (N, K) rows left out."""
        d2 = (np.sum(Z * Z, axis=-1, keepdims=True) + Z @ c["mt2"]) + c["mm"]
        if masked is not None:
            d2[masked] = np.inf
        d2 = np.sort(d2, axis=1)[:, :k]
        return np.mean(np.sqrt(np.maximum(d2, np.float32(0))), axis=1).astype(np.float32)

    def held_out_scores(self, Z, cfg, *, folds, seed, groups=None):
        # the full memory with the scored row's group left out (leave one group out): exact when no
        # coreset thinned it, and no refits (the memory's rows are Z's, in order)
        import dataclasses

        from .heldout import group_index, same_group

        full = self.fit(Z, dataclasses.replace(cfg, max_images=len(Z)))
        c = full.constants()
        k = min(c["k"], len(Z) - int(np.bincount(group_index(groups, len(Z))).max()))
        out = np.zeros(len(Z), np.float32)
        if k < 1:  # one group: nothing to score it against
            return out
        columns = np.arange(len(Z))
        for s in range(0, len(Z), 1024):  # bounded memory on many tiles
            rows = columns[s : s + 1024]
            out[rows] = self._mean_nearest(Z[rows], c, k, same_group(groups, rows, columns))
        return out

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

    def scores(self, head, Z, c):
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
