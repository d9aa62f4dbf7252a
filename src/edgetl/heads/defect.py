"""Both kinds of anomaly in one detector: a patch head (local defects) and an image-level head
(the wrong part altogether) on one backbone, scored together.

The backbone is the patch-feature export with its pooled features appended (one flat row per
image: the patch map, then the pooled vector). Kinds:

``combined`` (default)
    patch head + image head. Each part's raw score becomes a z-score against its scores on
    held-out good images (training images scored by heads that never saw them:
    leave-one-image-out for patchcore and knn, 5-fold refits for padim and gaussian; on tiled
    frames a frame's tiles are left out together and a part is normalised on frame maxima, see
    :func:`fit_defect_head`), and the
    score is their soft maximum, shifted by one constant so that it stays positive like every
    other head's score (the threshold convention needs it):
    ``log(exp z_patch + exp z_image) + c``, ``c = max(mean_patch / sd_patch, mean_image / sd_image)``.
    A soft maximum follows whichever part sees the anomaly (a wrong part is as far off as its image
    part says, a small defect as far as its patch part says; a part that sees nothing adds at most
    log 2 to good and bad images alike), and when both parts see it, it adds up to log 2 more. The
    mean of the two z-scores (the rule of heads saved before) halves a part's evidence whenever the
    other part sees nothing, and fell below the better part alone on wrong parts; the plain
    maximum gives up what the parts add together (``benchmarks/combine.py``). The anomaly map is the
    patch part on the score's scale (``map / sd_patch + c - mean_patch / sd_patch``): the score is
    never below its maximum; its pixel AUROC is the patch head's.
``knn`` / ``gaussian``
    the image head alone (:mod:`edgetl.heads.oneclass`): raw distance, no heat map.

The normalisation constants are fitted once and carried over by ``adapt`` (new good images only
lower good scores, so the old cut stays conservative). numpy only; :meth:`DefectHead.graph` is the
exported scoring graph.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from ..core.bundle import write_npz_durably
from ..errors import BundleError, ConfigError, DataError
from . import registry
from .heldout import group_max
from .oneclass import (
    ImageConfig,
    ImageHead,
    fit_image_head,
    held_out_scores,
    image_scores_nodes,
    update_image_head,
)
from .patch import (
    HEADER_KEY,
    AnomalyConfig,
    AnomalyHead,
    maps_from_patches,
    read_head_file,
    update_patch_head,
)


def _fits_as_defect(kind: str) -> bool:
    """A defect head is fitted as a fitting defect kind (combined) or as an image kind alone."""
    return registry.known(kind, "image") or (registry.known(kind, "defect") and registry.get(kind).fits)


# The kinds a defect head is fitted as (a snapshot at import).
DEFECT_KINDS = tuple(n for n in (*registry.names("defect"), *registry.names("image")) if _fits_as_defect(n))
_FORMAT = "edgetl-defect-head"
_FORMAT_VERSION = 1
# How a combined head joins its parts: "softmax" of the z-scores (fitted now), or the "mean" of
# heads saved before (read back as such, so their thresholds keep meaning what they meant).
RULES = ("softmax", "mean")
# Held-out scoring of patchcore costs one pass over the bank per training image: a random subset
# this large pins the normalisation well enough (its standard error ~ 1/sqrt(2n) of the spread).
MAX_NORM_IMAGES = 80
# Tiled frames are normalised on frame maxima, so patchcore scores every tile of the frames chosen:
# at most this many tiles (4x the untiled cost), but never fewer frames than MIN_NORM_FRAMES (the
# spread of fewer is too loose: standard error ~ 1/sqrt(2n), 16 % at 20).
MAX_NORM_TILES = 4 * MAX_NORM_IMAGES
MIN_NORM_FRAMES = 20


def _triple(values) -> tuple[int, int, int]:
    """A patch grid's (channels, height, width), as the head stores it."""
    c, h, w = (int(v) for v in values)
    return c, h, w


