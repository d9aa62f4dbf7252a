"""One-class defect detection: train on good images only, score every patch, map where it is odd.

The same frozen backbone as classification, cut after its stride-4 and stride-8 stages
(:func:`edgetl.backbones.patch_feature_model`: each stage 3x3-averaged, brought to one grid, and
concatenated; EfficientNet-Lite0 at 224 px gives 24 + 40 = 64 channels on a 28 x 28 grid). It is
converted for the target exactly like the classification backbone (INT8 calibrated on the good
training images), and the heads below are fitted on the features *that* model computes.

Heads (numpy, fitted in seconds, updated on the device by :func:`adapt_anomaly`):

``patchcore`` (default)
    A memory bank of good patch features, thinned by greedy k-centre coreset selection (seeded,
    ``coreset_ratio`` of all patches, at most ``max_memory``); a patch's score is the Euclidean
    distance to its nearest neighbour in the bank.
``padim``
    A Gaussian per patch position: mean and covariance of the good features seen at that position
    and its 3x3 neighbourhood (9x the samples, which small datasets need), shrunk towards a scaled
    identity with the Oracle Approximating Shrinkage rule (Chen et al. 2010: a Ledoit-Wolf-style
    shrinkage that needs only the covariance and the sample count, so it can be recomputed after
    an on-device update). A patch's score is its Mahalanobis distance. ``covariance="shared"``
    uses one covariance for all positions. At most ``padim_dims`` channels, a seeded random subset
    (the PaDiM paper's trick), keep the per-position matrices bounded: P x d x d floats.

Per image: the patch scores (28 x 28) are upsampled bilinearly to the input size and smoothed by
a Gaussian (sigma 4 px): one linear operator ``A @ S @ B``, precomputed as two small matrices, so
numpy and the exported graph compute it with the same two MatMuls. The image score is the map's
maximum.

Threshold: with labelled defects (``DATA/test/<defect>``), the best-F1 cut on that set; with good
images only, the 0.99 quantile of held-out good scores x 1.05 (5 % headroom for drift). It lives in
the manifest, never in the graph; ``predict`` reports ``score / threshold`` (1.0 = the threshold).

Everything after :func:`fit_anomaly` (predict, evaluate, adapt, the fused graph) is numpy + ONNX /
OpenVINO: no torch, no scipy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .adapt import (for_update, fused_files, fused_name, new_version_files, rollback, switch_version,
                    with_new_version, write_fused)
from .bundle import Bundle, BundleWriter, check_out_dir, load_bundle, write_npz_durably
from .data import Sample, check_image, is_image_name
from .errors import BundleError, ConfigError, DataError
from .features import FeatureCache, extract_features, load_input, session_key
from .preprocess import PreprocessConfig, resize_crop
from .runtime import open_backbone, open_bundle_model
from .sessions import Session, open_session

HEAD_KINDS = ("patchcore", "padim")
COVARIANCES = ("position", "shared")
LABELS = ["good", "defect"]
_FORMAT = "edgetl-anomaly-head"
_FORMAT_VERSION = 1
_HEADER_KEY = "__header__"
# Op types of the patch extractor's tail kept in float (ONNX and OpenVINO names): see fit_anomaly.
PATCH_FLOAT_TYPES = ("AveragePool", "AvgPool", "Resize", "Interpolate", "Concat")
# Mask pixels above this (0..255) are defect; MVTec masks are 0/255.
_MASK_LEVEL = 127


# =============================================================================== configuration
@dataclass(frozen=True)
class AnomalyConfig:
    """How an anomaly head is built. Defaults are what ``edgetl fit DATA --task anomaly`` does.

    Attributes:
        kind: ``patchcore`` or ``padim``.
        reductions: backbone stage strides read for patch features (stride 4 and 8: fine texture;
            on the defects example (4, 8) gave image AUROC 0.92 vs 0.80 for (8, 16), FP32 kNN).
        coreset_ratio: patchcore: fraction of all training patches kept in the memory bank.
        max_memory: patchcore: upper bound on the bank (bounds model size and kNN cost per image).
        projection: patchcore: coreset distances are computed on a seeded random projection to
            this many dimensions when the features are wider (Johnson-Lindenstrauss; PatchCore's).
        padim_dims: padim: channels kept (random seeded subset when the backbone gives more).
        covariance: padim: ``position`` (one per patch position) or ``shared``.
        neighbourhood: padim: radius of the position neighbourhood pooled into each Gaussian.
        sigma: Gaussian smoothing of the anomaly map, in input pixels.
        quantile: good-only threshold: this quantile of held-out good image scores ...
        margin: ... times this factor.
        seed: seeds the channel subset, the coreset start and the projection.
    """

    kind: str = "patchcore"
    reductions: tuple[int, ...] = (4, 8)
    coreset_ratio: float = 0.1
    max_memory: int = 10_000
    projection: int = 128
    padim_dims: int = 64
    covariance: str = "position"
    neighbourhood: int = 1
    sigma: float = 4.0
    quantile: float = 0.99
    margin: float = 1.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ConfigError(f"anomaly head {self.kind!r} is not one of {', '.join(HEAD_KINDS)}")
        if self.covariance not in COVARIANCES:
            raise ConfigError(f"covariance {self.covariance!r} is not one of {', '.join(COVARIANCES)}")
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ConfigError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.max_memory < 1 or self.padim_dims < 1 or self.projection < 1:
            raise ConfigError("max_memory, padim_dims and projection must be >= 1")
        if not 0.0 < self.quantile <= 1.0 or self.margin <= 0 or self.sigma < 0 or self.neighbourhood < 0:
            raise ConfigError("quantile must be in (0, 1], margin > 0, sigma >= 0, neighbourhood >= 0")
        if not self.reductions or any(int(r) < 1 for r in self.reductions):
            raise ConfigError(f"reductions must be positive backbone strides, got {self.reductions}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reductions"] = list(self.reductions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AnomalyConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "reductions" in d:
            d["reductions"] = tuple(int(r) for r in d["reductions"])
        return cls(**d)


def anomaly_preprocess(pre: PreprocessConfig) -> PreprocessConfig:
    """The backbone's preprocessing with no centre crop: a defect at the border must stay in view."""
    return dataclasses.replace(pre, crop_pct=1.0)


# =============================================================================== map operator
def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation, half-pixel centres, edges clamped.

    The same numbers as ONNX ``Resize(mode=linear, coordinate_transformation_mode=half_pixel)``
    and torch's ``interpolate(mode="bilinear", align_corners=False)`` along one axis.
    """
    R = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for o in range(n_out):
        x = min(max((o + 0.5) * scale - 0.5, 0.0), n_in - 1.0)
        i0 = int(math.floor(x))
        i1 = min(i0 + 1, n_in - 1)
        w = x - i0
        R[o, i0] += 1.0 - w
        R[o, i1] += w
    return R


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) Gaussian smoothing along one axis, truncated at 4 sigma, mirror-reflected edges
    (``d c b a | a b c d``, scipy.ndimage's ``reflect`` mode), weights summing to 1."""
    if sigma <= 0:
        return np.eye(n)
    r = int(4.0 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    G = np.zeros((n, n), np.float64)
    for i in range(n):
        for off, w in zip(range(-r, r + 1), k):
            j = i + off
            period = 2 * n
            j = j % period if n > 1 else 0
            if j >= n:
                j = period - 1 - j
            G[i, j] += w
    return G


def map_operator(grid: int, size: int, sigma: float) -> np.ndarray:
    """(size, grid) float32 matrix ``A``: ``A @ S @ A.T`` upsamples a grid x grid score map to
    size x size and smooths it. Both steps are linear, so their product is exact."""
    return (_blur_matrix(size, sigma) @ _interp_matrix(grid, size)).astype(np.float32)


# =============================================================================== heads
@dataclass
class AnomalyHead:
    """A fitted one-class head: arrays + settings. Scores patch features of shape (N, C, H, W).

    ``arrays`` hold what is fitted (and what :func:`adapt_anomaly` updates): patchcore: ``memory``
    (K, C); padim: ``channels``, ``mean`` and ``m2`` (per-position mean and scatter of the good
    features, before neighbourhood pooling) and ``count``. Derived quantities (the inverse
    covariances, the map operator) are rebuilt on load, deterministically.
    """

    kind: str
    config: AnomalyConfig
    grid: tuple[int, int]  # (H, W) of the patch grid
    channels_in: int  # C of the backbone's patch features
    size: int  # input resolution the map is produced at
    arrays: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # ---- derived -------------------------------------------------------------------------
    @property
    def operator(self) -> np.ndarray:
        if "A" not in self._cache:
            H, W = self.grid
            if H != W:
                raise BundleError(f"anomaly head: non-square patch grid {self.grid} is not supported")
            self._cache["A"] = map_operator(H, self.size, self.config.sigma)
        return self._cache["A"]

    def padim_params(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean (P, d), inverse covariance (P, d, d) or (d, d)) as float32, computed once."""
        if "padim" not in self._cache:
            self._cache["padim"] = _padim_params(self.arrays, self.grid, self.config)
        return self._cache["padim"]

    @property
    def memory_size(self) -> int:
        return int(self.arrays["memory"].shape[0]) if self.kind == "patchcore" else 0

    # ---- scoring (the numpy reference the exported graph must equal) ----------------------
    def patch_scores(self, F: np.ndarray, *, chunk: int = 8) -> np.ndarray:
        """(N, C, H, W) features -> (N, H, W) float32 patch scores (distances)."""
        F = self._check(F)
        out = [self._patch_scores(F[i : i + chunk]) for i in range(0, len(F), chunk)]
        return np.concatenate(out) if out else np.zeros((0, *self.grid), np.float32)

    def _patch_scores(self, F: np.ndarray) -> np.ndarray:
        N = F.shape[0]
        H, W = self.grid
        P = H * W
        if self.kind == "patchcore":
            X = F.reshape(N, self.channels_in, P).transpose(0, 2, 1)  # (N, P, C)
            mt2, mm = self._knn_constants()
            d2 = (np.sum(X * X, axis=-1, keepdims=True) + X @ mt2) + mm
            d2 = np.min(d2, axis=-1)
        else:
            mean, inv = self.padim_params()
            ch = self.arrays["channels"].astype(np.int64)
            X = F[:, ch].reshape(N, len(ch), P)
            if inv.ndim == 3:  # per position: (P, N, d)
                D = X.transpose(2, 0, 1) - mean[:, None, :]
                d2 = np.sum((D @ inv) * D, axis=-1).T
            else:
                D = X.transpose(0, 2, 1) - mean[None]
                d2 = np.sum((D @ inv) * D, axis=-1)
        return np.sqrt(np.maximum(d2, np.float32(0))).reshape(N, H, W).astype(np.float32, copy=False)

    def _knn_constants(self) -> tuple[np.ndarray, np.ndarray]:
        if "knn" not in self._cache:
            M = self.arrays["memory"].astype(np.float32)
            self._cache["knn"] = ((-2.0 * M.T).astype(np.float32), np.sum(M * M, axis=1)[None, :].astype(np.float32))
        return self._cache["knn"]

    def maps(self, F: np.ndarray, *, chunk: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """(N, C, H, W) features -> (anomaly maps (N, size, size), image scores (N,)), float32."""
        S = self.patch_scores(F, chunk=chunk)
        return maps_from_patches(S, self.operator)

    def _check(self, F: np.ndarray) -> np.ndarray:
        F = np.asarray(F, dtype=np.float32)
        want = (self.channels_in, *self.grid)
        if F.ndim != 4 or tuple(F.shape[1:]) != want:
            raise DataError(f"anomaly head expects patch features of shape (N, {', '.join(map(str, want))}), got {F.shape}")
        return F

    # ---- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """An uncompressed ``.npz`` (atomic write); settings travel as JSON bytes, never pickles."""
        path = Path(path)
        header = {"format": _FORMAT, "version": _FORMAT_VERSION, "kind": self.kind, "config": self.config.to_dict(),
                  "grid": list(self.grid), "channels_in": self.channels_in, "size": self.size, "meta": self.meta}
        payload = {k: np.asarray(v, order="C") for k, v in self.arrays.items()}  # keeps 0-d arrays 0-d
        if "m2" in payload:  # symmetric (P, d, d): the upper triangle is enough, half the bytes
            m2 = payload.pop("m2")
            payload["m2_triu"] = m2[:, *np.triu_indices(m2.shape[-1])]
        payload[_HEADER_KEY] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
        write_npz_durably(path, **payload)

    @classmethod
    def load(cls, path: str | Path) -> "AnomalyHead":
        """Read a head written by :meth:`save` (``allow_pickle=False``).

        Raises:
            BundleError: missing, unreadable or not an anomaly head.
        """
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                raw = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise BundleError(f"{path}: no such head file") from None
        except Exception as exc:  # zip errors, pickle refusal, truncation
            raise BundleError(f"{path}: cannot read anomaly head ({type(exc).__name__}: {exc})") from None
        blob = raw.pop(_HEADER_KEY, None)
        if "m2_triu" in raw:
            packed = raw.pop("m2_triu")
            d = int(round((math.sqrt(8 * packed.shape[-1] + 1) - 1) / 2))
            m2 = np.zeros((packed.shape[0], d, d), packed.dtype)
            iu = np.triu_indices(d)
            m2[:, iu[0], iu[1]] = packed
            m2[:, iu[1], iu[0]] = packed
            raw["m2"] = m2
        try:
            header = json.loads(blob.tobytes().decode()) if blob is not None else None
        except (UnicodeDecodeError, ValueError):
            header = None
        if not isinstance(header, dict) or header.get("format") != _FORMAT:
            raise BundleError(f"{path}: not an edgetl anomaly head")
        if header.get("version") != _FORMAT_VERSION:
            raise BundleError(f"{path}: anomaly head format {header.get('version')}; this edgetl reads {_FORMAT_VERSION}")
        need = {"patchcore": {"memory"}, "padim": {"channels", "mean", "m2", "count"}}.get(header.get("kind"))
        if need is None or not need <= set(raw):
            missing = sorted((need or set()) - set(raw))
            raise BundleError(f"{path}: anomaly head of kind {header.get('kind')!r} lacks arrays {missing}")
        return cls(header["kind"], AnomalyConfig.from_dict(header["config"]), tuple(header["grid"]),
                   int(header["channels_in"]), int(header["size"]), raw, header.get("meta", {}))


def maps_from_patches(S: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, h, w) patch scores -> (maps (N, size, size), max of each map): ``A @ S @ A.T`` in float32."""
    maps = (A @ S.astype(np.float32)) @ A.T
    return maps, maps.reshape(len(maps), -1).max(axis=1) if len(maps) else np.zeros(0, np.float32)


def _patches(F: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N * H * W, C) rows, image-major."""
    N, C, H, W = F.shape
    return np.ascontiguousarray(F.reshape(N, C, H * W).transpose(0, 2, 1).reshape(-1, C), dtype=np.float32)


# ----- patchcore ------------------------------------------------------------------------------
def greedy_coreset(X: np.ndarray, n: int, *, seed: int = 0, projection: int = 128,
                   centres: np.ndarray | None = None) -> np.ndarray:
    """Indices of ``n`` rows of ``X`` chosen by greedy k-centre selection (farthest point first).

    Each step adds the row farthest from everything chosen so far, so the chosen rows cover the
    feature space with the smallest worst-case gap (the guarantee PatchCore relies on). With
    ``centres`` (rows already in a memory bank) selection continues from them instead of from one
    seeded random row. Distances use a seeded random projection when ``X`` is wider than
    ``projection``. Cost: n passes over X.
    """
    X = np.asarray(X, dtype=np.float32)
    n = min(int(n), len(X))
    if n <= 0:
        return np.zeros(0, np.int64)
    if n == len(X) and centres is None:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if X.shape[1] > projection:
        proj = (rng.standard_normal((X.shape[1], projection)) / math.sqrt(projection)).astype(np.float32)
        Z = X @ proj
        C = centres @ proj if centres is not None and len(centres) else None
    else:
        Z, C = X, centres
    zz = np.sum(Z * Z, axis=1)
    if C is not None and len(C):
        C = np.asarray(C, np.float32)
        cc = np.sum(C * C, axis=1)
        mind = np.full(len(Z), np.inf, np.float32)
        for s in range(0, len(C), 2048):
            d = zz[:, None] - 2.0 * (Z @ C[s : s + 2048].T) + cc[None, s : s + 2048]
            mind = np.minimum(mind, d.min(axis=1))
        first = int(np.argmax(mind))
    else:
        first = int(rng.integers(len(Z)))
        mind = np.full(len(Z), np.inf, np.float32)
    chosen = [first]
    for _ in range(n - 1):
        c = Z[chosen[-1]]
        mind = np.minimum(mind, zz - 2.0 * (Z @ c) + float(c @ c))
        chosen.append(int(np.argmax(mind)))
    return np.asarray(chosen, np.int64)


def _coreset_size(n_patches: int, cfg: AnomalyConfig) -> int:
    return max(1, min(cfg.max_memory, int(math.ceil(cfg.coreset_ratio * n_patches))))


def fit_patchcore(F: np.ndarray, cfg: AnomalyConfig, *, size: int) -> AnomalyHead:
    """A PatchCore memory bank from good images' patch features (N, C, H, W)."""
    X = _patches(F)
    idx = greedy_coreset(X, _coreset_size(len(X), cfg), seed=cfg.seed, projection=cfg.projection)
    return AnomalyHead("patchcore", cfg, tuple(F.shape[2:]), int(F.shape[1]), size,
                       {"memory": X[idx]}, {"images": int(len(F)), "patches_seen": int(len(X))})


def _update_patchcore(head: AnomalyHead, F: np.ndarray) -> AnomalyHead:
    """New good images -> a bank that also covers their patches, never larger than ``max_memory``.

    New patches join by continuing the greedy selection from the current bank (``coreset_ratio``
    of the new patches); when that would exceed ``max_memory``, a coreset of the bank plus the new
    patches is selected afresh at ``max_memory``.
    """
    cfg = head.config
    old = head.arrays["memory"].astype(np.float32)
    X = _patches(F)
    add = int(math.ceil(cfg.coreset_ratio * len(X)))
    if len(old) + add <= cfg.max_memory:
        idx = greedy_coreset(X, add, seed=cfg.seed, projection=cfg.projection, centres=old)
        memory = np.concatenate([old, X[idx]])
    else:
        pool = np.concatenate([old, X])
        memory = pool[greedy_coreset(pool, cfg.max_memory, seed=cfg.seed, projection=cfg.projection)]
    meta = dict(head.meta, images=head.meta.get("images", 0) + len(F),
                patches_seen=head.meta.get("patches_seen", 0) + len(X))
    return dataclasses.replace(head, arrays={"memory": memory}, meta=meta, _cache={})


# ----- padim ----------------------------------------------------------------------------------
def _channel_subset(C: int, cfg: AnomalyConfig) -> np.ndarray:
    if cfg.padim_dims >= C:
        return np.arange(C, dtype=np.int64)
    return np.sort(np.random.default_rng(cfg.seed).choice(C, cfg.padim_dims, replace=False)).astype(np.int64)


def _moments(F: np.ndarray, channels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per position: mean (P, d) and scatter sum (P, d, d) of (N, C, H, W) features, float64."""
    N, _, H, W = F.shape
    X = F[:, channels].reshape(N, len(channels), H * W).transpose(2, 0, 1).astype(np.float64)  # (P, N, d)
    mean = X.mean(axis=1)
    Z = X - mean[:, None, :]
    m2 = Z.transpose(0, 2, 1) @ Z
    return mean, 0.5 * (m2 + m2.transpose(0, 2, 1)), N  # exactly symmetric: saved as a triangle


def _merge(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.'s parallel update: moments of A and B -> moments of A u B, exactly."""
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + (n_a * n_b / n) * (delta[..., :, None] * delta[..., None, :])
    return mean, m2, n


def fit_padim(F: np.ndarray, cfg: AnomalyConfig, *, size: int) -> AnomalyHead:
    """PaDiM statistics from good images' patch features (N, C, H, W)."""
    channels = _channel_subset(int(F.shape[1]), cfg)
    mean, m2, n = _moments(F, channels)
    arrays = {"channels": channels, "mean": mean.astype(np.float32), "m2": m2.astype(np.float32),
              "count": np.asarray(n, np.int64)}
    return AnomalyHead("padim", cfg, tuple(F.shape[2:]), int(F.shape[1]), size, arrays, {"images": int(n)})


def _count(arrays: dict) -> int:
    """The number of images a padim head's moments summarise."""
    return int(np.asarray(arrays["count"]).reshape(-1)[0])


def _update_padim(head: AnomalyHead, F: np.ndarray) -> AnomalyHead:
    """New good images merged into the stored moments: same result as fitting on all images."""
    a = head.arrays
    mean_b, m2_b, n_b = _moments(F, a["channels"].astype(np.int64))
    mean, m2, n = _merge(a["mean"].astype(np.float64), a["m2"].astype(np.float64), _count(a), mean_b, m2_b, n_b)
    arrays = {"channels": a["channels"], "mean": mean.astype(np.float32), "m2": m2.astype(np.float32),
              "count": np.asarray(n, np.int64)}
    return dataclasses.replace(head, arrays=arrays, meta=dict(head.meta, images=int(n)), _cache={})


def oas_shrink(S: np.ndarray, n: float) -> tuple[np.ndarray, np.ndarray]:
    """Oracle Approximating Shrinkage of covariances S (..., d, d) estimated from n samples.

    Returns (shrunk covariances, shrinkage weights): ``(1 - rho) S + rho * trace(S)/d * I`` with
    ``rho = min(1, (tr(S^2) + tr(S)^2) / ((n + 1) (tr(S^2) - tr(S)^2 / d)))``: Chen et al.'s eq. 23
    without its 2/d terms, as scikit-learn's ``OAS`` computes it (the unit test compares the two).
    """
    d = S.shape[-1]
    tr = np.trace(S, axis1=-2, axis2=-1)
    tr2 = np.sum(S * S, axis=(-2, -1))
    num = tr2 + tr**2
    den = (n + 1.0) * (tr2 - tr**2 / d)
    rho = np.where(den > 0, np.minimum(1.0, num / np.where(den > 0, den, 1.0)), 1.0)
    eye = np.eye(d)
    return (1.0 - rho)[..., None, None] * S + (rho * tr / d)[..., None, None] * eye, rho


def _padim_params(arrays: dict, grid: tuple[int, int], cfg: AnomalyConfig) -> tuple[np.ndarray, np.ndarray]:
    """Neighbourhood-pooled means and (shrunk, inverted) covariances from the stored moments."""
    H, W = grid
    mean = arrays["mean"].astype(np.float64)
    m2 = arrays["m2"].astype(np.float64)
    n = _count(arrays)
    d = mean.shape[1]
    r = cfg.neighbourhood
    if r > 0:
        # Each position's Gaussian pools the (2r+1)^2 positions around it (edges replicated):
        # the moments of that union, merged exactly.
        mg = np.pad(mean.reshape(H, W, d), ((r, r), (r, r), (0, 0)), mode="edge")
        sg = np.pad(m2.reshape(H, W, d, d), ((r, r), (r, r), (0, 0), (0, 0)), mode="edge")
        offs = [(i, j) for i in range(2 * r + 1) for j in range(2 * r + 1)]
        pooled_mean = sum(mg[i : i + H, j : j + W] for i, j in offs) / len(offs)
        pooled_m2 = np.zeros((H, W, d, d))
        for i, j in offs:
            delta = mg[i : i + H, j : j + W] - pooled_mean
            pooled_m2 += sg[i : i + H, j : j + W] + n * (delta[..., :, None] * delta[..., None, :])
        mean, m2, n_eff = pooled_mean.reshape(H * W, d), pooled_m2.reshape(H * W, d, d), n * len(offs)
    else:
        n_eff = n
    if cfg.covariance == "shared":
        cov = m2.sum(axis=0) / max(n_eff * H * W - 1, 1)
        cov, _ = oas_shrink(cov, n_eff * H * W)
    else:
        cov = m2 / max(n_eff - 1, 1)
        cov, _ = oas_shrink(cov, n_eff)
    inv = np.linalg.inv(cov)
    inv = 0.5 * (inv + np.swapaxes(inv, -1, -2))
    return mean.astype(np.float32), inv.astype(np.float32)


def fit_head(F: np.ndarray, cfg: AnomalyConfig, *, size: int) -> AnomalyHead:
    """Fit ``cfg.kind`` on good images' patch features (N, C, H, W).

    Raises:
        DataError: no images, or features that are not (N, C, H, W).
    """
    F = np.asarray(F, np.float32)
    if F.ndim != 4 or len(F) == 0:
        raise DataError(f"anomaly heads need patch features (N, C, H, W) of >= 1 good image, got {F.shape}")
    return fit_patchcore(F, cfg, size=size) if cfg.kind == "patchcore" else fit_padim(F, cfg, size=size)


def update_head(head: AnomalyHead, F: np.ndarray) -> AnomalyHead:
    """``head`` after also learning the good images with features ``F``; memory stays bounded."""
    F = head._check(F)
    return _update_patchcore(head, F) if head.kind == "patchcore" else _update_padim(head, F)


# =============================================================================== metrics
def auroc(y: np.ndarray, s: np.ndarray) -> float | None:
    """Area under the ROC curve, rank-based (Mann-Whitney U, ties counted half). None with one class.

    Example:
        >>> auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
        0.75
    """
    y = np.asarray(y).astype(bool).ravel()
    s = np.asarray(s, dtype=np.float64).ravel()
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    rank_sum = float(avg_rank[inverse][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def best_f1_threshold(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """The cut ``score >= t -> defect`` with the best F1 on labelled scores; t is placed halfway
    between the lowest score called defect and the highest score below it. Returns (t, F1)."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    ys, ss = y[order], s[order]
    tp = np.cumsum(ys)
    fp = np.cumsum(~ys)
    last = np.r_[ss[1:] != ss[:-1], True]  # only cut between distinct scores
    f1 = np.where(last, 2 * tp / (tp + fp + y.sum()), -1.0)
    k = int(np.argmax(f1))
    t = ss[k] if k + 1 >= len(ss) else 0.5 * (ss[k] + ss[k + 1])
    return float(t), float(f1[k])


def quantile_threshold(good_scores: np.ndarray, cfg: AnomalyConfig) -> float:
    """Good-only rule: the ``quantile`` of held-out good scores times ``margin``."""
    return float(np.quantile(np.asarray(good_scores, np.float64), cfg.quantile) * cfg.margin)


def detection_metrics(y: np.ndarray, scores: np.ndarray, threshold: float, *, maps: np.ndarray | None = None,
                      masks: list[np.ndarray | None] | None = None) -> dict:
    """Image AUROC, pixel AUROC (when masks are given for the defect images), and counts at the threshold."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(scores) >= threshold
    tp, fp = int(np.sum(pred & y)), int(np.sum(pred & ~y))
    fn, tn = int(np.sum(~pred & y)), int(np.sum(~pred & ~y))
    out = {
        "n": int(len(y)), "n_defect": int(y.sum()), "n_good": int((~y).sum()),
        "image_auroc": _round(auroc(y, scores)),
        "threshold": float(threshold),
        "accuracy": round((tp + tn) / max(len(y), 1), 4),
        "precision": round(tp / (tp + fp), 4) if tp + fp else None,
        "recall": round(tp / (tp + fn), 4) if tp + fn else None,
        "f1": round(2 * tp / (2 * tp + fp + fn), 4) if tp + fp + fn else None,
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "pixel_auroc": None,
    }
    if maps is not None and masks is not None and any(m is not None for m in masks):
        gt = np.stack([m if m is not None else np.zeros(maps.shape[1:], bool) for m in masks])
        out["pixel_auroc"] = _round(auroc(gt.ravel(), maps.ravel()))
        out["peak_in_mask"] = _round(peak_in_mask(maps, masks, radius=8))
    return out


def _round(v: float | None, nd: int = 4) -> float | None:
    return None if v is None else round(float(v), nd)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation with a (2r+1)^2 square, numpy only."""
    if radius <= 0:
        return mask.astype(bool)
    H, W = mask.shape
    p = np.pad(mask.astype(bool), radius)
    out = np.zeros((H, W), bool)
    for i in range(2 * radius + 1):
        for j in range(2 * radius + 1):
            out |= p[i : i + H, j : j + W]
    return out


def peak_in_mask(maps: np.ndarray, masks: Sequence[np.ndarray | None], *, radius: int = 8) -> float | None:
    """Fraction of images with a mask whose map maximum lies inside the mask dilated by ``radius`` px."""
    hits = []
    for m, mask in zip(maps, masks):
        if mask is None or not mask.any():
            continue
        i, j = np.unravel_index(int(np.argmax(m)), m.shape)
        hits.append(bool(dilate(mask, radius)[i, j]))
    return float(np.mean(hits)) if hits else None


# =============================================================================== data
@dataclass
class AnomalyData:
    """Good training images, good held-out images, and a labelled test set when one exists.

    Layouts: MVTec AD (``train/good``, ``test/good``, ``test/<defect>``, ``ground_truth/<defect>/
    <name>_mask.png``), ``DATA/good/``, or a folder of images. Without a ``test`` folder,
    ``val_split`` of the good images is held out to set the threshold.
    """

    root: Path
    layout: str
    train: list[Sample]
    val: list[Sample]  # held-out good images (when there is no test set)
    test: list[Sample]  # label "good" or the defect type
    masks: dict[str, Path] = field(default_factory=dict)  # str(test image path) -> mask file
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def eval_set(self) -> list[Sample]:
        return self.test or self.val

    def counts(self) -> dict:
        c = {"train_good": len(self.train), "val_good": len(self.val)}
        for s in self.test:
            key = f"test_{s.label}"
            c[key] = c.get(key, 0) + 1
        return c


def _images_in(folder: Path, label: str, skipped: list, *, strict: bool) -> list[Sample]:
    out = []
    for p in sorted(q for q in folder.rglob("*") if q.is_file() and not q.name.startswith(".")):
        if not is_image_name(p):
            continue
        try:
            out.append(Sample(p, label, check_image(p)))
        except DataError as exc:
            if strict:
                raise
            skipped.append((p, str(exc).split(": ", 1)[-1]))
    return out


def load_anomaly_data(root: str | Path, *, val_split: float = 0.2, seed: int = 0, strict: bool = False) -> AnomalyData:
    """Find good training images (and a labelled test set) under ``root``.

    Raises:
        DataError: no good images, or too few to hold any out when there is no test set.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; expected DATA/train/good (MVTec layout), DATA/good or a folder of images")
    skipped: list = []
    if (root / "train" / "good").is_dir():
        layout, train = "mvtec", _images_in(root / "train" / "good", "good", skipped, strict=strict)
    elif (root / "good").is_dir():
        layout, train = "good", _images_in(root / "good", "good", skipped, strict=strict)
    else:
        layout = "flat"
        train = [s for s in _images_in(root, "good", skipped, strict=strict) if s.path.parent == root]
    if not train:
        raise DataError(f"{root}: no good training images; put them in {root}/train/good/ or {root}/good/")
    test: list[Sample] = []
    masks: dict[str, Path] = {}
    if (root / "test").is_dir():
        for kind_dir in sorted(p for p in (root / "test").iterdir() if p.is_dir() and not p.name.startswith(".")):
            samples = _images_in(kind_dir, kind_dir.name, skipped, strict=strict)
            test += samples
            gt = root / "ground_truth" / kind_dir.name
            for s in samples:
                for cand in (gt / f"{s.path.stem}_mask.png", gt / f"{s.path.stem}.png"):
                    if cand.is_file():
                        masks[str(s.path)] = cand
                        break
    val: list[Sample] = []
    if not any(s.label == "good" for s in test):
        if len(train) < 2:
            raise DataError(f"{root}: {len(train)} good image; need >= 2 (some are held out to set the threshold) "
                            "or a test/good folder")
        order = np.random.default_rng(seed).permutation(len(train))
        n_val = min(len(train) - 1, max(1, round(len(train) * val_split)))
        val = [train[i] for i in sorted(order[:n_val])]
        train = [train[i] for i in sorted(order[n_val:])]
    return AnomalyData(root, layout, train, val, test, masks, skipped)


def load_mask(path: Path | None, pre: PreprocessConfig) -> np.ndarray | None:
    """A defect mask brought to the map's pixels: the image's own resize + crop, nearest neighbour."""
    if path is None:
        return None
    with Image.open(path) as im:
        im = im.convert("L")
        arr = np.asarray(resize_crop(im, dataclasses.replace(pre, interpolation="nearest")))
    return arr > _MASK_LEVEL


def extract_patch_features(paths: Sequence[Path], *, session: Session, preprocess: PreprocessConfig,
                           shape: tuple[int, int, int], digests: Sequence[str] | None = None,
                           cache: FeatureCache | None = None, batch_size: int = 16, quiet: bool = True,
                           desc: str = "patch features") -> np.ndarray:
    """(N, C, H, W) patch features of image files through ``session`` (cached like any features)."""
    flat = extract_features(paths, session=session, preprocess=preprocess, digests=digests, cache=cache,
                            batch_size=batch_size, quiet=quiet, desc=desc)
    return flat.reshape(len(paths), *shape) if len(paths) else np.zeros((0, *shape), np.float32)


def feature_shape(model_path: Path) -> tuple[int, int, int]:
    """(C, H, W) of a patch-feature model's first output, read from the graph (ONNX or IR)."""
    if model_path.suffix == ".xml":
        from .errors import require

        ov = require("openvino", extra="openvino", purpose="reading OpenVINO models")
        shape = ov.Core().read_model(str(model_path)).outputs[0].get_partial_shape()
        dims = [d.get_length() for d in list(shape)[1:]]
    else:
        from .errors import require

        onnx = require("onnx", extra="base", purpose="reading ONNX graphs")
        out = onnx.load(str(model_path), load_external_data=False).graph.output[0]
        dims = [d.dim_value for d in out.type.tensor_type.shape.dim[1:]]
    if len(dims) != 3 or not all(dims):
        raise BundleError(f"{model_path}: not a patch-feature model (output shape (N, {dims}))")
    return tuple(int(d) for d in dims)  # type: ignore[return-value]


# =============================================================================== fit
@dataclass(frozen=True)
class AnomalyOptions:
    """Everything :func:`fit_anomaly` can be told; defaults are ``edgetl fit DATA --task anomaly``."""

    head: AnomalyConfig = field(default_factory=AnomalyConfig)
    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    target: str | None = None
    precision: str | None = None
    runtime: str | None = None
    val_split: float = 0.2
    seed: int = 0
    cache_dir: str | None = None
    strict: bool = False
    calibration_size: int | None = None
    allow_drop: bool = False
    reference: bool = True
    batch_size: int = 16
    quiet: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["head"] = self.head.to_dict()
        return d


@dataclass
class AnomalyFitResult:
    """What :func:`fit_anomaly` produced."""

    bundle: Bundle
    metrics: dict
    report: dict
    data: AnomalyData
    timings: dict


def _evaluate(head: AnomalyHead, F: np.ndarray, samples: list[Sample], masks: dict, pre: PreprocessConfig,
              threshold: float | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Metrics of ``head`` on labelled features; picks the threshold when none is given."""
    maps, scores = head.maps(F)
    y = np.array([s.label != "good" for s in samples], bool)
    if threshold is None:
        if y.any() and (~y).any():
            threshold, _ = best_f1_threshold(y, scores)
            policy = "best F1 on labelled test images"
        else:
            threshold = quantile_threshold(scores[~y], head.config)
            policy = f"{head.config.quantile} quantile of held-out good scores x {head.config.margin}"
    else:
        policy = "given"
    mk = [load_mask(masks.get(str(s.path)), pre) if s.label != "good" else None for s in samples]
    m = detection_metrics(y, scores, threshold, maps=maps, masks=mk)
    m["threshold_policy"] = policy
    return m, maps, scores


def fit_anomaly(data: str | Path, out: str | Path, *, options: AnomalyOptions = AnomalyOptions(),
                force: bool = False, signer=None) -> AnomalyFitResult:
    """Good images in ``data`` -> a defect-detection bundle at ``out``.

    Backbone (patch features, converted for the target and calibrated on the good training images)
    -> patch features -> head (numpy) -> threshold -> bundle with the fused model (backbone +
    scoring graph: outputs ``anomaly_map`` and ``score``), checked against the numpy reference.

    Raises:
        DataError: no good images.  ConfigError: bad option or profile.
        GateError: INT8 loses more image AUROC than the target allows (unless ``allow_drop``).

    Example:
        >>> r = fit_anomaly("parts/", "parts.bundle")  # doctest: +SKIP
        >>> r.metrics["image_auroc"]  # doctest: +SKIP
    """
    from . import __version__
    from .anomaly_export import fuse_anomaly, fused_parity
    from .fuse import check_parity
    from .gate import GateDecision, auroc_gate, enforce
    from .backbones import default_cache_dir, export_backbone
    from .data import Dataset
    from .fit import _converted_model, measure_latency
    from .quantize import feature_cosine
    from .targets import load_target

    out = Path(out)
    check_out_dir(out, force=force, data=data)
    cfg = options.head
    timings: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[name] = round(now - t, 3)
        t = now

    target = load_target(options.target).with_overrides(precision=options.precision, runtime=options.runtime)
    q = target.quantization
    # The patch extractor ends in averaging, resizing and concatenation: nothing INT8 speeds up,
    # and left quantized, OpenVINO's low-precision passes carry the last dequantization into the
    # fused scoring graph and compute wrong distances there (every score ~170 for true 19-32).
    q = dataclasses.replace(q, keep_float_types=tuple(dict.fromkeys(q.keep_float_types + PATCH_FLOAT_TYPES)))
    if options.calibration_size is not None:
        q = dataclasses.replace(q, calibration_size=options.calibration_size)
    target = dataclasses.replace(target, quantization=q)
    ds = load_anomaly_data(data, val_split=options.val_split, seed=options.seed, strict=options.strict)
    lap("scan")
    cache_root = Path(options.cache_dir) if options.cache_dir else default_cache_dir()
    exported = export_backbone(options.backbone, weights=options.weights, cache_dir=cache_root, opset=target.opset,
                               patch_reductions=tuple(cfg.reductions))
    exported = dataclasses.replace(exported, preprocess=anomaly_preprocess(exported.preprocess))
    pre = exported.preprocess
    lap("export")
    # Calibration: the good training images only (fit's own stratified subset + augmented views).
    calib_ds = Dataset(ds.root, ds.layout, ["good"], ds.train, [], [])
    shipped = _converted_model(exported, target, calib_ds, cache_root, options.seed, quiet=options.quiet)
    lap("convert")

    shape = feature_shape(exported.path)
    evalset = ds.eval_set

    # Targets whose integer kernels never saturate (ARM dot products, TensorRT) are fitted on exact
    # INT8 arithmetic (QDQ run unfused), as classification does; see Target.fit_features.
    simulate = target.fit_features == "simulated" and target.precision == "int8"

    def features(model_path: Path, runtime: str, device: str, desc: str, sim: bool = False, precision: str = "f32"):
        sess = open_session(model_path, runtime=runtime, device=device, providers=["CPUExecutionProvider"], simulate=sim,
                            float_precision=precision)
        cache = FeatureCache(cache_root, session_key(sess, model_path, pre))
        kw = dict(session=sess, preprocess=pre, shape=shape, cache=cache, batch_size=options.batch_size,
                  quiet=options.quiet)
        F_tr = extract_patch_features([s.path for s in ds.train], digests=[s.digest for s in ds.train],
                                      desc=f"{desc} train", **kw)
        F_ev = extract_patch_features([s.path for s in evalset], digests=[s.digest for s in evalset],
                                      desc=f"{desc} eval", **kw)
        return sess, cache, F_tr, F_ev

    session, cache, F_tr, F_ev = features(shipped.path, target.runtime, target.device, "patch features", simulate,
                                          target.session_precision)
    lap("features")
    head = fit_head(F_tr, cfg, size=pre.input_size)
    lap("head")
    metrics, maps, scores = _evaluate(head, F_ev, evalset, ds.masks, pre)
    threshold = metrics["threshold"]
    lap("evaluate")

    ref: dict = {}
    is_reference = target.precision == "fp32" and target.runtime == "onnxruntime"
    decision = GateDecision("image_auroc", target.accuracy_tolerance, 0, method="the shipped model is the reference")
    if options.reference and not is_reference:
        _, _, R_tr, R_ev = features(exported.path, "onnxruntime", "CPU", "fp32 reference")
        ref_head = fit_head(R_tr, cfg, size=pre.input_size)
        ref_m, _, ref_scores = _evaluate(ref_head, R_ev, evalset, ds.masks, pre)
        decision = auroc_gate([s.label != "good" for s in evalset], ref_scores, scores,
                              tolerance_pp=target.accuracy_tolerance)
        cos = feature_cosine(_patches(R_ev), _patches(F_ev)) if len(R_ev) else np.ones(1)
        ref = {"fp32_image_auroc": ref_m["image_auroc"], "image_auroc": metrics["image_auroc"],
               "fp32_pixel_auroc": ref_m["pixel_auroc"], "pixel_auroc": metrics["pixel_auroc"],
               "fp32_f1": ref_m["f1"], "f1": metrics["f1"],
               "patch_feature_cosine_mean": round(float(cos.mean()), 5),
               "patch_feature_cosine_p01": round(float(np.quantile(cos, 0.01)), 5)}
        if ref_m["image_auroc"] is not None and metrics["image_auroc"] is not None:
            ref["image_auroc_drop_pp"] = round((ref_m["image_auroc"] - metrics["image_auroc"]) * 100, 3)
    lap("reference")
    gate = decision.to_dict()
    enforce(decision, model=f"{target.precision} model", target=target.name, allow=options.allow_drop,
            hint="try --calibration-size or --precision fp32")

    with BundleWriter(out, force=force, data=data, signer=signer) as w:
        backbone_name = f"backbone{shipped.path.suffix}"
        for src in shipped.files():
            shutil.copyfile(src, w.dir / f"backbone{src.suffix}")
        (w.dir / "heads").mkdir()
        head.save(w.dir / "heads" / "v1.npz")
        meta = {"edgetl_version": __version__, "task": "anomaly", "preprocess": pre.to_dict(),
                "backbone": exported.name, "precision": target.precision, "target": target.name,
                "head": head.kind, "head_version": 1, "threshold": threshold,
                "outputs": "anomaly_map (N, S, S), score (N,): raw; divide by the manifest threshold"}
        fused_path = fuse_anomaly(w.dir / backbone_name, head, w.dir / f"model{shipped.path.suffix}", meta=meta)
        if target.tensorrt is not None:
            from .tensorrt import write_build_scripts

            write_build_scripts(w.dir, fused=fused_path.name, workspace_mb=target.tensorrt.workspace_mb,
                                level=target.tensorrt.builder_optimization_level)
        lap("bundle")
        probe = evalset[:8] or ds.train[:8]
        probe_x = np.stack([load_input(s.path, pre) for s in probe])
        fused_session = open_session(fused_path, runtime=target.runtime, device=target.device, simulate=simulate,
                                     float_precision=target.session_precision)
        par = fused_parity(fused_session, session, head, probe_x, shape)
        check_parity(par, par["max_rel_score_diff"], "relative score difference", allow=options.allow_drop)
        latency = {"backbone": measure_latency(session, (3, pre.input_size, pre.input_size)),
                   "fused": measure_latency(fused_session, (3, pre.input_size, pre.input_size))}
        sizes = {"backbone_bytes": sum(p.stat().st_size for p in shipped.files()),
                 "fused_bytes": sum(p.stat().st_size for p in _model_files(fused_path)),
                 "head_bytes": (w.dir / "heads" / "v1.npz").stat().st_size,
                 "fp32_backbone_bytes": exported.path.stat().st_size}
        report = {
            "task": "anomaly", "head": head.kind, "precision": target.precision, "runtime": target.runtime,
            "target": target.name, "conversion": shipped.info, "eval_set": "test" if ds.test else "held-out good",
            "metrics": metrics, "reference": ref, "gate": gate, "fused_parity": par, "latency_batch1": latency,
            "numerics": {"features": session.describe(), "fused": fused_session.describe(),
                         "target_float_precision": target.session_precision},
            "size": sizes, "memory_patches": head.memory_size, "timings_s": timings,
        }
        (w.dir / "report.json").write_text(json.dumps(report, indent=2))
        sizes["bundle_bytes"] = sum(p.stat().st_size for p in w.dir.rglob("*") if p.is_file())
        entry = {"version": 1, "file": "heads/v1.npz", "kind": head.kind, "labels": LABELS, "source": "fit",
                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "fused": fused_path.name,
                 "threshold": threshold, "threshold_policy": metrics["threshold_policy"],
                 "images": head.meta.get("images"), "image_auroc": metrics["image_auroc"]}
        manifest = {
            "edgetl_version": __version__,
            "task": "anomaly",
            "labels": LABELS,
            "backbone": {**exported.to_dict(), "feature_shape": list(shape), "patch_reductions": list(cfg.reductions)},
            "target": target.to_dict(),
            "precision": target.precision,
            "runtime": target.runtime,
            "models": {"backbone": backbone_name, "fused": fused_path.name},
            "head": {"current": 1, "versions": [entry]},
            "thresholds": {"anomaly": threshold},
            "anomaly": {"map_size": pre.input_size, "grid": list(head.grid), "sigma": cfg.sigma,
                        "normalised_score": "score / threshold (>= 1.0 means defect)",
                        "outputs": ["anomaly_map", "score"]},
            "metrics": {"eval": {k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "f1", "n")},
                        **({"reference": ref} if ref else {})},
            "training": {"data": str(Path(data).resolve()), "layout": ds.layout, "counts": ds.counts(),
                         "options": options.to_dict(), "skipped": len(ds.skipped)},
        }
        bundle = w.commit(manifest)
    lap("finish")
    timings["backbone_images"] = cache.misses
    return AnomalyFitResult(bundle, metrics, report, ds, timings)


def export_anomaly_bundle(run: str | Path, out: str | Path, *, target: str | None = None,
                          precision: str | None = None, runtime: str | None = None, data: str | Path | None = None,
                          allow_drop: bool = False, cache_dir: str | Path | None = None, force: bool = False,
                          quiet: bool = False, signer=None) -> AnomalyFitResult:
    """Re-make anomaly bundle ``run`` for another target / precision / runtime from its recorded
    recipe (data, head settings, seed); cached patch features make the FP32 side free.

    Raises:
        BundleError: ``run`` does not record how it was fitted.  DataError: its data moved (pass ``data``).
    """
    src = load_bundle(run)
    recorded = dict((src.manifest.get("training") or {}).get("options") or {})
    if src.task != "anomaly" or "head" not in recorded:
        raise BundleError(f"{run}: this bundle does not record how it was fitted; run edgetl fit instead")
    head = AnomalyConfig.from_dict(recorded.pop("head"))
    fields = {f.name for f in dataclasses.fields(AnomalyOptions)}
    opts = AnomalyOptions(head=head, **{k: v for k, v in recorded.items() if k in fields})
    from .export import retargeted

    opts, data_path = retargeted(opts, src.manifest["training"]["data"], target=target, precision=precision,
                                 runtime=runtime, data=data, allow_drop=allow_drop, cache_dir=cache_dir, quiet=quiet)
    return fit_anomaly(data_path, out, options=opts, force=force, signer=signer)


def _model_files(path: Path) -> list[Path]:
    return [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]


# =============================================================================== device side
@dataclass
class AnomalyPrediction:
    """One image's answer: ``score`` is raw, ``normalised`` is score / threshold (>= 1 means defect)."""

    path: str
    label: str
    score: float
    threshold: float
    normalised: float
    peak: tuple[int, int] = (0, 0)  # (row, col) of the map maximum, in map pixels

    def to_dict(self) -> dict:
        return {"path": self.path, "label": self.label, "score": round(self.score, 6),
                "threshold": round(self.threshold, 6), "normalised": round(self.normalised, 6),
                "peak": list(self.peak)}


class AnomalyPredictor:
    """An anomaly bundle ready to score images: the fused model (backbone + scoring graph) or,
    with ``fused=False``, the backbone + the numpy head (same numbers; what ``adapt`` uses).

    Example:
        >>> p = AnomalyPredictor("parts.bundle")  # doctest: +SKIP
        >>> [(r.label, r.normalised) for r in p.predict(["a.png"])]  # doctest: +SKIP
    """

    def __init__(self, bundle: Bundle | str | Path, *, device: str | None = None, threads: int | None = None,
                 head_version: int | None = None, fused: bool = True):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        if self.bundle.task != "anomaly":
            raise BundleError(f"{self.bundle.path}: a {self.bundle.task!r} bundle, not an anomaly bundle")
        self.preprocess = self.bundle.preprocess
        entry = self.bundle.head_entry(head_version)
        self.version = int(entry["version"])
        self.threshold = float(entry.get("threshold", self.bundle.manifest.get("thresholds", {}).get("anomaly", 1.0)))
        self.shape = tuple(self.bundle.manifest["backbone"]["feature_shape"])
        self.fused = fused
        self._head: AnomalyHead | None = None
        if fused:
            name = entry.get("fused") or self.bundle.manifest["models"]["fused"]
            self.session = open_bundle_model(self.bundle, self.bundle.path / name, device=device, threads=threads)
        else:
            self.session = open_backbone(self.bundle, device=device, threads=threads)
            self._head = AnomalyHead.load(self.bundle.path / entry["file"])

    @property
    def head(self) -> AnomalyHead:
        if self._head is None:
            self._head = AnomalyHead.load(self.bundle.path / self.bundle.head_entry(self.version)["file"])
        return self._head

    def maps(self, paths: Sequence[Path], *, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """Raw (maps (N, S, S), scores (N,)) of image files.

        Raises:
            DataError: an unreadable image.
        """
        maps, scores = [], []
        for i in range(0, len(paths), batch_size):
            x = np.stack([load_input(Path(p), self.preprocess) for p in paths[i : i + batch_size]])
            if self.fused:
                m, s = self.session.run(x)[:2]
            else:
                F = self.session(x).reshape(len(x), *self.shape)
                m, s = self.head.maps(F)
            maps.append(m)
            scores.append(s)
        S = self.preprocess.input_size
        if not maps:
            return np.zeros((0, S, S), np.float32), np.zeros(0, np.float32)
        return np.concatenate(maps), np.concatenate(scores).reshape(-1)

    def predict(self, paths: Sequence[str | Path], *, threshold: float | None = None,
                heatmaps: str | Path | None = None, skipped: list | None = None) -> list[AnomalyPrediction]:
        """Score image files (folders expanded); optionally write heat-map overlays to ``heatmaps``.

        Unreadable files raise :class:`DataError`, or, with a ``skipped`` list, are recorded there
        as ``(path, reason)`` and left out.
        """
        from .data import check_image, list_images

        files = list_images(list(paths))
        thr = self.threshold if threshold is None else float(threshold)
        if not (math.isfinite(thr) and thr > 0):
            raise ConfigError(f"threshold {thr!r}: a defect score cut must be a finite number > 0")
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
        for i in range(0, len(files), 8):
            chunk = files[i : i + 8]
            maps, scores = self.maps(chunk)
            for path, m, s in zip(chunk, maps, scores):
                peak = np.unravel_index(int(np.argmax(m)), m.shape)
                out.append(AnomalyPrediction(str(path), "defect" if s >= thr else "good", float(s), thr,
                                             float(s / thr), (int(peak[0]), int(peak[1]))))
                if heatmaps is not None:
                    save_overlay(path, m / thr, Path(heatmaps), self.preprocess, taken)
        return out

    def evaluate(self, data: str | Path, *, threshold: float | None = None, strict: bool = False) -> dict:
        """Image/pixel AUROC and counts at the bundle's threshold on a labelled test set.

        ``data`` is an MVTec-style folder (``test/good``, ``test/<defect>``, ``ground_truth``) or a
        folder of ``good``/``<defect>`` sub-folders.

        Raises:
            DataError: no labelled images found.
        """
        root = Path(data)
        base = root / "test" if (root / "test").is_dir() else root
        skipped: list = []
        samples: list[Sample] = []
        masks: dict[str, Path] = {}
        if not base.is_dir():
            raise DataError(f"{data}: no such folder")
        for kind_dir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            got = _images_in(kind_dir, kind_dir.name, skipped, strict=strict)
            samples += got
            gt = root / "ground_truth" / kind_dir.name
            for s in got:
                for cand in (gt / f"{s.path.stem}_mask.png", gt / f"{s.path.stem}.png"):
                    if cand.is_file():
                        masks[str(s.path)] = cand
                        break
        if not samples:
            raise DataError(f"{data}: no labelled images; expected {base}/good/ and {base}/<defect>/ folders")
        maps, scores = self.maps([s.path for s in samples])
        thr = self.threshold if threshold is None else float(threshold)
        y = np.array([s.label != "good" for s in samples], bool)
        mk = [load_mask(masks.get(str(s.path)), self.preprocess) if y[i] else None for i, s in enumerate(samples)]
        m = detection_metrics(y, scores, thr, maps=maps, masks=mk)
        per_kind = {}
        for kind in sorted({s.label for s in samples} - {"good"}):
            sel = np.array([s.label in ("good", kind) for s in samples])
            per_kind[kind] = _round(auroc(y[sel], scores[sel]))
        m.update(per_defect_auroc=per_kind, head_version=self.version,
                 skipped=[{"path": str(p), "reason": r} for p, r in skipped])
        return m


# ----- heat-map overlays ----------------------------------------------------------------------
_JET = np.array([[0, 0, 0.5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0.5, 0, 0]], np.float32)


def colormap(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> (..., 3) uint8 RGB along a jet-like ramp (blue = low, red = high)."""
    v = np.clip(np.asarray(v, np.float32), 0, 1) * (len(_JET) - 1)
    i = np.minimum(v.astype(np.int64), len(_JET) - 2)
    w = (v - i)[..., None]
    return np.round(255 * ((1 - w) * _JET[i] + w * _JET[i + 1])).astype(np.uint8)


def overlay(image: Image.Image, norm_map: np.ndarray, *, vmax: float = 1.5) -> Image.Image:
    """Blend a normalised map (1.0 = threshold) over an image of the same size: colour shows the
    score (red from the threshold up), opacity grows with it, so good areas stay readable."""
    v = np.clip(norm_map / vmax, 0, 1)
    heat = colormap(v).astype(np.float32)
    alpha = (0.25 + 0.5 * v)[..., None]
    base = np.asarray(image.convert("RGB"), np.float32)
    return Image.fromarray(np.round((1 - alpha) * base + alpha * heat).astype(np.uint8), "RGB")


def save_overlay(path: Path, norm_map: np.ndarray, out_dir: Path, pre: PreprocessConfig,
                 taken: set[str] | None = None) -> Path:
    """Write ``<out_dir>/<stem>_heatmap.png``: the image as the model saw it, with the map on top.

    ``taken`` holds the names already written in this run: a second input with the same stem (from
    another folder) gets ``<stem>_1_heatmap.png``; a file left by an earlier run is overwritten.
    """
    from .preprocess import load_rgb

    out_dir.mkdir(parents=True, exist_ok=True)
    seen = resize_crop(load_rgb(path), pre)
    taken = set() if taken is None else taken
    name, k = f"{Path(path).stem}_heatmap.png", 1
    while name in taken:
        name, k = f"{Path(path).stem}_{k}_heatmap.png", k + 1
    taken.add(name)
    overlay(seen, norm_map).save(out_dir / name)
    return out_dir / name


# ----- thresholds and on-device updates --------------------------------------------------------
@dataclass
class AnomalyAdaptResult:
    """What :func:`adapt_anomaly` did."""

    bundle: Bundle
    version: int
    images: int
    before: dict  # the new images' scores under the previous version
    after: dict
    memory: dict
    timings: dict
    accepted: bool = True  # False: a dry run, nothing written

    def to_dict(self) -> dict:
        return {"bundle": str(self.bundle.path), "task": "anomaly", "version": self.version, "images": self.images,
                "new_images_before": self.before, "new_images_after": self.after, "memory": self.memory,
                "timings_s": self.timings, "accepted": self.accepted}


def write_fused_anomaly(b: Bundle, head: AnomalyHead, version: int, threshold: float) -> str:
    """(Re)generate the fused model (backbone + scoring graph) of ``head`` inside bundle ``b``;
    returns its file name (staged and renamed, see :func:`edgetl.adapt.write_fused`)."""
    from .anomaly_export import fuse_anomaly

    meta = {"task": "anomaly", "backbone": b.manifest["backbone"]["name"],
            "preprocess": b.manifest["backbone"]["preprocess"], "precision": b.precision, "head": head.kind,
            "head_version": version, "threshold": threshold}
    return write_fused(b, version, lambda staging: fuse_anomaly(b.model_file("backbone"), head, staging, meta=meta))


def adapt_anomaly(bundle: Bundle | str | Path, data: str | Path, *, threshold: float | None = None,
                  strict: bool = False, quiet: bool = True, dry_run: bool = False, wait: float = 0.0,
                  signer=None) -> AnomalyAdaptResult:
    """Teach a deployed anomaly bundle newly confirmed good images, on the device.

    The images go through the bundle's own backbone; the head learns them (patchcore: the bank
    grows by a coreset of the new patches, never past ``max_memory``; padim: the moments are merged
    exactly); ``heads/vN.npz`` and ``model-vN.*`` are written, and one atomic manifest switch makes
    version N current. The threshold carries over (pass ``threshold`` to change it): adding good
    images only moves good scores down, so the old cut stays conservative. ``dry_run`` computes
    the before/after scores and writes nothing.

    Raises:
        DataError: no good images under ``data``.  BundleError: not an anomaly bundle or read-only.
        BundleBusy: another process is writing the bundle.
    """
    with for_update(bundle, operation="adapt", dry_run=dry_run, wait=wait) as b:
        return _adapt_anomaly(b, data, threshold=threshold, strict=strict, quiet=quiet, dry_run=dry_run,
                              signer=signer)


def _adapt_anomaly(b: Bundle, data, *, threshold, strict, quiet, dry_run, signer) -> AnomalyAdaptResult:
    t0 = time.perf_counter()
    if b.task != "anomaly":
        raise BundleError(f"{b.path}: a {b.task!r} bundle; adapt_anomaly needs an anomaly bundle")
    root = Path(data)
    skipped: list = []
    folder = next((f for f in (root / "train" / "good", root / "good") if f.is_dir()), root)
    if not folder.is_dir():
        raise DataError(f"{data}: no such folder of good images")
    samples = _images_in(folder, "good", skipped, strict=strict)
    if not samples:
        raise DataError(f"{data}: no readable good images to learn from")
    pred = AnomalyPredictor(b, fused=False)
    head = pred.head
    paths = [s.path for s in samples]
    F = extract_patch_features(paths, session=pred.session, preprocess=pred.preprocess, shape=pred.shape,
                               digests=[s.digest for s in samples], quiet=quiet, desc="adapt")
    _, before = head.maps(F)
    new_head = update_head(head, F)
    _, after = new_head.maps(F)
    thr = pred.threshold if threshold is None else float(threshold)
    if thr <= 0:
        raise ConfigError(f"threshold must be > 0, got {thr}")
    summary = lambda s: {"max": round(float(s.max()), 4), "mean": round(float(s.mean()), 4),  # noqa: E731
                         "over_threshold": int(np.sum(s >= thr))}
    if new_head.kind == "patchcore":
        memory = {"patches": new_head.memory_size, "max_memory": new_head.config.max_memory}
    else:
        memory = {"images": _count(new_head.arrays)}
    if dry_run:
        return AnomalyAdaptResult(b, pred.version, len(samples), summary(before), summary(after), memory,
                                  {"total": round(time.perf_counter() - t0, 3)}, accepted=False)
    version = max(e["version"] for e in b.manifest["head"]["versions"]) + 1
    head_file = f"heads/v{version}.npz"
    new_head.meta = dict(new_head.meta, parent_version=pred.version)
    with new_version_files(b, [head_file, *fused_files(fused_name(b, version))]):
        new_head.save(b.path / head_file)
        fused = write_fused_anomaly(b, new_head, version, thr)
    entry = {"version": version, "file": head_file, "kind": new_head.kind, "labels": LABELS, "source": "adapt",
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "fused": fused, "threshold": thr,
             "threshold_policy": "carried over" if threshold is None else "given", "images": new_head.meta.get("images"),
             "new_images": len(samples), "parent": pred.version}
    # Fused models of older versions are pruned (a padim one is ~13 MB); rollback regenerates them.
    versions, drop = with_new_version(b, entry)
    new = switch_version(b, {"head": {"current": version, "versions": versions},
                             "models": {**b.manifest["models"], "fused": fused},
                             "thresholds": {**b.manifest.get("thresholds", {}), "anomaly": thr}},
                         add=[head_file, *fused_files(fused)], drop=drop, signer=signer, operation="adapt",
                         new_version=entry)
    return AnomalyAdaptResult(new, version, len(samples), summary(before), summary(after), memory,
                              {"total": round(time.perf_counter() - t0, 3)})


# =============================================================================== CLI helpers
def is_anomaly_layout(data: str | Path) -> bool:
    """A folder whose only class is ``good`` (``DATA/train/good`` or ``DATA/good``): one-class data."""
    root = Path(data)
    for base in (root / "train", root):
        if base.is_dir() and (base / "good").is_dir():
            others = [p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and p.name not in ("good", "test", "ground_truth", "val")]
            return not others
    return False


def wants_anomaly(data: str | Path, task: str | None, head_kind: str | None) -> bool:
    """Whether ``fit`` should run the anomaly pipeline (explicit ``--task anomaly``, an anomaly head,
    or good-only data with no task given).

    Raises:
        ConfigError: a head of the other task was named.
    """
    if task == "anomaly":
        if head_kind not in (None, *HEAD_KINDS):
            raise ConfigError(f"--head {head_kind} is a classification head; --task anomaly takes {' or '.join(HEAD_KINDS)}")
        return True
    if head_kind in HEAD_KINDS:
        if task not in (None, "anomaly"):
            raise ConfigError(f"--head {head_kind} is an anomaly head; use it with --task anomaly")
        return True
    return task is None and is_anomaly_layout(data)


def is_anomaly_bundle_path(path: str | Path) -> bool:
    """True when ``path`` holds a bundle whose manifest says task = anomaly (not verified here)."""
    from .bundle import read_manifest

    try:
        return read_manifest(Path(path)).get("task") == "anomaly"
    except Exception:  # not a bundle: the caller's normal path reports that properly
        return False


def fit_summary(result: AnomalyFitResult) -> dict:
    r = result.report
    return {"bundle": str(result.bundle.path), "task": "anomaly", "head": r["head"], "counts": result.data.counts(),
            "skipped": [{"path": str(p), "reason": why} for p, why in result.data.skipped],
            "eval_set": r["eval_set"], "metrics": r["metrics"], "target": r["target"], "precision": r["precision"],
            "runtime": r["runtime"], "reference": r["reference"], "gate": r["gate"], "fused_parity": r["fused_parity"],
            "latency_batch1": r["latency_batch1"], "size": r["size"], "timings_s": result.timings}


def _fmt(v, pct: bool = False) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if not pct else f"{v:.1%}")


def fit_text(result: AnomalyFitResult) -> str:
    r, m = result.report, result.report["metrics"]
    c = result.data.counts()
    tests = ", ".join(f"{k[5:]} {v}" for k, v in c.items() if k.startswith("test_"))
    lines = [f"bundle    {result.bundle.path}  ({r['target']}: {r['precision']} on {r['runtime']}, head {r['head']})",
             f"data      {c['train_good']} good training images" + (f"; test: {tests}" if tests else
                                                                        f"; {c['val_good']} good held out")]
    lines.append(f"{r['eval_set']:<9} image AUROC {_fmt(m['image_auroc'])}, pixel AUROC {_fmt(m['pixel_auroc'])}, "
                 f"F1 {_fmt(m['f1'])} at threshold {m['threshold']:.4g} ({m['threshold_policy']})")
    from .report import gate_lines

    lines += gate_lines(r, "patch-feature cosine", r["reference"].get("patch_feature_cosine_mean"))
    lines.append(f"model     {r['size']['bundle_bytes'] / 1e6:.1f} MB bundle, fused model batch-1 latency "
                 f"{r['latency_batch1']['fused']['p50_ms']:.1f} ms (p50, this machine); fused vs numpy: "
                 f"score rel. diff {r['fused_parity']['max_rel_score_diff']:.1e}")
    return "\n".join(lines)


def predict_text(preds: list[AnomalyPrediction]) -> str:
    from .cli import safe

    return "\n".join(f"{safe(p.path)}\t{p.label}\tscore {p.score:.4g}\tthreshold {p.threshold:.4g}\t({p.normalised:.2f}x)"
                     for p in preds)


def eval_text(m: dict, *, title: str = "") -> str:
    c = m["confusion"]
    lines = [title] if title else []
    lines += [f"image AUROC  {_fmt(m['image_auroc'])}  ({m['n_good']} good, {m['n_defect']} defect images)",
              f"pixel AUROC  {_fmt(m['pixel_auroc'])}" + (f"  (map peak inside the defect in {_fmt(m.get('peak_in_mask'), True)})"
                                                          if m.get("peak_in_mask") is not None else ""),
              f"threshold    {m['threshold']:.4g}: precision {_fmt(m['precision'])}, recall {_fmt(m['recall'])}, "
              f"F1 {_fmt(m['f1'])}  (tp {c['tp']}, fp {c['fp']}, fn {c['fn']}, tn {c['tn']})"]
    for kind, v in m.get("per_defect_auroc", {}).items():
        lines.append(f"  {kind:<14} AUROC {_fmt(v)}")
    return "\n".join(lines)


def rollback_anomaly(bundle: Bundle | str | Path, *, to: int | None = None) -> Bundle:
    """Make an earlier head version of an anomaly bundle current again, with its own threshold
    (default: the version before the current one); see :func:`edgetl.adapt.rollback`.

    Raises:
        BundleError: not an anomaly bundle, no such version, nothing to roll back to.
    """
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    if b.task != "anomaly":
        raise BundleError(f"{b.path}: a {b.task!r} bundle, not an anomaly bundle")
    return rollback(b, to=to)
