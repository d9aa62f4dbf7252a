"""Small defects on large frames: the frame is scored as overlapping tiles at the backbone's own
input size, through the one fused tile model, and put back together.

Why tiles (and not a larger input for the backbone, or coarse-to-fine): the exported model stays
the one every target already runs (one static input shape: NPUs and TensorRT need nothing new, the
INT8 calibration and parity checks are unchanged), memory on the device is one tile batch, and a
defect is seen at the resolution the backbone was trained on. A larger input would need a second
export per frame size and shape-dependent pooling in the graph; coarse-to-fine misses what the
coarse pass cannot see, which is exactly the thin crack.

The plan is fitted once, from the training frames' size and the smallest defect the user cares
about (``defect_size`` px): the frame is scaled by ``min(1, MIN_INPUT_PX / defect_size)`` so that
such a defect still covers ``MIN_INPUT_PX`` pixels of the backbone's input (its finest features
have stride 4 and are 3x3-averaged, so a 2 px line still moves them), then covered by the fewest
tiles of the input size, spaced evenly (they overlap wherever the frame does not divide evenly).
When the whole frame shrunk to the input size already keeps the defect that large, there is one
view and no tiling, as before.

Beside the tiles, a plan has an overview (:class:`Overview`): the whole working frame in one view,
one more row of the same input size, scored by a head of its own. Tiles find small defects but
lose some large, low-contrast ones that one view of the frame sees whole.

The device loop (numpy + Pillow, no torch): decode, scale to the working size, cut the tiles,
one model call on the (n_tiles, 3, S, S) batch (a static-batch target pads / splits it as for any
batch), then the tiles' score is the maximum of their scores and the map the maximum of the tile
maps where they overlap, at the working size; with the overview, the frame's score is the soft
maximum of the two views' z-scores and its map the maximum of both maps in those units.
Thresholds are set on these frame scores.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ...core.preprocess import PreprocessConfig, check_cost, decode, load_rgb, max_pixels, to_tensor
from ...errors import BundleError, DataError
from ...heads.defect import softmax2, softmax_terms
from .data import _MASK_LEVEL

# The smallest defect is scaled to cover this many input pixels (see the module docstring).
MIN_INPUT_PX = 2.0
# What `fit` assumes when not told: a thin scratch or crack, a few pixels wide.
DEFAULT_DEFECT_SIZE = 3.0
# Tiling only pays when the working frame is clearly larger than one view.
MIN_GAIN = 1.15
# Frames whose aspect ratio differs from the fitted one by more than this are refused.
ASPECT_TOLERANCE = 0.02


def _int(v) -> int:
    """An integer field of a stored plan (a bool or a fraction is refused, not truncated)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v):
        raise ValueError(f"{v!r} is not a whole number")
    return int(v)


def _pair(values) -> tuple[int, int]:
    if not isinstance(values, (list, tuple)) or len(values) != 2:
        raise ValueError(f"{values!r} is not a (width, height) pair")
    a, b = (_int(v) for v in values)
    return a, b


def read_plan(bundle) -> TilePlan | None:
    """A bundle's tile plan (None: one view per image).

    Raises:
        BundleError: the manifest's plan is not one ``fit`` could have written, or not for this
            bundle's model input.
    """
    anomaly = bundle.manifest.get("anomaly")
    d = anomaly.get("tiles") if isinstance(anomaly, dict) else None
    if not d:
        return None
    try:
        plan = TilePlan.from_dict(d)
        size = bundle.preprocess.input_size
        if plan.tile != size:
            raise ValueError(f"its {plan.tile} px tiles are not the model's {size} px input")
    except ValueError as exc:
        raise BundleError(
            f"{bundle.path / 'manifest.json'}: the tile plan (anomaly.tiles) is damaged: {exc}; fit the bundle again"
        ) from None
    return plan


