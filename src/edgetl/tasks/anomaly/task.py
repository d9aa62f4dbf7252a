"""Defect detection from good images only: one-class patch heads, scored inside the exported model.

The same frozen backbone as classification, cut after its stride-4 and stride-8 stages
(``backbone_kind = "image-patch"``), converted for the target like any backbone (INT8 calibrated
on the good training images, its pooling / resizing tail kept in float), and the heads of
:mod:`edgetl.heads.patch` fitted on the features *that* model computes. The scoring, upsampling
and smoothing are an ONNX graph fused with the backbone, so a device gets ``anomaly_map`` and
``score`` from one model call on any target.

Frames much larger than the backbone's input are scored as tiles (:mod:`.tiles`): the plan is
chosen at fit from the frame size and the smallest defect of interest, kept in the manifest, and
applied by every predictor; scores and thresholds are per frame (the maximum over its tiles).

Threshold: with labelled defects (``DATA/test/<defect>``), the best-F1 cut on that set; with good
images only, the 0.99 quantile of good scores x 1.05 (5 % headroom for drift), each good image
scored by a model of the others (out of fold, the model itself keeping them all). It lives in
the manifest, never in the graph; ``predict`` reports ``score / threshold`` (1.0 = the threshold).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...core.features import ImageExtractor, decoded, load_input
from ...core.fuse import score_parity
from ...core.gate import auroc_gate, new_good_gate
from ...core.metrics import best_f1_threshold, feature_cosine, out_of_fold_f1
from ...core.preprocess import PreprocessConfig
from ...core.sessions import Session, bundle_session
from ...core.versions import add_version, next_version
from ...errors import BundleError, ConfigError, DataError, GateError
from ...heads import registry
from ...heads.defect import DEFECT_KINDS, DefectConfig, DefectHead, fit_defect_head, load_any_head, update_defect_head
from ...heads.patch import (
    PATCH_KINDS,
    AnomalyConfig,
    AnomalyHead,
    fit_patch_head,
    image_count,
    patch_rows,
    quantile_threshold,
    update_patch_head,
)
from ..base import AdaptResult, Task, Trained
from ..classify.data import check_image, list_images
from ..classify.task import image_calibration
from .data import good_images, is_anomaly_layout, labelled_images, load_anomaly_data, load_mask
from .metrics import detection_metrics
from .render import save_overlay
from .select import choose
from .tiles import Overview, TilePlan, frame_size, load_mask_tiled, plan_tiles, read_plan

LABELS = ["good", "defect"]
# Op types of the patch extractor's tail kept in float (ONNX and OpenVINO names): it ends in
# averaging, resizing and concatenation, nothing INT8 speeds up, and left quantized, OpenVINO's
# low-precision passes carry the last dequantization into the fused scoring graph and compute
# wrong distances there (every score ~170 for a true 19-32).
PATCH_FLOAT_TYPES = ("AveragePool", "AvgPool", "Resize", "Interpolate", "Concat")


@dataclass
class AnomalyPrediction:
    """One image's answer: ``score`` is raw, ``normalised`` is score / threshold (>= 1 means defect)."""

    path: str
    label: str
    score: float
    threshold: float
    normalised: float
    peak: tuple[int, int] | None = (0, 0)  # (row, col) of the map maximum, in map pixels; None: no map

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "label": self.label,
            "score": round(self.score, 6),
            "threshold": round(self.threshold, 6),
            "normalised": round(self.normalised, 6),
            "peak": list(self.peak) if self.peak is not None else None,
        }


