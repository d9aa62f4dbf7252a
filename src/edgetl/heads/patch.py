"""One-class heads on patch features: trained on good images only, they score every patch.

Input: the frozen backbone cut after its stride-4 and stride-8 stages (each stage 3x3-averaged,
brought to one grid and concatenated; EfficientNet-Lite0 at 224 px gives 24 + 40 = 64 channels on
a 28 x 28 grid), converted for the target like any backbone.

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
numpy and the exported graph (:mod:`edgetl.heads.patch_graph`) compute it with the same two
MatMuls. The image score is the map's maximum. numpy only: heads are updated on the device.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Protocol

import numpy as np

from ..core.bundle import write_npz_durably
from ..errors import BundleError, ConfigError, DataError
from . import registry

PATCH_KINDS = registry.names("patch")
COVARIANCES = ("position", "shared")
_FORMAT = "edgetl-anomaly-head"
_FORMAT_VERSION = 1
# Greedy coreset selection costs one pass over its candidates per chosen row: above this many
# patches (60 images of 28 x 28 patches are 47,040; tiled megapixel frames give millions) it chooses
# from a seeded random subset of this size. The bank's worst-case gap then holds for the subset only.
MAX_CORESET_ROWS = 150_000
# The JSON header of a head .npz: its format, kind and settings (no pickles).
HEADER_KEY = "__header__"


# =============================================================================== configuration
# Whether a tiled bundle scores a whole-frame view beside its tiles (see tasks/anomaly/tiles.py).
OVERVIEW_MODES = ("auto", "on", "off")


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
        defect_size: the smallest defect to find, in frame pixels (None: the task's default); with
            the frame size it decides whether and how large frames are tiled
            (:mod:`edgetl.tasks.anomaly.tiles`).
        overview: tiled frames only: a whole-frame view scored beside the tiles. ``auto``: only
            where labelled anomalies show it better beyond noise; ``on`` / ``off``: always / never.
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
    defect_size: float | None = None
    overview: str = "auto"

    def __post_init__(self) -> None:
        if self.overview not in OVERVIEW_MODES:
            raise ConfigError(f"overview {self.overview!r} is not one of {', '.join(OVERVIEW_MODES)}")
        if self.defect_size is not None and not (
            isinstance(self.defect_size, (int, float)) and 0 < self.defect_size < 10_000
        ):
            raise ConfigError(f"defect_size {self.defect_size!r}: give the smallest defect's size in pixels (> 0)")
        if not registry.known(self.kind, "patch"):
            raise ConfigError(f"anomaly head {self.kind!r} is not one of {', '.join(registry.names('patch'))}")
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
    def from_dict(cls, d: dict) -> AnomalyConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"anomaly head config must be a mapping, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(
                f"option(s) {', '.join(unknown)} do not apply to anomaly heads; theirs are {', '.join(known)}"
            )
        d = dict(d)
        if "reductions" in d:
            d["reductions"] = tuple(int(r) for r in d["reductions"])
        return cls(**d)


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
        return registry.get(self.kind, "patch").memory_size(self)

    # ---- scoring (the numpy reference the exported graph must equal) ----------------------
    def patch_scores(self, F: np.ndarray, *, chunk: int = 8) -> np.ndarray:
        """(N, C, H, W) features -> (N, H, W) float32 patch scores (distances)."""
        F = self._check(F)
        out = [self._patch_scores(F[i : i + chunk]) for i in range(0, len(F), chunk)]
        return np.concatenate(out) if out else np.zeros((0, *self.grid), np.float32)

    def _patch_scores(self, F: np.ndarray) -> np.ndarray:
        N = F.shape[0]
        H, W = self.grid
        d2 = registry.get(self.kind, "patch").patch_d2(self, F)  # (N, P)
        return np.sqrt(np.maximum(d2, np.float32(0))).reshape(N, H, W).astype(np.float32, copy=False)

    def knn_constants(self) -> tuple[np.ndarray, np.ndarray]:
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
            raise DataError(
                f"anomaly head expects patch features of shape (N, {', '.join(map(str, want))}), got {F.shape}"
            )
        return F

    def graph(self, opset: int = 18, ir_version: int | None = None):
        """The scoring graph fused behind the patch backbone (see :mod:`edgetl.heads.patch_graph`)."""
        from .patch_graph import scoring_graph

        return scoring_graph(self, opset=opset, ir_version=ir_version)

    # ---- persistence ---------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """An uncompressed ``.npz`` (atomic write); settings travel as JSON bytes, never pickles."""
        path = Path(path)
        header = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "kind": self.kind,
            "config": self.config.to_dict(),
            "grid": list(self.grid),
            "channels_in": self.channels_in,
            "size": self.size,
            "meta": self.meta,
        }
        payload = {k: np.asarray(v, order="C") for k, v in self.arrays.items()}  # keeps 0-d arrays 0-d
        if "m2" in payload:  # symmetric (P, d, d): the upper triangle is enough, half the bytes
            m2 = payload.pop("m2")
            rows, cols = np.triu_indices(m2.shape[-1])
            payload["m2_triu"] = m2[:, rows, cols]
        payload[HEADER_KEY] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
        write_npz_durably(path, **payload)

    @classmethod
    def load(cls, path: str | Path | IO[bytes]) -> AnomalyHead:
        """Read a head written by :meth:`save` (``allow_pickle=False``).

        Raises:
            BundleError: missing, unreadable or not an anomaly head.
        """
        path = Path(path) if isinstance(path, str) else path  # a path, or a bundle's verified bytes
        raw, header = read_head_file(path)
        if "m2_triu" in raw:
            packed = raw.pop("m2_triu")
            d = int(round((math.sqrt(8 * packed.shape[-1] + 1) - 1) / 2))
            m2 = np.zeros((packed.shape[0], d, d), packed.dtype)
            iu = np.triu_indices(d)
            m2[:, iu[0], iu[1]] = packed
            m2[:, iu[1], iu[0]] = packed
            raw["m2"] = m2
        if header.get("format") != _FORMAT:
            raise BundleError(f"{path}: not an edgetl anomaly head")
        if header.get("version") != _FORMAT_VERSION:
            raise BundleError(
                f"{path}: anomaly head format {header.get('version')}; this edgetl reads {_FORMAT_VERSION}"
            )
        need = {"patchcore": {"memory"}, "padim": {"channels", "mean", "m2", "count"}}.get(str(header.get("kind")))
        if need is None or not need <= set(raw):
            missing = sorted((need or set()) - set(raw))
            raise BundleError(f"{path}: anomaly head of kind {header.get('kind')!r} lacks arrays {missing}")
        return cls(
            header["kind"],
            AnomalyConfig.from_dict(header["config"]),
            tuple(header["grid"]),
            int(header["channels_in"]),
            int(header["size"]),
            raw,
            header.get("meta", {}),
        )


def read_head_file(path: Path | IO[bytes]) -> tuple[dict, dict]:
    """(arrays, JSON header) of a head ``.npz``; its header is ``{}`` when it has none.

    Raises:
        BundleError: missing or unreadable.
    """
    if not isinstance(path, (str, Path)):  # verified bytes: read from the start, however often
        path.seek(0)
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise BundleError(f"{path}: no such head file") from None
    except Exception as exc:  # zip errors, pickle refusal, truncation
        raise BundleError(f"{path}: cannot read head ({type(exc).__name__}: {exc})") from None
    blob = raw.pop(HEADER_KEY, None)
    try:
        header = json.loads(blob.tobytes().decode()) if blob is not None else {}
    except (UnicodeDecodeError, ValueError):
        header = {}
    return raw, header if isinstance(header, dict) else {}


def maps_from_patches(S: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, h, w) patch scores -> (maps (N, size, size), max of each map): ``A @ S @ A.T`` in float32."""
    maps = (A @ S.astype(np.float32)) @ A.T
    return maps, maps.reshape(len(maps), -1).max(axis=1) if len(maps) else np.zeros(0, np.float32)