@dataclass(frozen=True)
class TilePlan:
    """How a frame is cut: ``frame`` (w, h) fitted on, ``work`` (w, h) after scaling, tile side,
    and the tiles' left / top edges in the working frame."""

    frame: tuple[int, int]
    work: tuple[int, int]
    tile: int
    xs: tuple[int, ...]
    ys: tuple[int, ...]
    defect_size: float
    overview: bool = False  # one whole-frame view after the tiles (plans saved before: none)

    @property
    def count(self) -> int:
        """Tiles a frame is cut into."""
        return len(self.xs) * len(self.ys)

    @property
    def rows(self) -> int:
        """Model inputs per frame: the tiles, then the overview where the plan has one."""
        return self.count + int(self.overview)

    @property
    def scale(self) -> float:
        return self.work[0] / self.frame[0]

    @property
    def boxes(self) -> list[tuple[int, int]]:
        """(left, top) of each tile, row-major: the order of the model's batch."""
        return [(x, y) for y in self.ys for x in self.xs]

    def to_dict(self) -> dict:
        return {
            "frame": list(self.frame),
            "work": list(self.work),
            "tile": self.tile,
            "xs": list(self.xs),
            "ys": list(self.ys),
            "defect_size": self.defect_size,
            "count": self.count,
            "scale": round(self.scale, 5),
            # only when set: a plan without it reads (and digests) as plans saved before
            **({"overview": True} if self.overview else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> TilePlan:
        """The plan a manifest stores, checked (see :meth:`check`).

        Raises:
            ValueError: not a plan ``fit`` could have written.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a mapping was expected, not {type(d).__name__}")
        try:
            plan = cls(
                _pair(d["frame"]),
                _pair(d["work"]),
                _int(d["tile"]),
                tuple(_int(v) for v in d["xs"]),
                tuple(_int(v) for v in d["ys"]),
                float(d["defect_size"]),
                d.get("overview", False),
            )
        except KeyError as exc:
            raise ValueError(f"{exc.args[0]!r} is missing") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"a field is not a number: {exc}") from None
        plan.check()
        return plan

    def check(self) -> None:
        """Refuse a plan ``fit`` could not have written: the device allocates by it (a working frame,
        one model row per tile), so a hostile manifest must not make it upscale a frame to gigapixels,
        cut thousands of tiles or read past the frame's edge.

        Raises:
            ValueError: what is wrong with it.
        """
        (fw, fh), (ww, wh), S = self.frame, self.work, self.tile
        if not isinstance(self.overview, bool):
            raise ValueError(f"overview is {self.overview!r}, not true or false")
        if not (math.isfinite(self.defect_size) and self.defect_size > 0):
            raise ValueError(f"defect_size {self.defect_size!r} is not a positive size in pixels")
        if S < 1 or fw < 1 or fh < 1:
            raise ValueError(f"tile {S} px over a {fw} x {fh} frame")
        if fw * fh > max_pixels():  # the frames it was fitted on were decoded under this budget
            raise ValueError(f"its {fw} x {fh} frames are over the pixel budget; raise EDGETL_MAX_MEGAPIXELS")
        if not (S <= ww <= fw and S <= wh <= fh):  # plans only ever scale frames down, to >= one tile
            raise ValueError(f"its working size {ww} x {wh} is not between one {S} px tile and the {fw} x {fh} frame")
        if abs((ww / wh) / (fw / fh) - 1) > ASPECT_TOLERANCE:
            raise ValueError(f"its working size {ww} x {wh} is not the {fw} x {fh} frame's shape")
        for name, edges, length in (("xs", self.xs, ww), ("ys", self.ys, wh)):
            if edges != _edges(length, S):
                raise ValueError(f"{name} {list(edges)[:8]} are not the fewest {S} px tiles covering {length} px")

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def describe(self) -> str:
        fw, fh = self.frame
        return (
            f"{len(self.xs)} x {len(self.ys)} tiles of {self.tile} px over {fw} x {fh} frames scaled by "
            f"{self.scale:.2f} (smallest defect {self.defect_size:g} px -> {self.defect_size * self.scale:.1f} "
            "input px)" + (", and the whole frame in one view beside them" if self.overview else "")
        )

    # ---- device side ----------------------------------------------------------------------
    def working_frame(self, path: Path, pre: PreprocessConfig | None = None) -> Image.Image:
        """The frame (its region of interest, where ``pre`` has one) decoded no larger than the
        working size needs (the one decoder: same numbers at fit and on the device), then scaled
        to it.

        Raises:
            DataError: unreadable, or not the shape of the frames this plan was fitted on.
        """
        im = load_rgb(path, cfg=pre, need=min(self.work))
        w, h = im.size
        if abs((w / h) / (self.frame[0] / self.frame[1]) - 1) > ASPECT_TOLERANCE:
            raise DataError(
                f"{path}: a {w} x {h} frame; this bundle was fitted on {self.frame[0]} x {self.frame[1]} "
                "frames (tiled for small defects): give frames of that shape or fit again on these"
            )
        if (w, h) != self.work:
            im = im.resize(self.work, Image.Resampling.BICUBIC, reducing_gap=3.0)
        return im

    def inputs(self, path: Path, pre: PreprocessConfig) -> np.ndarray:
        """(rows, 3, S, S) model inputs of one frame file: the tiles in :attr:`boxes` order, then
        the overview (the whole working frame resized to S x S) where the plan has one."""
        im = self.working_frame(path, pre)
        arr = to_tensor(im, pre)
        S = self.tile
        tiles = [arr[:, y : y + S, x : x + S] for x, y in self.boxes]
        if self.overview:  # all of the frame (no centre crop: a defect at a side must stay in view)
            whole = im.resize((S, S), Image.Resampling[pre.interpolation.upper()], reducing_gap=3.0)
            tiles.append(to_tensor(whole, pre))
        return np.stack(tiles)

    def split(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-frame rows (N * rows, ...) -> (tile rows (N * count, ...), overview rows (N, ...) or None)."""
        if not self.overview:
            return rows, None
        r = np.asarray(rows).reshape(-1, self.rows, *np.shape(rows)[1:])
        return r[:, : self.count].reshape(-1, *r.shape[2:]), r[:, self.count]

    def stitch(self, maps: np.ndarray) -> np.ndarray:
        """(count, S, S) tile maps -> (H, W) frame map at the working size, maximum where tiles overlap."""
        W, H = self.work
        out = np.full((H, W), -np.inf, np.float32)
        S = self.tile
        for m, (x, y) in zip(maps, self.boxes):
            np.maximum(out[y : y + S, x : x + S], m, out=out[y : y + S, x : x + S])
        return out

    def frames(
        self,
        tile_maps: np.ndarray | None,
        tile_scores: np.ndarray,
        whole: tuple[np.ndarray | None, np.ndarray] | None = None,
        overview: Overview | None = None,
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """Per-tile (maps (N*n, S, S) or None, scores (N*n,)) -> per-frame (maps (N, H, W) or None,
        scores (N,)). With the overview's (maps (N, S, S) or None, scores (N,)) in ``whole`` and its
        :class:`Overview` (memory and normalisation), a frame's score is the soft maximum of the
        tiles' maximum and the overview's score, each as a z-score (:meth:`Overview.combine`), and
        its map the maximum of the stitched tile map and the overview's map upsampled to the
        working frame, both in those units."""
        n = self.count
        scores = np.asarray(tile_scores, np.float32).reshape(-1, n).max(axis=1)
        maps = None
        if tile_maps is not None:
            tm = np.asarray(tile_maps, np.float32).reshape(-1, n, self.tile, self.tile)
            maps = (
                np.stack([self.stitch(m) for m in tm])
                if len(tm)
                else np.zeros((0, self.work[1], self.work[0]), np.float32)
            )
        if whole is None:
            return maps, scores
        if overview is None:
            raise ValueError("overview scores need the overview's normalisation")
        om, os_ = whole
        scores = overview.combine(scores, os_)
        if maps is not None:
            maps = overview.term("tiles", maps)
            if om is not None:
                for i, m in enumerate(np.asarray(om, np.float32)):
                    np.maximum(maps[i], self.upsample(overview.term("overview", m)), out=maps[i])
        return maps, scores

    def upsample(self, m: np.ndarray) -> np.ndarray:
        """An (S, S) overview map -> (H, W) at the working size (bilinear)."""
        W, H = self.work
        return np.asarray(Image.fromarray(np.asarray(m, np.float32)).resize((W, H), Image.Resampling.BILINEAR))


@dataclass(frozen=True)
class Overview:
    """The whole-frame view's scoring beside the tiles: its own head (memory of whole training
    frames in one view) and ``norm``, per view (``"tiles"``: the frame's tile maximum under the
    tile head; ``"overview"``: the overview's score), (mean, sd) of held-out good training frames'
    scores. Why: tiles find small defects but a large, low-contrast one (a stain filling much of a
    tile) reads there as a change of lighting, while one view of the frame sees it whole; the soft
    maximum follows whichever view sees the anomaly (the rule of a combined head's parts)."""

    head: object  # a DefectHead or an AnomalyHead (anything with ``maps(rows)``)
    norm: dict

    def term(self, view: str, x: np.ndarray) -> np.ndarray:
        """A view's raw score or map in the combined units (z-score + the shared offset)."""
        a, b = softmax_terms(self.norm)[view]
        return (np.asarray(x, np.float32) * a + b).astype(np.float32)

    def combine(self, tiles: np.ndarray, whole: np.ndarray) -> np.ndarray:
        """Frame scores from the tiles' maximum and the overview's raw score."""
        return softmax2(self.term("tiles", tiles), self.term("overview", whole))

    def norm_dict(self) -> dict:
        return {k: [float(v) for v in vs] for k, vs in self.norm.items()}

    @staticmethod
    def read_norm(d: dict) -> dict:
        """The manifest's ``overview_norm`` -> {view: (mean, sd)}.

        Raises:
            ValueError: not two views of two finite numbers with sd > 0.
        """
        norm = {k: (float(d[k][0]), float(d[k][1])) for k in ("tiles", "overview")}
        if not all(math.isfinite(m) and math.isfinite(sd) and sd > 0 for m, sd in norm.values()):
            raise ValueError(f"overview normalisation {d!r}")
        return norm


def _edges(length: int, tile: int) -> tuple[int, ...]:
    """The fewest tile edges that cover ``length``, spaced evenly (first at 0, last at the end)."""
    if length <= tile:
        return (0,)
    n = math.ceil(length / tile)
    return tuple(int(round(i * (length - tile) / (n - 1))) for i in range(n))


def plan_tiles(
    frame: tuple[int, int], input_size: int, defect_size: float | None, *, overview: bool = False
) -> TilePlan | None:
    """The tiling for frames of ``frame`` (w, h) px whose smallest defect of interest is
    ``defect_size`` px (None: :data:`DEFAULT_DEFECT_SIZE`), or None when one view keeps it visible.
    ``overview``: one whole-frame view scored beside the tiles (:class:`Overview`)."""
    d = float(defect_size or DEFAULT_DEFECT_SIZE)
    w, h = int(frame[0]), int(frame[1])
    one_view = input_size / min(w, h)  # the single view's scale (shorter side to the input size)
    scale = min(1.0, MIN_INPUT_PX / d)
    if scale <= one_view * MIN_GAIN:
        return None
    work = (max(input_size, round(w * scale)), max(input_size, round(h * scale)))
    return TilePlan((w, h), work, input_size, _edges(work[0], input_size), _edges(work[1], input_size), d, overview)


def frame_size(path: Path, pre: PreprocessConfig | None = None) -> tuple[int, int]:
    """(w, h) of a frame, upright (its region of interest, where ``pre`` has one)."""
    return load_rgb(path, cfg=pre, need=0).size


def load_mask_tiled(path: Path | None, plan: TilePlan) -> np.ndarray | None:
    """A defect mask at the working frame's pixels (nearest neighbour)."""
    if path is None:
        return None
    with decode(path, path, load=False) as im:  # the one pixel budget, as for images
        check_cost(im, path)
        arr = np.asarray(im.convert("L").resize(plan.work, Image.Resampling.NEAREST))
    return arr > _MASK_LEVEL