class AnomalyPredictor:
    """An anomaly bundle ready to score images: the fused model (backbone + scoring graph) or,
    with ``fused=False``, the backbone + the numpy head (same numbers; what ``adapt`` uses).

    Example:
        >>> p = load_predictor("parts.bundle")  # doctest: +SKIP
        >>> [(r.label, r.normalised) for r in p.predict(["a.png"])]  # doctest: +SKIP
    """

    def __init__(
        self,
        bundle,
        *,
        device: str | None = None,
        threads: int | None = None,
        head_version: int | None = None,
        fused: bool = True,
    ):
        self.task, self.bundle = ANOMALY, bundle
        self.preprocess = bundle.preprocess
        entry = bundle.head_entry(head_version)
        self.version = int(entry["version"])
        self.threshold = float(entry.get("threshold", bundle.manifest.get("thresholds", {}).get("anomaly", 1.0)))
        self.shape = tuple(bundle.manifest["backbone"]["feature_shape"])
        self.plan: TilePlan | None = read_plan(bundle)
        self.fused = fused and bool(entry.get("fused"))
        self._head: AnomalyHead | DefectHead | None = None
        self._overview: Overview | None = None
        self._backbone: Session | None = None
        self._where = (device, threads)
        model = bundle.path / entry["fused"] if self.fused else bundle.model_file("backbone")
        self.session = bundle_session(bundle, model, device=device, threads=threads)

    @property
    def head(self) -> AnomalyHead | DefectHead:
        if self._head is None:
            self._head = load_any_head(self.bundle.open_verified(self.bundle.head_entry(self.version)["file"]))
        return self._head

    @property
    def overview(self) -> Overview | None:
        """The whole-frame view's head and normalisation, where the tile plan has an overview
        (None for one-view bundles and tiled bundles made before it).

        Raises:
            BundleError: the plan has an overview but this head version lacks its file or norms.
        """
        if self._overview is None:
            self._overview = load_overview(self.bundle, self.version, self.plan)
        return self._overview

    def backbone(self, x: np.ndarray) -> np.ndarray:
        """Feature rows (N, L) of model inputs through the bundle's backbone (the overview's rows:
        the fused model carries the tile head's memory, the overview has its own)."""
        if not self.fused:
            return np.asarray(self.session(x), np.float32).reshape(len(x), -1)
        if self._backbone is None:
            device, threads = self._where
            model = self.bundle.model_file("backbone")
            self._backbone = bundle_session(self.bundle, model, device=device, threads=threads)
        return np.asarray(self._backbone(x), np.float32).reshape(len(x), -1)

    @property
    def has_map(self) -> bool:
        return self.bundle.head_entry(self.version).get("heat_map", True) is not False

    def maps(self, paths: Sequence[Path], *, batch_size: int = 8) -> tuple[np.ndarray | None, np.ndarray]:
        """Raw (maps (N, S, S), or None for an image-level head, scores (N,)) of image files.

        Raises:
            DataError: an unreadable image.
        """
        maps, scores, ready = [], [], []
        plan = self.plan
        # Decoding runs ahead on a few threads while the model scores the batch before (see
        # decoded); a tiled frame is a batch of its own (its tiles).
        load = (
            (lambda p: plan.inputs(Path(p), self.preprocess))
            if plan is not None
            else (lambda p: load_input(Path(p), self.preprocess))
        )
        step = 1 if plan is not None else batch_size
        for k, (_, one) in enumerate(decoded(load, paths, depth=2 * step)):
            ready.append(one)
            if len(ready) < step and k + 1 < len(paths):
                continue
            x = ready[0] if plan is not None else np.stack(ready)
            ready = []
            if self.fused:  # the tiles through the fused model; an overview row through its own head
                tiles, whole = plan.split(x) if plan is not None else (x, None)
                outs = self.session.run(tiles)
                m, s = (outs[0], outs[1]) if self.has_map else (None, outs[0])
                if plan is not None:
                    ov = self.overview
                    views = None if whole is None or ov is None else score_rows(ov.head, self.backbone(whole))
                    m, s = plan.frames(m, s, views, ov)
            else:
                m, s = score_rows(self.head, self.session(x).reshape(len(x), -1), plan, self.overview)
            maps.append(m)
            scores.append(s)
        W, H = plan.work if plan is not None else (self.preprocess.input_size,) * 2
        if not scores:
            return (np.zeros((0, H, W), np.float32) if self.has_map else None), np.zeros(0, np.float32)
        return (np.concatenate([m for m in maps if m is not None]) if self.has_map else None), np.concatenate(
            scores
        ).reshape(-1)

    def predict(
        self,
        paths: Sequence[str | Path],
        *,
        threshold: float | None = None,
        heatmaps: str | Path | None = None,
        skipped: list | None = None,
        **_,
    ) -> list[AnomalyPrediction]:
        """Score image files (folders expanded); optionally write heat-map overlays to ``heatmaps``.

        Unreadable files raise :class:`DataError`, or, with a ``skipped`` list, are recorded there
        as ``(path, reason)`` and left out.
        """
        if heatmaps is not None and not self.has_map:
            raise ConfigError(
                f"--heatmaps: this bundle's {self.bundle.head_entry(self.version).get('kind')} head "
                "scores whole images and has no heat map; fit with --head combined for one"
            )
        files = list_images(list(paths))
        thr = self.threshold if threshold is None else ANOMALY.check_threshold(threshold)
        if skipped is not None:
            readable = []
            for f in files:
                try:
                    check_image(f)
                    readable.append(f)
                except DataError as exc:
                    skipped.append((f, str(exc).split(": ", 1)[-1]))
            files = readable
        out: list[AnomalyPrediction] = []
        taken: set[str] = set()
        # 1.0 on an overlay is the threshold; a combined head's map is only its patch part.
        map_cut = getattr(self.head, "map_cut", lambda t: t)(thr) if heatmaps is not None else thr
        for i in range(0, len(files), 8):
            chunk = files[i : i + 8]
            maps, scores = self.maps(chunk)
            for j, (path, s) in enumerate(zip(chunk, scores)):
                peak = None
                if maps is not None:
                    row, col = np.unravel_index(int(np.argmax(maps[j])), maps[j].shape)
                    peak = (int(row), int(col))
                out.append(
                    AnomalyPrediction(str(path), "defect" if s >= thr else "good", float(s), thr, float(s / thr), peak)
                )
                if heatmaps is not None and maps is not None:
                    save_overlay(
                        path, maps[j] / map_cut, Path(heatmaps), self.preprocess, taken, frame=self.plan is not None
                    )
        return out

    def evaluate(self, data, *, threshold: float | None = None, strict: bool = False, **_) -> dict:
        """Image/pixel AUROC and counts at the bundle's threshold on a labelled test set
        (``test/good``, ``test/<defect>``, ``ground_truth``, or ``good`` / ``<defect>`` folders).

        Raises:
            DataError: no labelled images found.
        """
        samples, masks, skipped = labelled_images(data, strict=strict)
        if not samples:
            raise DataError(f"{data}: no labelled images; expected good/ and <defect>/ folders")
        return self.score_samples(samples, masks, skipped, threshold=threshold)[0]

    def score_samples(self, samples: list, mask_files: dict, skipped: list, *, threshold: float | None = None):
        """(metrics as :meth:`evaluate` reports them, maps or None, scores, is-defect, masks) of
        labelled samples, from one pass of the model (the report draws from the same pass)."""
        from ...core.metrics import auroc

        maps, scores = self.maps([s.path for s in samples])
        thr = self.threshold if threshold is None else float(threshold)
        y = np.array([s.label != "good" for s in samples], bool)
        mk = [
            _mask(mask_files.get(str(s.path)), self.preprocess, self.plan) if y[i] else None
            for i, s in enumerate(samples)
        ]
        m = detection_metrics(
            y,
            scores,
            thr,
            maps=maps,
            masks=mk,
            kinds=[s.label for s in samples],
            map_threshold=getattr(self.head, "map_cut", lambda t: t)(thr),
        )
        per_kind = {}
        for kind in sorted({s.label for s in samples} - {"good"}):
            sel = np.array([s.label in ("good", kind) for s in samples])
            v = auroc(y[sel], scores[sel])
            per_kind[kind] = None if v is None else round(float(v), 4)
        m.update(
            per_defect_auroc=per_kind,
            head_version=self.version,
            skipped=[{"path": str(p), "reason": r} for p, r in skipped],
        )
        return m, maps, scores, y, mk


class PatchExtractor(ImageExtractor):
    """Images -> patch-feature maps (N, C, H, W) through a patch-feature backbone."""

    def __init__(self, session, preprocess: PreprocessConfig, model_path, shape):
        super().__init__(session, preprocess, model_path)
        self.shape = tuple(int(d) for d in shape)

    def patches(self, items: Sequence, *, cache=None, quiet: bool = True, desc: str = "patch features") -> np.ndarray:
        """Feature rows (N, L): the patch map flattened (then the pooled features, for a backbone
        exported with them)."""
        flat = self.features(items, cache=cache, batch_size=16, quiet=quiet, desc=desc)
        return flat.reshape(len(items), -1) if len(items) else np.zeros((0, int(np.prod(self.shape))), np.float32)

    def tiles(self, items: Sequence, plan: TilePlan, *, cache=None) -> np.ndarray:
        """Feature rows of every tile of every frame (N * plan.count, L), frame-major, cached per
        frame under the plan (decoding overlaps the model, as in :meth:`features`)."""
        from concurrent.futures import ThreadPoolExecutor

        from ...core.features import FeatureCache, file_digest

        tc = FeatureCache(cache.dir.parent.parent, f"{self.cache_key}-tiles-{plan.digest()}") if cache else None
        paths = [Path(getattr(i, "path", i)) for i in items]
        digests = [getattr(i, "digest", None) or file_digest(p) for i, p in zip(items, paths)]
        out: list = [tc.get(d, 0) if tc else None for d in digests]
        todo = [i for i, v in enumerate(out) if v is None]
        with ThreadPoolExecutor(max_workers=2) as pool:
            for i, x in zip(todo, pool.map(lambda i: plan.inputs(paths[i], self.preprocess), todo)):
                out[i] = np.asarray(self.session(x), np.float32).reshape(-1)
                if tc:
                    tc.put(digests[i], 0, out[i])
                    cache.misses += 1
        n = plan.rows
        return np.concatenate([v.reshape(n, -1) for v in out]) if out else np.zeros((0, 0), np.float32)