def patch_rows(F: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N * H * W, C) rows, image-major."""
    N, C, H, W = F.shape
    return np.ascontiguousarray(F.reshape(N, C, H * W).transpose(0, 2, 1).reshape(-1, C), dtype=np.float32)


# ----- patchcore ------------------------------------------------------------------------------
def greedy_coreset(
    X: np.ndarray, n: int, *, seed: int = 0, projection: int = 128, centres: np.ndarray | None = None
) -> np.ndarray:
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


def coreset_size(n_patches: int, cfg: AnomalyConfig) -> int:
    return max(1, min(cfg.max_memory, int(math.ceil(cfg.coreset_ratio * n_patches))))


def fit_patchcore(F: np.ndarray, cfg: AnomalyConfig, *, size: int) -> AnomalyHead:
    """A PatchCore memory bank from good images' patch features (N, C, H, W)."""
    return patchcore_with_sources(F, cfg, size=size)[0]


def patchcore_with_sources(F: np.ndarray, cfg: AnomalyConfig, *, size: int) -> tuple[AnomalyHead, np.ndarray]:
    """:func:`fit_patchcore` and, per memory row, the index of the image it came from (what
    leave-one-image-out scoring of the training images needs)."""
    X = patch_rows(F)
    pool = np.arange(len(X))
    if len(X) > MAX_CORESET_ROWS:  # tiled megapixel frames: a seeded subset, or greedy selection takes minutes
        pool = np.sort(np.random.default_rng(cfg.seed).choice(len(X), MAX_CORESET_ROWS, replace=False))
    idx = pool[greedy_coreset(X[pool], coreset_size(len(X), cfg), seed=cfg.seed, projection=cfg.projection)]
    head = AnomalyHead(
        "patchcore",
        cfg,
        tuple(F.shape[2:]),
        int(F.shape[1]),
        size,
        {"memory": X[idx]},
        {"images": int(len(F)), "patches_seen": int(len(X))},
    )
    return head, idx // (F.shape[2] * F.shape[3])