@dataclass(frozen=True)
class DefectConfig:
    """A detector with an image-level part. ``patch``: the patch head's settings (its ``kind``:
    patchcore or padim); ``image``: the image head's. ``quantile`` / ``margin``: good-only threshold
    (as for patch heads, on this detector's score)."""

    kind: str = "combined"
    patch: AnomalyConfig = AnomalyConfig()
    image: ImageConfig = ImageConfig()

    def __post_init__(self) -> None:
        if not _fits_as_defect(self.kind):
            raise ConfigError(f"defect head {self.kind!r} is not one of {', '.join(DEFECT_KINDS)}")

    pooled = True  # the backbone export these heads read (``export_backbone(patch_pooled=True)``)

    @property
    def reductions(self) -> tuple[int, ...]:
        return self.patch.reductions

    @property
    def quantile(self) -> float:
        return self.patch.quantile

    @property
    def margin(self) -> float:
        return self.patch.margin

    @property
    def sigma(self) -> float:
        return self.patch.sigma

    @property
    def seed(self) -> int:
        return self.patch.seed

    @property
    def defect_size(self) -> float | None:
        return self.patch.defect_size

    @property
    def overview(self) -> str:
        return self.patch.overview

    def to_dict(self) -> dict:
        return {"kind": self.kind, "patch": self.patch.to_dict(), "image": self.image.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> DefectConfig:
        """From ``to_dict`` output, or flat options: ``kind``, ``seed``, ``patch_kind`` and any
        patch- or image-head field (``coreset_ratio``, ``k``, ...)."""
        if not isinstance(d, dict):
            raise ConfigError(f"defect head config must be a mapping, got {type(d).__name__}")
        d = dict(d)
        kind = d.pop("kind", "combined")
        patch, image = dict(d.pop("patch", {})), dict(d.pop("image", {}))
        if "patch_kind" in d:
            patch["kind"] = d.pop("patch_kind")
        if "seed" in d:
            seed = d.pop("seed")
            patch.setdefault("seed", seed)
            image.setdefault("seed", seed)
        image_fields = {f.name for f in dataclasses.fields(ImageConfig)} - {"kind"}
        for key in list(d):
            (image if key in image_fields else patch)[key] = d.pop(key)
        if registry.known(kind, "image"):
            image["kind"] = kind
        return cls(kind, AnomalyConfig.from_dict(patch), ImageConfig.from_dict(image))


@dataclass
class DefectHead:
    """A fitted detector: ``patch`` (None for an image-only kind), ``image``, and ``norm``: per
    part, (mean, std) of held-out good scores (the std scales the part; the mean is kept as a
    record of where good images score), of frames where the rows are tiles (``meta["frames"]``:
    how many)."""

    kind: str
    config: DefectConfig
    patch: AnomalyHead | None
    image: ImageHead
    patch_shape: tuple[int, int, int]  # (C, H, W) of the patch part of a feature row
    size: int
    norm: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    rule: str = "softmax"

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts this head scores with: ``("patch", "image")``, ``("patch",)`` or ``("image",)``."""
        return registry.parts(self.kind)

    @property
    def combined(self) -> bool:
        return len(self.parts) == 2

    @property
    def has_map(self) -> bool:
        return self.patch is not None and "patch" in self.parts

    def as_kind(self, kind: str) -> DefectHead:
        """The same fitted parts scoring as ``kind``: ``combined``, ``patch`` (the patch part
        alone) or the image kind (the image part alone)."""
        parts = registry.parts(kind)
        image_only = parts == ("image",)
        if not parts or (image_only and kind != self.image.kind) or (not image_only and self.patch is None):
            raise ConfigError(f"a {self.kind} defect head cannot score as {kind!r}")
        return dataclasses.replace(self, kind=kind)

    @property
    def label(self) -> str:
        """What scores, for people: ``patchcore + knn``, ``knn``, ``padim``."""
        heads = {"patch": self.patch, "image": self.image}
        return " + ".join(heads[p].kind for p in self.parts)  # type: ignore[union-attr]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.patch_shape[1:])  # type: ignore[return-value]

    @property
    def memory_size(self) -> int:
        return self.patch.memory_size if self.patch is not None else 0

    @property
    def width(self) -> int:
        return int(np.prod(self.patch_shape)) + self.image.dims

    def split(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, L) feature rows -> (patch features (N, C, H, W), pooled features (N, D))."""
        X = np.asarray(X, np.float32)
        if X.ndim != 2 or X.shape[1] != self.width:
            raise DataError(f"defect head expects feature rows of shape (N, {self.width}), got {X.shape}")
        n = int(np.prod(self.patch_shape))
        return X[:, :n].reshape(len(X), *self.patch_shape), X[:, n:]

    def scale(self, part: str) -> np.float32:
        """A part's factor in the combined score, float32: 1 / (std of its held-out good scores)
        (``mean`` rule: 0.5 / std)."""
        if self.rule == "mean":
            return np.float32(0.5 / self.norm[part][1])
        return softmax_terms(self.norm)[part][0]

    def offset(self, part: str) -> np.float32:
        """A part's shift in the combined score (``softmax`` rule; 0 for ``mean``): every term is >= 0."""
        if self.rule == "mean":
            return np.float32(0.0)
        return softmax_terms(self.norm)[part][1]

    def map_cut(self, threshold: float) -> float:
        """The map value that is "at the threshold", for drawing: the combined score is the map's
        peak plus the image part, so a map divided by the threshold itself fades even on a caught
        defect. With the image part at a typical good image's value (its held-out mean), the
        patch part reaches the threshold at ``threshold - 0.5 * mean / sd``."""
        if not self.combined or "image" not in self.norm:
            return float(threshold)
        if self.rule == "softmax":  # the patch term t with log(exp t + exp c) = threshold, c: a typical image term
            c = float(self.offset("image")) + self.norm["image"][0] / self.norm["image"][1]
            return float(threshold) + math.log1p(-math.exp(c - float(threshold))) if threshold > c else float(threshold)
        mean, sd = self.norm["image"]
        cut = float(threshold) - 0.5 * mean / sd
        return cut if cut > 0 else float(threshold)

    def maps(self, X: np.ndarray, *, chunk: int = 8) -> tuple[np.ndarray | None, np.ndarray]:
        """(N, L) feature rows -> (maps (N, S, S) or None, scores (N,)), float32, as the graph computes them."""
        F, Z = self.split(X)
        si = self.image.scores(Z)
        if self.patch is None or not self.has_map:
            return None, si
        S = self.patch.patch_scores(F, chunk=chunk)
        m, sp = maps_from_patches(S, self.patch.operator)
        if not self.combined:
            return m, sp
        return m * self.scale("patch") + self.offset("patch"), self.combine(sp, si)

    def combine(self, sp: np.ndarray, si: np.ndarray) -> np.ndarray:
        """The combined score of raw patch-part and image-part scores, by the head's rule (as the
        graph computes it)."""
        ap, ai = self.scale("patch"), self.scale("image")
        if self.rule == "mean":
            return (sp * ap) + (si * ai)
        return softmax2(sp * ap + self.offset("patch"), si * ai + self.offset("image"))

    def part_scores(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """Raw patch and image scores of feature rows (the patch part only where there is one)."""
        F, Z = self.split(X)
        out = {"image": self.image.scores(Z)}
        if self.patch is not None:
            out["patch"] = self.patch.maps(F)[1]
        return out

    def graph(self, opset: int = 18, ir_version: int | None = None):
        """Feature rows ``anomaly/features`` (N, L) -> ``anomaly_map`` (N, S, S) and ``score`` (N,)
        (combined), or ``score`` alone (image-only kinds)."""
        from .patch_graph import INPUT, OUTPUTS, GraphBuilder, patch_scores_nodes

        b = GraphBuilder(opset)
        TP, helper = b.onnx.TensorProto, b.onnx.helper
        n = int(np.prod(self.patch_shape))
        axis = b.const("axis", np.array([1], np.int64))

        def pooled() -> str:
            return b.op(
                "Slice",
                [
                    INPUT,
                    b.const("start", np.array([n], np.int64)),
                    b.const("end", np.array([self.width], np.int64)),
                    axis,
                ],
            )

        outs = []
        if not self.has_map:
            b.op("Identity", [image_scores_nodes(b, self.image, pooled())], OUTPUTS[1])
        elif not self.combined:
            x = b.op(
                "Slice",
                [INPUT, b.const("start", np.array([0], np.int64)), b.const("end", np.array([n], np.int64)), axis],
            )
            x = b.op("Reshape", [x, b.const("shape", np.array([0, *self.patch_shape], np.int64))])
            m, sp = patch_scores_nodes(b, self.patch, x)
            b.op("Identity", [m], OUTPUTS[0])
            b.op("Identity", [sp], OUTPUTS[1])
            outs.append(helper.make_tensor_value_info(OUTPUTS[0], TP.FLOAT, ["batch", self.size, self.size]))
        else:
            si = image_scores_nodes(b, self.image, pooled())
            x = b.op(
                "Slice",
                [INPUT, b.const("start", np.array([0], np.int64)), b.const("end", np.array([n], np.int64)), axis],
            )
            x = b.op("Reshape", [x, b.const("shape", np.array([0, *self.patch_shape], np.int64))])
            m, sp = patch_scores_nodes(b, self.patch, x)
            ap = b.const("patch_scale", self.scale("patch"))
            zi = b.op("Mul", [si, b.const("image_scale", self.scale("image"))])
            if self.rule == "mean":
                b.op("Mul", [m, ap], OUTPUTS[0])
                b.op("Add", [b.op("Mul", [sp, ap]), zi], OUTPUTS[1])
            else:  # max(a, b) + log(1 + exp(-|a - b|)): no overflow however far off a part is
                bp = b.const("patch_offset", self.offset("patch"))
                b.op("Add", [b.op("Mul", [m, ap]), bp], OUTPUTS[0])
                ta = b.op("Add", [b.op("Mul", [sp, ap]), bp])
                tb = b.op("Add", [zi, b.const("image_offset", self.offset("image"))])
                gap = b.op("Neg", [b.op("Abs", [b.op("Sub", [ta, tb])])])
                soft = b.op("Log", [b.op("Add", [b.const("one", np.array(1.0, np.float32)), b.op("Exp", [gap])])])
                b.op("Add", [b.op("Max", [ta, tb]), soft], OUTPUTS[1])
            outs.append(helper.make_tensor_value_info(OUTPUTS[0], TP.FLOAT, ["batch", self.size, self.size]))
        outs.append(helper.make_tensor_value_info(OUTPUTS[1], TP.FLOAT, ["batch"]))
        return b.model(
            f"edgetl_defect_{self.kind}",
            [helper.make_tensor_value_info(INPUT, TP.FLOAT, ["batch", self.width])],
            outs,
            ir_version,
        )

    # ---- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """An uncompressed ``.npz`` (atomic write): arrays of both parts, settings as JSON bytes."""
        header = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "kind": self.kind,
            "config": self.config.to_dict(),
            "patch_shape": list(self.patch_shape),
            "size": self.size,
            "dims": self.image.dims,
            "norm": {k: [float(v) for v in vs] for k, vs in self.norm.items()},
            "meta": self.meta,
            "rule": self.rule,
            "image_meta": self.image.meta,
            "patch_meta": self.patch.meta if self.patch is not None else None,
        }
        payload = {f"image.{k}": np.asarray(v, order="C") for k, v in self.image.arrays.items()}
        if self.patch is not None:
            payload.update({f"patch.{k}": np.asarray(v, order="C") for k, v in self.patch.arrays.items()})
        payload[HEADER_KEY] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
        write_npz_durably(Path(path), **payload)

    @classmethod
    def load(cls, path: str | Path | IO[bytes]) -> DefectHead:
        """Read a head written by :meth:`save` (``allow_pickle=False``).

        Raises:
            BundleError: missing, unreadable, or not a defect head.
        """
        path = Path(path) if isinstance(path, str) else path  # a path, or a bundle's verified bytes
        raw, header = read_head_file(path)
        if header.get("format") != _FORMAT or header.get("version") != _FORMAT_VERSION:
            raise BundleError(
                f"{path}: not an edgetl defect head (format {header.get('format')!r} "
                f"v{header.get('version')}; this edgetl reads {_FORMAT} v{_FORMAT_VERSION})"
            )
        try:
            cfg = DefectConfig.from_dict(header["config"])
            part = lambda p: {k.split(".", 1)[1]: v for k, v in raw.items() if k.startswith(p + ".")}  # noqa: E731
            image = ImageHead(cfg.image, int(header["dims"]), part("image"), header.get("image_meta") or {})
            need = {"knn": {"memory"}, "gaussian": {"mean", "m2", "count"}}[cfg.image.kind]
            shape = tuple(int(d) for d in header["patch_shape"])
            patch = None
            if header["kind"] in ("combined", "patch"):
                need_p = {"patchcore": {"memory"}, "padim": {"channels", "mean", "m2", "count"}}[cfg.patch.kind]
                if not need_p <= set(part("patch")):
                    raise KeyError("patch arrays")
                patch = AnomalyHead(
                    cfg.patch.kind,
                    cfg.patch,
                    (shape[1], shape[2]),
                    shape[0],
                    int(header["size"]),
                    part("patch"),
                    header.get("patch_meta") or {},
                )
            if not need <= set(image.arrays):
                raise KeyError("image arrays")
            norm = {k: (float(v[0]), float(v[1])) for k, v in header.get("norm", {}).items()}
            rule = header.get("rule", "mean")  # heads saved before the rule was recorded averaged
            if rule not in RULES:
                raise ValueError(f"combination rule {rule!r}")
            return cls(
                header["kind"],
                cfg,
                patch,
                image,
                _triple(shape),
                int(header["size"]),
                norm,
                header.get("meta", {}),
                rule,
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise BundleError(f"{path}: defect head is incomplete ({exc})") from None


def softmax_terms(norm: dict) -> dict[str, tuple[np.float32, np.float32]]:
    """Per part, (scale, offset) of its term in a soft maximum of z-scores, float32: ``1 / sd`` and
    ``c - mean / sd`` with ``c = max(mean / sd)`` over the parts, so that every term is a z-score
    shifted by the same constant (a part's term on good items sits at ``c``, spread 1) and the
    soft maximum stays positive like every other head's score. ``norm``: per part, (mean, sd) of
    its held-out good scores. The one rule for a head's parts (:meth:`DefectHead.combine`) and for
    the views of a tiled frame (:class:`edgetl.tasks.anomaly.tiles.Overview`)."""
    c = max(m / sd for m, sd in norm.values())
    return {k: (np.float32(1.0 / sd), np.float32(c - m / sd)) for k, (m, sd) in norm.items()}


def softmax2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """log(exp a + exp b), float32, computed as the graph does (no overflow)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return (np.maximum(a, b) + np.log(np.float32(1.0) + np.exp(-np.abs(a - b)))).astype(np.float32)


def load_any_head(path: str | Path | IO[bytes]):
    """A defect bundle's head file: a :class:`DefectHead`, or a patch-only :class:`AnomalyHead`."""
    path = Path(path) if isinstance(path, str) else path
    _, header = read_head_file(path)
    return DefectHead.load(path) if header.get("format") == _FORMAT else AnomalyHead.load(path)


# ----- fitting ----------------------------------------------------------------------------------
def good_norm(scores: np.ndarray) -> tuple[float, float]:
    """(mean, sd) of held-out good scores: what a z-score is taken against (sd kept above 0)."""
    s = np.asarray(scores, np.float64)
    sd = float(s.std(ddof=1)) if len(s) > 1 else 0.0
    return float(s.mean()), max(sd, 1e-6 * abs(float(s.mean())), 1e-12)


def held_out_patch_scores(
    F: np.ndarray,
    cfg: AnomalyConfig,
    *,
    size: int,
    seed: int = 0,
    groups: np.ndarray | None = None,
    rows: np.ndarray | None = None,
) -> tuple[AnomalyHead, np.ndarray, np.ndarray]:
    """(the patch head on all of F, indices of the images scored, their held-out image scores).

    patchcore: the full bank without the rows that came from the image scored (leave one image
    out, at most :data:`MAX_NORM_IMAGES` images); padim: 5-fold refits. ``groups``: per row of F,
    the frame it was cut from (tiles of one frame overlap, so all of them are left out together).
    ``rows``: the rows patchcore scores (every tile of a frame, where a frame's score is wanted).
    """
    rng = np.random.default_rng(seed)
    groups = np.arange(len(F)) if groups is None else np.asarray(groups).reshape(-1)
    chosen = np.sort(rng.permutation(len(F))[:MAX_NORM_IMAGES]) if rows is None else np.asarray(rows)
    return registry.get(cfg.kind, "patch").held_out(F, cfg, size=size, rng=rng, groups=groups, chosen=chosen)


def fit_defect_head(
    X: np.ndarray, cfg: DefectConfig, *, patch_shape: tuple[int, int, int], size: int, groups: np.ndarray | None = None
) -> DefectHead:
    """Fit ``cfg`` on good images' feature rows (N, L) and its held-out normalisation (``groups``:
    the frame each row was cut from, when rows are tiles).

    Tiled frames: every held-out score comes from a head that saw no tile of the scored tile's
    frame (the tiles of a frame overlap: a neighbour tile in the memory scores a tile almost as
    well as the tile itself, which made good tiles look closer than a new frame's tiles are), and
    a part's normalisation is that of its held-out *frame* scores, the maximum over a frame's
    tiles. Why the frame and not the tile: the device scores every tile and a frame's score is the
    maximum of its tiles' scores, and thresholds are set on those frame scores. A part's term in
    the combined score is increasing and affine in its raw score, so the maximum over tiles of the
    term is the term of the part's frame maximum; normalised on frame maxima, each part's term then
    sits on good frames where it sits on good untiled images (mean ``c``, spread 1), and a frame's
    score is between the maximum and the soft maximum of its parts' frame z-scores, as an untiled
    image's is. Normalised on tiles, each part's frame maximum lands above ``c`` by an amount that
    depends on how its tile scores spread within a frame, which differs between the parts (a
    tile's pooled features see a piece of the part, its patches see everything in it), so the
    balance between the parts would drift with the tiling.

    Raises:
        DataError: fewer than 3 good images (a held-out spread needs them).
    """
    X = np.asarray(X, np.float32)
    if X.ndim != 2 or len(X) < 3:
        raise DataError(f"defect heads with an image part need >= 3 good training images, got {len(X)}")
    n = int(np.prod(patch_shape))
    F, Z = X[:, :n].reshape(len(X), *patch_shape), X[:, n:]
    image = fit_image_head(Z, cfg.image)
    if groups is not None:
        groups = np.asarray(groups).reshape(-1)
        if len(groups) != len(X):
            raise DataError(f"groups need one entry per feature row: {len(groups)} for {len(X)} rows")
    held_i = held_out_scores(Z, cfg.image, seed=cfg.seed, groups=groups)
    norm = {"image": good_norm(held_i if groups is None else group_max(held_i, groups))}
    patch = None
    if "patch" in registry.parts(cfg.kind):
        rows = None if groups is None else norm_rows(groups, cfg.seed)
        patch, picked, held = held_out_patch_scores(F, cfg.patch, size=size, seed=cfg.seed, groups=groups, rows=rows)
        norm["patch"] = good_norm(held if groups is None else group_max(held, groups, picked))
    meta = {"images": int(len(X))} if groups is None else {"images": int(len(X)), "frames": len(np.unique(groups))}
    return DefectHead(cfg.kind, cfg, patch, image, _triple(patch_shape), size, norm, meta)


def norm_rows(groups: np.ndarray, seed: int) -> np.ndarray:
    """Every tile of a seeded choice of frames: the rows whose held-out scores give the frame
    maxima a patch part is normalised on (patchcore scores only these; padim scores every row
    anyway). As many frames as :data:`MAX_NORM_TILES` tiles allow, within
    [:data:`MIN_NORM_FRAMES`, :data:`MAX_NORM_IMAGES`]."""
    names, counts = np.unique(groups, return_counts=True)
    frames = min(MAX_NORM_IMAGES, max(MAX_NORM_TILES // int(counts.max()), MIN_NORM_FRAMES))
    chosen = np.random.default_rng(seed).permutation(len(names))[:frames]
    return np.nonzero(np.isin(groups, names[chosen]))[0]


def update_defect_head(head: DefectHead, X: np.ndarray) -> DefectHead:
    """``head`` after also learning good feature rows ``X``; the normalisation carries over."""
    F, Z = head.split(X)
    patch = update_patch_head(head.patch, F) if head.patch is not None else None
    return dataclasses.replace(
        head,
        patch=patch,
        image=update_image_head(head.image, Z),
        meta=dict(head.meta, images=int(head.meta.get("images", 0)) + len(X)),
    )