def labelled_check(
    pred, head, new_head, data, *, tolerance_pp: float, quiet: bool = True, new_overview: Overview | None = None
) -> dict | None:
    """An update's effect on labelled images the operator keeps beside the new good ones
    (``DATA/test/good`` and ``DATA/test/<defect>``, never learned): image AUROC of the current and
    the updated head on the same images, gated like a conversion (paired DeLong, refused only when
    the drop is shown to exceed ``tolerance_pp``). None without such a folder."""
    test = Path(data) / "test"
    if not test.is_dir():
        return None
    samples, _, _ = labelled_images(test)
    y = np.array([s.label != "good" for s in samples])
    if not samples or y.all() or not y.any():
        return None
    ext = PatchExtractor(pred.session, pred.preprocess, pred.bundle.model_file("backbone"), pred.shape)
    F = (
        ext.tiles(samples, pred.plan)
        if pred.plan is not None
        else ext.patches(samples, quiet=quiet, desc="adapt check")
    )
    decision = auroc_gate(
        y,
        score_rows(head, F, pred.plan, pred.overview)[1],
        score_rows(new_head, F, pred.plan, new_overview)[1],
        tolerance_pp=tolerance_pp,
    )
    return {**decision.to_dict(), "line": decision.describe().replace(" vs FP32", " vs the current head")}


def load_overview(bundle, version: int, plan: TilePlan | None) -> Overview | None:
    """Head version ``version``'s whole-frame view (head and normalisation), where the tile
    ``plan`` has an overview (None for one-view bundles and tiled bundles made before it).

    Raises:
        BundleError: the plan has an overview but this head version lacks its file or norms.
    """
    if plan is None or not plan.overview:
        return None
    entry = bundle.head_entry(version)
    if not entry.get("overview"):
        raise BundleError(
            f"{bundle.path}: head v{version} has no overview head, but its tile plan scores "
            "one; roll back to a version with one or fit again"
        )
    head = load_any_head(bundle.open_verified(entry["overview"]))
    try:
        norm = Overview.read_norm(entry.get("overview_norm") or {})
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise BundleError(f"{bundle.path}: head v{version}: {exc}; fit again") from None
    return Overview(head, norm)


def score_rows(
    head, X: np.ndarray, plan: TilePlan | None = None, overview: Overview | None = None
) -> tuple[np.ndarray | None, np.ndarray]:
    """(maps or None, scores) of feature rows (N, L) under a patch-only or a defect head; with a
    tile ``plan``, rows are a frame's tiles (then its overview row, scored by ``overview``'s head)
    and the answer is per frame (maps at the working size)."""
    tiles, whole = plan.split(X) if plan is not None else (X, None)
    if isinstance(head, DefectHead):
        m, s = head.maps(tiles)
    else:
        m, s = head.maps(tiles.reshape(len(tiles), head.channels_in, *head.grid))
    if plan is None:
        return m, s
    if whole is None:
        return plan.frames(m, s)
    if overview is None:
        raise BundleError("this tile plan scores an overview, and no overview head was given")
    return plan.frames(m, s, score_rows(overview.head, whole), overview)


def learn(head, X: np.ndarray):
    """``head`` after also learning good feature rows ``X`` (a defect or a patch-only head)."""
    return update_defect_head(head, X) if isinstance(head, DefectHead) else update_patch_head(head, patch_part(head, X))


def _mask(path, pre: PreprocessConfig, plan: TilePlan | None):
    return load_mask_tiled(path, plan) if plan is not None else load_mask(path, pre)


def patch_part(head, X: np.ndarray) -> np.ndarray:
    """The patch features (N, C, H, W) of feature rows."""
    if isinstance(head, DefectHead):
        return head.split(X)[0]
    return X.reshape(len(X), head.channels_in, *head.grid)


def evaluate_head(
    head,
    F: np.ndarray,
    samples: list,
    masks: dict,
    pre: PreprocessConfig,
    threshold: float | None = None,
    plan: TilePlan | None = None,
    overview: Overview | None = None,
) -> tuple[dict, np.ndarray | None, np.ndarray]:
    """Metrics of ``head`` on labelled feature rows (per frame when tiled); picks the threshold when none is given."""
    maps, scores = score_rows(head, F, plan, overview)
    y = np.array([s.label != "good" for s in samples], bool)
    if threshold is None:
        if y.any() and (~y).any():
            threshold, _ = best_f1_threshold(y, scores)
            policy = "best F1 on labelled test images (F1 there in-sample)"
        else:
            threshold = quantile_threshold(scores[~y], head.config)
            policy = f"{head.config.quantile} quantile of held-out good scores x {head.config.margin}"
    else:
        policy = "given"
    mk = (
        [_mask(masks.get(str(s.path)), pre, plan) if s.label != "good" else None for s in samples]
        if maps is not None
        else None
    )
    m = detection_metrics(
        y,
        scores,
        threshold,
        maps=maps,
        masks=mk,
        kinds=[s.label for s in samples],
        map_threshold=getattr(head, "map_cut", lambda t: t)(threshold),
    )
    m["threshold_policy"] = policy
    if policy.startswith("best F1"):
        # the cut was chosen on these very images, so m["f1"] is in-sample; this is the honest figure
        m["f1_out_of_fold"] = out_of_fold_f1(y, scores)
    return m, maps, scores