def _update_patchcore(head: AnomalyHead, F: np.ndarray) -> AnomalyHead:
    """New good images -> a bank that also covers their patches, never larger than ``max_memory``.

    New patches join by continuing the greedy selection from the current bank (``coreset_ratio``
    of the new patches); when that would exceed ``max_memory``, a coreset of the bank plus the new
    patches is selected afresh at ``max_memory``.
    """
    cfg = head.config
    old = head.arrays["memory"].astype(np.float32)
    X = patch_rows(F)
    add = int(math.ceil(cfg.coreset_ratio * len(X)))
    if len(old) + add <= cfg.max_memory:
        idx = greedy_coreset(X, add, seed=cfg.seed, projection=cfg.projection, centres=old)
        memory = np.concatenate([old, X[idx]])
    else:
        pool = np.concatenate([old, X])
        memory = pool[greedy_coreset(pool, cfg.max_memory, seed=cfg.seed, projection=cfg.projection)]
    meta = dict(
        head.meta, images=head.meta.get("images", 0) + len(F), patches_seen=head.meta.get("patches_seen", 0) + len(X)
    )
    return dataclasses.replace(head, arrays={"memory": memory}, meta=meta, _cache={})


# ----- padim ----------------------------------------------------------------------------------
def _channel_subset(C: int, cfg: AnomalyConfig) -> np.ndarray:
    if cfg.padim_dims >= C:
        return np.arange(C, dtype=np.int64)
    return np.sort(np.random.default_rng(cfg.seed).choice(C, cfg.padim_dims, replace=False)).astype(np.int64)