def out_of_fold_good_scores(
    head, F: np.ndarray, shape: tuple, size: int, plan: TilePlan | None = None, rows: np.ndarray | None = None
) -> np.ndarray:
    """Scores of good training images by heads that never saw them, as ``head`` combines its parts
    (the same held-out scores its part scaling comes from): every image for an image part, at
    most :data:`edgetl.heads.defect.MAX_NORM_IMAGES` (a seeded choice) where a patch part scores,
    unless ``rows`` names the rows to score. Tiled frames (``F``: tile rows only): every tile of
    every frame (``rows``: of the frames chosen), each frame's tiles left out together (they
    overlap), the frame's score the maximum over its tiles."""
    from ...heads.defect import held_out_patch_scores
    from ...heads.heldout import group_max
    from ...heads.oneclass import held_out_scores

    seed = head.config.seed
    groups = None if plan is None else np.repeat(np.arange(len(F) // plan.count), plan.count)
    if rows is None and plan is not None:
        rows = np.arange(len(F))

    def patch(P, cfg):
        return held_out_patch_scores(P, cfg, size=size, seed=seed, groups=groups, rows=rows)[1:]

    def image(Z):
        s = held_out_scores(Z, head.config.image, seed=seed, groups=groups)
        return (np.arange(len(Z)), s) if rows is None else (rows, s[rows])

    def per_frame(picked, scores):
        return scores if plan is None else group_max(scores, groups, picked)

    if isinstance(head, AnomalyHead):
        return per_frame(*patch(F.reshape(len(F), *shape), head.config))
    P, Z = head.split(F)
    if head.patch is None or head.kind == head.image.kind:
        return per_frame(*image(Z))
    picked, sp = patch(P, head.config.patch)
    if not head.combined:
        return per_frame(picked, sp)
    return per_frame(picked, head.combine(sp, held_out_scores(Z, head.config.image, seed=seed, groups=groups)[picked]))


def fit_overview(head, F_tr: np.ndarray, O_tr: np.ndarray, cfg, plan: TilePlan, size: int) -> Overview:
    """The whole-frame view beside the tiles: a head of the same kind on the training frames'
    overview rows ``O_tr`` (N, L) (its memory bounded as the tile head's is), scoring by its patch
    part where it has one, and the held-out normalisation of both views. ``head``: the fitted
    tile head, scoring as chosen; ``F_tr``: its tile rows.

    The tiles' (mean, sd) is that of held-out frame maxima: where the tile head scores by one
    part, its own normalisation of that part (fitted on exactly that); otherwise computed here on
    the same seeded choice of frames. The overview's comes from its own leave-one-frame-out scores."""
    from ...heads.defect import good_norm, held_out_patch_scores, norm_rows

    shape = head.patch_shape if isinstance(head, DefectHead) else (head.channels_in, *head.grid)
    groups = np.repeat(np.arange(len(O_tr)), plan.count)
    if isinstance(head, DefectHead) and len(head.parts) == 1:
        tiles = head.norm[head.parts[0]]
    else:
        tiles = good_norm(out_of_fold_good_scores(head, F_tr, shape, size, plan, norm_rows(groups, head.config.seed)))
    ov: AnomalyHead | DefectHead
    if isinstance(cfg, DefectConfig):
        fitted = fit_defect_head(O_tr, cfg, patch_shape=shape, size=size)
        ov = fitted.as_kind(OVERVIEW_KIND) if fitted.patch is not None else fitted
        one = len(ov.parts) == 1
        whole = ov.norm[ov.parts[0]] if one else good_norm(out_of_fold_good_scores(ov, O_tr, shape, size))
    else:
        ov, _, held = held_out_patch_scores(O_tr.reshape(len(O_tr), *shape), cfg, size=size, seed=cfg.seed)
        whole = good_norm(held)
    return Overview(ov, {"tiles": tiles, "overview": whole})


def select_kind(
    head: DefectHead, F_ev: np.ndarray, samples: list, plan: TilePlan | None = None, overview: Overview | None = None
) -> tuple[DefectHead, dict]:
    """On labelled anomalies, combined vs the patch part vs the image part (see :mod:`.select`).

    Tiled frames default to the patch part: a tile's pooled features see a piece of the part, and
    the maximum over tiles of that image part mostly adds its noise (measured on 1 MP frames:
    image part alone 0.52 / 0.79 image AUROC, combined 0.72 / 0.94, patch part 0.83 / 0.93).
    Beside an ``overview`` the tiles score by one part (patch or image), each normalised on the
    held-out frame maxima the head was fitted with; a combined tile score would need a held-out
    pass of its own, and the overview already brings in the whole frame."""
    y = np.array([s.label != "good" for s in samples], bool)
    default = "patch" if plan is not None and head.combined else "combined"
    if not head.combined or not (y.any() and (~y).any()):
        why = (
            "asked for"
            if not head.combined
            else "no labelled anomalies: the default"
            if default == "combined"
            else "tiled frames: the patch part (the default there)"
        )
        return head.as_kind(default) if head.combined else head, {
            "chosen": default if head.combined else head.kind,
            "reason": why,
        }
    kinds = (default, *(k for k in ("combined", "patch", head.image.kind) if k != default))
    if overview is not None:
        kinds = tuple(k for k in kinds if len(registry.parts(k)) == 1)
    choice = choose(
        y,
        {k: score_rows(head.as_kind(k), F_ev, plan, overview_for(overview, head.as_kind(k)))[1] for k in kinds},
        default=default,
    )
    return head.as_kind(choice["chosen"]), choice


def keep_overview(
    head, overview: Overview, F_ev: np.ndarray, samples: list, plan: TilePlan, mode: str = "auto"
) -> dict:
    """On labelled anomalies, the tiles alone (the default) vs the tiles with the overview, by the
    rule that chooses a head's parts (:func:`.select.choose`): the overview is added only where it
    is shown better beyond noise. Why this default: over two seeds of three 1 MP sets the overview
    won back large stains on a photograph (+3.1 points once) but cost the textures 0.4-4.8 points
    in five of six runs (where the whole view sees nothing, an irregular texture at 0.2x looking
    alike everywhere, its spread on good frames lifts some of them above defects the tiles only
    just catch), and the labelled check never showed those losses; with no labelled anomalies
    nothing can show it helps, so it is left out."""
    if mode == "on":
        return {"chosen": "tiles + overview", "reason": "asked for (--overview on)"}
    y = np.array([s.label != "good" for s in samples], bool)
    if not (y.any() and (~y).any()):
        return {"chosen": "tiles", "reason": "no labelled anomalies: the default"}
    alone = dataclasses.replace(plan, overview=False)
    both = score_rows(head, F_ev, plan, overview)[1]
    return choose(
        y,
        {"tiles": score_rows(head, plan.split(F_ev)[0], alone)[1], "tiles + overview": both},
        default="tiles",
    )


def overview_for(overview: Overview | None, head) -> Overview | None:
    """``overview`` with the tiles' normalisation of ``head`` scoring by one part (its own held-out
    frame maxima of that part); unchanged otherwise."""
    if overview is None or not isinstance(head, DefectHead) or len(head.parts) != 1:
        return overview
    return dataclasses.replace(overview, norm={**overview.norm, "tiles": head.norm[head.parts[0]]})


OVERVIEW_KIND = "patch"  # the overview scores by its patch part (measured: its image part added nothing)
OVERVIEW_FILE = "overview.npz"  # fit's; adapt writes overview/vN.npz beside heads/vN.npz


class AnomalyTask(Task):
    """Good images in (``DATA/train/good``, ``DATA/good``, MVTec AD) -> is this part defective, and where?"""

    name = "anomaly"
    items = "images"
    backbone_kind = "image-patch"
    head_kinds = (*DEFECT_KINDS, *PATCH_KINDS)
    stored_head_kinds = ("patch",)  # a combined head chosen to score by its patch part (DefectHead.as_kind)
    backbone_fields = ("feature_shape",)
    predict_options = frozenset({"threshold", "heatmaps", "strict"})
    threshold_key, threshold_field = "anomaly", "threshold"
    gate_metric = "image_auroc"  # the paired DeLong gate (auroc_gate)
    one_class = True
    fixed_labels = tuple(LABELS)
    recorded_metrics = "metrics"
    summary_metrics = ("image_auroc", "pixel_auroc", "f1", "n")
    threshold_title = "defect threshold"

    def review_need(self, result: dict) -> float:
        """1 at the threshold, falling to 0 at half or twice it (``1 - |log2(score / threshold)|``):
        a person decides best where the detector is least sure."""
        r = max(float(result.get("normalised", 1.0)), 1e-9)
        return round(max(0.0, 1.0 - abs(math.log2(r))), 6)

    def report_data(self, data):
        """The labelled test set when the data has one, else the held-out good images (their scores
        against the threshold)."""
        if getattr(data, "test", None):
            return data.root
        return list(data.val) if getattr(data, "val", None) else None

    def claims(self, data: Path) -> bool:
        return is_anomaly_layout(data)

    def load_data(self, data: Path, options, cache_root: Path):
        return load_anomaly_data(data, val_split=options.val_split, seed=options.seed, strict=options.strict)

    def head_config(self, head) -> AnomalyConfig | DefectConfig:
        if isinstance(head, (AnomalyConfig, DefectConfig)):
            return head
        if head is None or isinstance(head, str):
            head = {"kind": head or "combined"}
        if isinstance(head, dict):
            d = {k: v for k, v in head.items() if v is not None}
            if d.get("kind", "combined") in DEFECT_KINDS:
                return DefectConfig.from_dict(d)
            return AnomalyConfig.from_dict(d)
        raise ConfigError(
            f"head {head!r}: give an AnomalyConfig / DefectConfig, a kind ({', '.join(self.head_kinds)}) or a dict"
        )

    def prepare_target(self, target):
        q = target.quantization
        q = dataclasses.replace(q, keep_float_types=tuple(dict.fromkeys(q.keep_float_types + PATCH_FLOAT_TYPES)))
        return dataclasses.replace(target, quantization=q)

    def backbone_view(self, exported):
        # no centre crop: a defect at the border must stay in view
        return exported.with_preprocess({**exported.preprocess, "crop_pct": 1.0})

    def calibration(self, data, target, exported, seed: int):
        return image_calibration(data.train, target, exported, seed)

    def extractor(
        self, model: Path, exported, *, runtime, device, providers, simulate=False, float_precision="f32", threads=None
    ) -> PatchExtractor:
        from ...core.sessions import open_session

        session = open_session(
            model,
            runtime=runtime,
            device=device,
            providers=providers,
            simulate=simulate,
            float_precision=float_precision,
            threads=threads,
        )
        return PatchExtractor(session, PreprocessConfig.from_dict(exported.preprocess), model, exported.feature_shape)

    def train(self, extractor, data, options, cache, *, like: Trained | None = None) -> Trained:
        cfg = self.head_config(options.head)
        pre = extractor.preprocess
        desc = "fp32 reference" if like is not None else "patch features"
        plan = like.features.get("plan") if like is not None else tile_plan(data, cfg, pre)
        groups, O_tr = None, None
        if plan is not None:
            cfg = tiled_config(cfg, plan)
            R_tr = extractor.tiles(data.train, plan, cache=cache)  # a frame's tiles, then its overview
            F_ev = extractor.tiles(data.eval_set, plan, cache=cache)
            F_tr, O_tr = plan.split(R_tr)
            groups = np.repeat(np.arange(len(data.train)), plan.count)
        else:
            F_tr = R_tr = extractor.patches(data.train, cache=cache, quiet=options.quiet, desc=f"{desc} train")
            F_ev = extractor.patches(data.eval_set, cache=cache, quiet=options.quiet, desc=f"{desc} eval")
        shape = extractor.shape
        head: DefectHead | AnomalyHead
        choice = None
        if isinstance(cfg, DefectConfig):
            head = fit_defect_head(F_tr, cfg, patch_shape=shape, size=pre.input_size, groups=groups)
            if like is not None:  # the FP32 reference scores as the shipped head does
                head, choice = head.as_kind(like.head.kind), like.features.get("choice")
        else:
            head = fit_patch_head(F_tr.reshape(len(F_tr), *shape), cfg, size=pre.input_size)
        overview = None
        if O_tr is not None and plan is not None:
            tiles_as = head.as_kind("patch") if isinstance(head, DefectHead) and head.combined else head
            overview = fit_overview(tiles_as, F_tr, O_tr, cfg, plan, pre.input_size)
        if isinstance(head, DefectHead) and like is None:
            head, choice = select_kind(head, F_ev, data.eval_set, plan, overview)
            overview = overview_for(overview, head)
        if overview is not None and plan is not None and like is None:
            kept = keep_overview(head, overview, F_ev, data.eval_set, plan, getattr(cfg, "overview", "auto"))
            choice = {**(choice or {}), "overview": kept}
            if kept["chosen"] == "tiles":  # the default, unless labelled frames show the overview better
                R_tr, F_ev = F_tr, plan.split(F_ev)[0]
                overview, plan = None, dataclasses.replace(plan, overview=False)
        features = {"choice": choice, "plan": plan, "overview": overview}
        if not data.eval_set:  # good images only, none held out: the threshold from all of them, out of fold
            scores = out_of_fold_good_scores(head, F_tr, shape, pre.input_size, plan)
            if overview is not None and O_tr is not None:  # every frame's overview, held out as its tiles are
                whole = out_of_fold_good_scores(overview.head, O_tr, shape, pre.input_size, rows=np.arange(len(O_tr)))
                scores = overview.combine(scores, whole)
            threshold = quantile_threshold(scores, head.config)
            metrics = detection_metrics(np.zeros(len(scores), bool), scores, threshold)
            metrics["threshold_policy"] = (
                f"{head.config.quantile} quantile of {len(scores)} good scores out of fold x {head.config.margin}"
            )
            # the training rows stand in as the evaluation rows (the gate's feature agreement, parity)
            return Trained(
                head,
                metrics,
                (np.zeros(len(scores), bool), scores),
                {},
                cache.misses if cache else 0,
                extractor.session,
                {"F_ev": R_tr, **features},
            )
        metrics, _, scores = evaluate_head(head, F_ev, data.eval_set, data.masks, pre, plan=plan, overview=overview)
        y = np.array([s.label != "good" for s in data.eval_set], bool)
        return Trained(
            head,
            metrics,
            (y, scores),
            {},
            cache.misses if cache else 0,
            extractor.session,
            {"F_ev": F_ev, **features},
        )

    def gate(self, trained: Trained, reference: Trained, tolerance_pp: float):
        m, r = trained.metrics, reference.metrics
        h = trained.head
        cos = (
            feature_cosine(
                patch_rows(patch_part(h, reference.features["F_ev"])),
                patch_rows(patch_part(h, trained.features["F_ev"])),
            )
            if len(trained.features["F_ev"])
            else np.ones(1)
        )
        ref = {
            "fp32_image_auroc": r["image_auroc"],
            "image_auroc": m["image_auroc"],
            "fp32_pixel_auroc": r["pixel_auroc"],
            "pixel_auroc": m["pixel_auroc"],
            "fp32_f1": r["f1"],
            "f1": m["f1"],
            "patch_feature_cosine_mean": round(float(cos.mean()), 5),
            "patch_feature_cosine_p01": round(float(np.quantile(cos, 0.01)), 5),
        }
        if r["image_auroc"] is not None and m["image_auroc"] is not None:
            ref["image_auroc_drop_pp"] = round((r["image_auroc"] - m["image_auroc"]) * 100, 3)
        y, scores = trained.outcome
        return ref, auroc_gate(y, reference.outcome[1], scores, tolerance_pp=tolerance_pp)

    def write_release(self, folder: Path, trained: Trained, data, options, exported) -> dict:
        head, m = trained.head, trained.metrics
        threshold = m["threshold"]
        plan = trained.features.get("plan")
        has_map = not isinstance(head, DefectHead) or head.has_map
        label = head.label if isinstance(head, DefectHead) else head.kind
        overview: Overview | None = trained.features.get("overview")
        if overview is not None:  # a file of its own, hashed with the bundle like the head
            overview.head.save(folder / OVERVIEW_FILE)  # type: ignore[attr-defined]
        heat = (
            "none: an image-level head scores the whole image"
            if not has_map
            else "anomaly_map (N, S, S): the patch part on the score's scale (points at local defects; a wrong "
            "part shows in the score, not the map)"
            if getattr(head, "kind", "") == "combined"
            else "anomaly_map (N, S, S), same units as score"
        )
        return {
            "entry": {
                "kind": head.kind,
                "labels": LABELS,
                "threshold": threshold,
                "threshold_policy": m["threshold_policy"],
                "images": head.meta.get("images"),
                "image_auroc": m["image_auroc"],
                "heat_map": has_map,
                "scoring": label,
                **({"overview": OVERVIEW_FILE, "overview_norm": overview.norm_dict()} if overview is not None else {}),
            },
            "manifest": {
                "labels": LABELS,
                "thresholds": {"anomaly": threshold},
                "anomaly": {
                    "map_size": head.size,
                    "grid": list(head.grid),
                    "sigma": head.config.sigma,
                    "normalised_score": "score / threshold (>= 1.0 means defect)",
                    "outputs": ["anomaly_map", "score"] if has_map else ["score"],
                    "heat_map": heat,
                    "scoring": label,
                    "tiles": plan.to_dict() if plan is not None else None,
                },
                "metrics": {"eval": {k: m.get(k) for k in ("image_auroc", "pixel_auroc", "f1", "f1_out_of_fold", "n")}},
            },
            "report": {
                "head": label,
                "eval_set": "test" if data.test else "held-out good" if data.val else "out-of-fold good",
                "metrics": m,
                "memory_patches": head.memory_size,
                "heat_map": heat,
                "selection": trained.features.get("choice"),
                "tiling": (
                    {
                        **plan.to_dict(),
                        "plan": plan.describe(),
                        **({"overview_memory": overview.head.memory_size} if overview is not None else {}),  # type: ignore[attr-defined]
                    }
                    if plan is not None
                    else {"count": 1, "plan": "one view: the frame resized to the input size"}
                ),
            },
            "fused_meta": {
                "head": head.kind,
                "threshold": threshold,
                "outputs": "anomaly_map (N, S, S), score (N,): raw; divide by the manifest threshold",
            },
        }

    def parity(self, fused_session, trained: Trained, data, exported) -> tuple[dict, float, str]:
        probe = (data.eval_set or data.train)[:8]
        pre = PreprocessConfig.from_dict(exported.preprocess)
        plan = trained.features.get("plan")
        # a tiled fit: the first probe frame's tiles, the rows they gave (evaluation frames, or the
        # training frames when there are only good images: those rows stand in for them then)
        if plan is not None:
            probe = probe[:1] * min(8, plan.count)
            x = plan.inputs(Path(probe[0].path), pre)[: len(probe)]
        else:
            x = np.stack([load_input(s.path, pre) for s in probe])
        outs = fused_session.run(x)
        F = trained.features["F_ev"][: len(probe)]
        if F is None or len(F) != len(probe):
            raise DataError("no images to check the fused model on")
        maps_r, scores_r = score_rows(trained.head, F)
        maps_f, scores_f = (outs[0], outs[1]) if maps_r is not None else (None, outs[0])
        par = score_parity(scores_f, scores_r, maps_f, maps_r)
        return par, par["max_rel_score_diff"], "relative score difference"

    # ---- device ------------------------------------------------------------------------------
    def load_head(self, path: Path) -> AnomalyHead | DefectHead:
        return load_any_head(path)

    def predictor(self, bundle, *, device=None, threads=None, head_version=None) -> AnomalyPredictor:
        return AnomalyPredictor(bundle, device=device, threads=threads, head_version=head_version)

    def check_threshold(self, value) -> float:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"threshold {value!r}: a defect score cut must be a finite number > 0")
        return float(value)

    def fused_meta(self, b, head) -> dict:
        return {**super().fused_meta(b, head), "head": head.kind}

    def adapt(
        self,
        b,
        data,
        *,
        threshold: float | None = None,
        strict: bool = False,
        quiet: bool = True,
        dry_run: bool = False,
        signer=None,
        replace: bool = False,
        force: bool = False,
        tolerance_pp: float = 5.0,
        **_,
    ) -> AdaptResult:
        """Teach a deployed bundle newly confirmed good images: patchcore's bank grows by a
        coreset of the new patches (never past ``max_memory``); padim's moments are merged
        exactly. The threshold carries over (adding good images only moves good scores down, so the
        old cut stays conservative) unless ``threshold`` is given."""
        if replace:
            raise ConfigError(
                f"{b.path}: --replace is for classification bundles; a defect bundle only adds good images"
            )
        t0 = time.perf_counter()
        samples, skipped = good_images(data, strict=strict)
        pred = AnomalyPredictor(b, fused=False)
        head = pred.head
        ext = PatchExtractor(pred.session, pred.preprocess, b.model_file("backbone"), pred.shape)
        F = ext.tiles(samples, pred.plan) if pred.plan is not None else ext.patches(samples, quiet=quiet, desc="adapt")
        overview = pred.overview
        _maps, before = score_rows(head, F, pred.plan, overview)
        gate = new_good_gate(before, pred.threshold, [s.path.name for s in samples])
        if gate["reasons"] and not force and not dry_run:
            raise GateError(f"update refused, v{pred.version} stays current: " + "; ".join(gate["reasons"]))
        tiles, whole = pred.plan.split(F) if pred.plan is not None else (F, None)
        new_head = learn(head, tiles)
        # both memories learn the new frames: the tiles their tiles, the overview their whole view;
        # each view's normalisation carries over, as a head's parts' does
        new_overview = (
            dataclasses.replace(overview, head=learn(overview.head, whole))
            if overview is not None and whole is not None
            else None
        )
        _maps, after = score_rows(new_head, F, pred.plan, new_overview)
        labelled = labelled_check(
            pred, head, new_head, data, tolerance_pp=tolerance_pp, quiet=quiet, new_overview=new_overview
        )
        if labelled is not None:
            gate["image_auroc"] = labelled
            if not labelled["passed"] and not force and not dry_run:
                raise GateError(
                    f"update refused, v{pred.version} stays current: on the labelled images in {data}/test, "
                    f"{labelled['line']} (--force to accept)"
                )
        thr = pred.threshold if threshold is None else self.check_threshold(threshold)
        summary = lambda s: {
            "max": round(float(s.max()), 4),
            "mean": round(float(s.mean()), 4),  # noqa: E731
            "over_threshold": int(np.sum(s >= thr)),
        }
        memory = _memory(new_head)
        if new_overview is not None:
            memory["overview"] = _memory(new_overview.head)
        info = {
            "images": len(samples),
            "new_images_before": summary(before),
            "new_images_after": summary(after),
            "memory": memory,
            "gate": {**gate, "forced": bool(gate["reasons"] and force)},
        }
        if dry_run:
            return AdaptResult(b, pred.version, info, {"total": round(time.perf_counter() - t0, 3)}, skipped, False)
        new_head.meta = dict(new_head.meta, parent_version=pred.version)
        entry = {
            "kind": new_head.kind,
            "labels": LABELS,
            "source": "adapt",
            "threshold": thr,
            **({"heat_map": new_head.has_map, "scoring": new_head.label} if isinstance(new_head, DefectHead) else {}),
            "threshold_policy": "carried over" if threshold is None else "given",
            "images": new_head.meta.get("images"),
            "new_images": len(samples),
            "parent": pred.version,
        }
        files = {}
        if new_overview is not None:
            rel = f"overview/v{next_version(b)}.npz"
            entry.update(overview=rel, overview_norm=new_overview.norm_dict())
            files[rel] = new_overview.head.save  # type: ignore[attr-defined]
        new = add_version(
            b,
            new_head,
            entry,
            meta={**self.fused_meta(b, new_head), "threshold": thr},
            changes={"thresholds": {**b.manifest.get("thresholds", {}), "anomaly": thr}},
            files=files,
            signer=signer,
        )
        return AdaptResult(new, new.head_version, info, {"total": round(time.perf_counter() - t0, 3)}, skipped)

    # ---- text for people ---------------------------------------------------------------------
    def render_predictions(self, preds: list[AnomalyPrediction]) -> str:
        from ...core.console import safe

        lines = [
            f"{safe(p.path)}\t{p.label}\tscore {p.score:.4g}\tthreshold {p.threshold:.4g}\t({p.normalised:.2f}x)"
            for p in preds
        ]
        if preds and all(p.peak is None for p in preds):
            lines.append("(no heat map: this bundle's head scores whole images)")
        return "\n".join(lines)

    cosine = ("patch-feature cosine", "patch_feature_cosine_mean")

    def fit_figures(self, result) -> dict:
        r = result.report
        return {
            "head": r["head"],
            "eval_set": r["eval_set"],
            "metrics": r["metrics"],
            "heat_map": r.get("heat_map"),
            "selection": r.get("selection"),
            "tiling": r.get("tiling"),
        }

    def fit_lines(self, result) -> list[str]:
        r, m, c = result.report, result.report["metrics"], result.data.counts()
        tests = ", ".join(f"{k[5:]} {v}" for k, v in c.items() if k.startswith("test_"))
        return (
            [
                f"head      {r['head']}",
                f"data      {c['train_good']} good training images"
                + (f"; test: {tests}" if tests else f"; {c['val_good']} good held out"),
                f"{r['eval_set']:<9} image AUROC {_fmt(m['image_auroc'])}, pixel AUROC {_fmt(m['pixel_auroc'])}, "
                f"F1 {_fmt(m['f1'])} at threshold {m['threshold']:.4g} ({m['threshold_policy']})"
                + (
                    f"; out of fold (cut chosen without the image) F1 {_fmt(m['f1_out_of_fold'])}"
                    if m.get("f1_out_of_fold") is not None
                    else ""
                ),
            ]
            + _rates(m)
            + _choice_lines(r)
            + _tiling_lines(r)
        )

    def model_line(self, result) -> str:
        r = result.report
        return (
            f"{r['size']['bundle_bytes'] / 1e6:.1f} MB bundle; fused model (backbone + scoring) batch-1 latency "
            f"{r['fused_latency_batch1']['p50_ms']:.1f} ms (p50, this machine); score vs numpy rel. diff "
            f"{r['fused_parity']['max_rel_score_diff']:.1e}"
        )

    def render_metrics(self, m: dict, title: str = "") -> str:
        c = m["confusion"]
        lines = [title] if title else []
        peak = m.get("peak_in_mask")
        lines += [
            f"image AUROC  {_fmt(m['image_auroc'])}  ({m['n_good']} good, {m['n_defect']} defect images)",
            f"pixel AUROC  {_fmt(m['pixel_auroc'])}"
            + (f"  (map peak inside the defect in {_fmt(peak, True)})" if peak is not None else ""),
            f"threshold    {m['threshold']:.4g}: precision {_fmt(m['precision'])}, recall {_fmt(m['recall'])}, "
            f"F1 {_fmt(m['f1'])}  (tp {c['tp']}, fp {c['fp']}, fn {c['fn']}, tn {c['tn']})",
        ]
        lines += _rates(m)
        for kind, v in m.get("per_defect_auroc", {}).items():
            rec = (m.get("recall_per_kind") or {}).get(kind)
            reg = (m.get("regions_per_kind") or {}).get(kind) or {}
            lines.append(
                f"  {kind:<14} AUROC {_fmt(v)}"
                + (f", flagged {_fmt(rec, True)}" if rec is not None else "")
                + (f", regions found {_fmt(reg['recall'], True)} of {reg['n']}" if reg.get("n") else "")
            )
        return "\n".join(lines)

    def render_adapt(self, r: AdaptResult, dry_run: bool) -> str:
        s = r.summary
        b4, af, mem = s["new_images_before"], s["new_images_after"], s["memory"]
        return "\n".join(
            [
                ("dry run: nothing written" if dry_run else f"head v{r.version} is now current in {r.bundle.path}"),
                f"learned       {s['images']} good images"
                + (
                    f"; memory bank {mem['patches']} of at most {mem['max_memory']} patches"
                    if "patches" in mem
                    else f"; statistics of {mem['images']} images"
                    if "images" in mem
                    else ""
                )
                + (
                    f"; image memory {mem['image_memory']} of at most {mem['max_images']} images"
                    if "image_memory" in mem
                    else f"; image statistics of {mem['image_images']} images"
                    if "image_images" in mem
                    else ""
                )
                + (
                    f"; overview memory {mem['overview']['patches']} patches"
                    if "patches" in mem.get("overview", {})
                    else ""
                ),
                f"their scores  max {b4['max']:.4g} -> {af['max']:.4g}; over the threshold {b4['over_threshold']} -> "
                f"{af['over_threshold']}",
                f"time          {r.timings['total']:.2f} s",
            ]
        )

    def render_history(self, rows: list[dict]) -> str:
        lines = [f"{'':1} {'ver':>3}  {'created':<20}  {'source':<8} {'images':>7}  {'threshold':>10}"]
        for e in rows:
            lines.append(
                f"{'*' if e['current'] else ' '} {e['version']:>3}  {e['created']:<20}  {e['source']:<8} "
                f"{e.get('images') or 0:>7}  {e['threshold']:>10.4g}"
            )
        return "\n".join(lines)

    def render_threshold(self, value: float, version: int, where: str) -> str:
        return (
            f"images scoring {value:.4g} or more are now 'defect' for head v{version} (the current version) in {where}"
        )


def _choice_lines(r: dict) -> list[str]:
    """The heat-map line (always said), and how patch / image / combined was chosen."""
    lines = [f"heat map  {r.get('heat_map') or 'anomaly_map'}"]
    c = r.get("selection") or {}
    if c.get("candidates"):
        alts = "; ".join(
            f"{k} {v['auroc']:.3f} ({v['diff']:+.3f}, interval [{v['interval'][0]:+.3f}, {v['interval'][1]:+.3f}])"
            for k, v in c["candidates"].items()
        )
        lines.append(
            f"chosen    {c['chosen']}: {c.get('default', 'combined')} AUROC {c['default_auroc']:.3f}, {alts} at "
            f"{c['confidence']:.1%}; {c['reason']}"
        )
    elif c.get("reason"):
        lines.append(f"chosen    {c['chosen']} ({c['reason']})")
    return lines


def _rates(m: dict) -> list[str]:
    """Detection rates that a mostly-good pixel count cannot hide (see :mod:`.metrics`)."""
    out = []
    reg = m.get("regions") or {}
    if reg.get("n"):
        out.append(
            f"{'regions':<9} {_fmt(reg['recall'], True)} of {reg['n']} defect regions reach the threshold on the "
            f"map (mean overlap {_fmt(reg['overlap'], True)}); pixel AUROC alone hides missed small defects"
        )
    rk = m.get("recall_per_kind") or {}
    if rk:
        out.append(
            f"{'flagged':<9} "
            + ", ".join(f"{k} {_fmt(v, True)}" for k, v in rk.items())
            + " of defective images at the threshold"
        )
    return out


def _tiling_lines(r: dict) -> list[str]:
    """The tiling and what it costs a frame (the fused tile model's batch-1 latency x tiles)."""
    t = r.get("tiling")
    if not t or t.get("count", 1) == 1:
        return []
    ms = (r.get("fused_latency_batch1") or {}).get("p50_ms")
    rows = t["count"] + int(bool(t.get("overview")))
    cost = (
        f"; about {rows * ms:.0f} ms of model a frame ({rows} x {ms:.1f} ms, this machine"
        + (f"; the overview's memory {t['overview_memory']} patches" if t.get("overview_memory") else "")
        + ")"
        if ms
        else ""
    )
    lines = [f"tiles     {t['plan']}{cost}"]
    kept = (r.get("selection") or {}).get("overview") or {}
    if kept.get("candidates"):
        alt = kept["candidates"]["tiles + overview"]
        lines.append(
            f"overview  {'kept' if kept['chosen'] != 'tiles' else 'left out'}: tiles alone AUROC "
            f"{kept['default_auroc']:.3f}, tiles + overview {alt['auroc']:.3f} ({alt['diff']:+.3f}, interval "
            f"[{alt['interval'][0]:+.3f}, {alt['interval'][1]:+.3f}]); {kept['reason']}"
        )
    elif kept.get("reason"):
        lines.append(f"overview  {'kept' if kept.get('chosen') != 'tiles' else 'left out'}: {kept['reason']}")
    return lines


# A tiled frame runs the patch head once per tile: its memory is cut so that a frame costs at most
# this many single views' worth of nearest-neighbour distances (a 4 x 4 plan: 10,000 / 4 = 2,500
# patches, as many as the coreset of ~3 frames at 10 %; the textures tried needed no more).
TILED_MEMORY_VIEWS = 4


def tiled_config(cfg, plan: TilePlan):
    """``cfg`` with the patchcore memory bounded for ``plan`` (see :data:`TILED_MEMORY_VIEWS`)."""
    patch = cfg.patch if isinstance(cfg, DefectConfig) else cfg
    cap = max(1000, patch.max_memory * TILED_MEMORY_VIEWS // plan.count)
    if not registry.get(patch.kind, "patch").has_memory or patch.max_memory <= cap:
        return cfg
    patch = dataclasses.replace(patch, max_memory=cap)
    return dataclasses.replace(cfg, patch=patch) if isinstance(cfg, DefectConfig) else patch


def tile_plan(data, cfg, pre: PreprocessConfig) -> TilePlan | None:
    """The tiling for this data's frames (the first training frame's size) and ``cfg.defect_size``."""
    if not data.train:
        return None
    mode = getattr(cfg, "overview", "auto")
    # "auto" fits the overview only where labelled anomalies can show whether it helps
    labelled = any(s.label != "good" for s in data.eval_set) and any(s.label == "good" for s in data.eval_set)
    overview = mode == "on" or (mode == "auto" and labelled)
    frame = frame_size(Path(data.train[0].path), pre)
    return plan_tiles(frame, pre.input_size, getattr(cfg, "defect_size", None), overview=overview)


def _memory(head) -> dict:
    """What a head remembers, for the adapt summary."""
    if isinstance(head, DefectHead):
        out = _memory(head.patch) if head.patch is not None and head.kind != head.image.kind else {}
        if registry.get(head.image.kind, "image").has_memory:
            return {**out, "image_memory": head.image.memory_size, "max_images": head.image.config.max_images}
        return {**out, "image_images": head.image.images}
    if registry.get(head.kind, "patch").has_memory:
        return {"patches": head.memory_size, "max_memory": head.config.max_memory}
    return {"images": image_count(head.arrays)}


def _fmt(v, pct: bool = False) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if not pct else f"{v:.1%}")


ANOMALY = AnomalyTask()