def padim_moments(F: np.ndarray, channels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per position: mean (P, d) and scatter sum (P, d, d) of (N, C, H, W) features, float64."""
    N, _, H, W = F.shape
    X = F[:, channels].reshape(N, len(channels), H * W).transpose(2, 0, 1).astype(np.float64)  # (P, N, d)
    mean = X.mean(axis=1)
    Z = X - mean[:, None, :]
    m2 = Z.transpose(0, 2, 1) @ Z
    return mean, 0.5 * (m2 + m2.transpose(0, 2, 1)), N  # exactly symmetric: saved as a triangle


def merge_moments(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.'s parallel update: moments of A and B -> moments of A u B, exactly."""
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + (n_a * n_b / n) * (delta[..., :, None] * delta[..., None, :])
    return mean, m2, n


def fit_padim(F: np.ndarray, cfg: AnomalyConfig, *, size: int) -> AnomalyHead:
    """PaDiM statistics from good images' patch features (N, C, H, W)."""
    channels = _channel_subset(int(F.shape[1]), cfg)
    mean, m2, n = padim_moments(F, channels)
    arrays = {
        "channels": channels,
        "mean": mean.astype(np.float32),
        "m2": m2.astype(np.float32),
        "count": np.asarray(n, np.int64),
    }
    return AnomalyHead("padim", cfg, tuple(F.shape[2:]), int(F.shape[1]), size, arrays, {"images": int(n)})


def image_count(arrays: dict) -> int:
    """The number of images a padim head's moments summarise."""
    return int(np.asarray(arrays["count"]).reshape(-1)[0])


def _update_padim(head: AnomalyHead, F: np.ndarray) -> AnomalyHead:
    """New good images merged into the stored moments: same result as fitting on all images."""
    a = head.arrays
    mean_b, m2_b, n_b = padim_moments(F, a["channels"].astype(np.int64))
    mean, m2, n = merge_moments(
        a["mean"].astype(np.float64), a["m2"].astype(np.float64), image_count(a), mean_b, m2_b, n_b
    )
    arrays = {
        "channels": a["channels"],
        "mean": mean.astype(np.float32),
        "m2": m2.astype(np.float32),
        "count": np.asarray(n, np.int64),
    }
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
    n = image_count(arrays)
    d = mean.shape[1]
    r = cfg.neighbourhood
    if r > 0:
        # Each position's Gaussian pools the (2r+1)^2 positions around it (edges replicated):
        # the moments of that union, merged exactly.
        mg = np.pad(mean.reshape(H, W, d), ((r, r), (r, r), (0, 0)), mode="edge")
        sg = np.pad(m2.reshape(H, W, d, d), ((r, r), (r, r), (0, 0), (0, 0)), mode="edge")
        offs = [(i, j) for i in range(2 * r + 1) for j in range(2 * r + 1)]
        pooled_mean = np.asarray(sum(mg[i : i + H, j : j + W] for i, j in offs)) / len(offs)
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


def fit_patch_head(F: np.ndarray, cfg: AnomalyConfig, *, size: int) -> AnomalyHead:
    """Fit ``cfg.kind`` on good images' patch features (N, C, H, W).

    Raises:
        DataError: no images, or features that are not (N, C, H, W).
    """
    F = np.asarray(F, np.float32)
    if F.ndim != 4 or len(F) == 0:
        raise DataError(f"anomaly heads need patch features (N, C, H, W) of >= 1 good image, got {F.shape}")
    return registry.get(cfg.kind, "patch").fit(F, cfg, size=size)


def update_patch_head(head: AnomalyHead, F: np.ndarray) -> AnomalyHead:
    """``head`` after also learning the good images with features ``F``; memory stays bounded."""
    F = head._check(F)
    return registry.get(head.kind, "patch").update(head, F)


class ThresholdRule(Protocol):
    """What the good-only threshold reads from a head's config (patch and defect configs both have it)."""

    @property
    def quantile(self) -> float: ...

    @property
    def margin(self) -> float: ...


def quantile_threshold(good_scores: np.ndarray, cfg: ThresholdRule) -> float:
    """Good-only rule: the ``quantile`` of held-out good scores times ``margin``."""
    return float(np.quantile(np.asarray(good_scores, np.float64), cfg.quantile) * cfg.margin)
