"""One-class heads on whole images: good images' pooled backbone features in, one distance out.

Patch heads (:mod:`edgetl.heads.patch`) look for something local that no good image has; they
are blind to the wrong part altogether (another variant, a missing component) when every patch of
it looks like some patch of a good part. These heads read the backbone's pooled features (the
1280-d vector a classifier would read; the frozen network's summary of the whole image) instead:

``knn``
    A memory of good images' pooled features, at most ``max_images`` rows (a greedy k-centre
    coreset beyond that, as patchcore thins its patch bank); an image's score is its mean
    Euclidean distance to its ``k`` nearest rows (k = 2: the nearest-neighbour one-class rule of
    Bergman et al. 2020, which needs no training).
``gaussian``
    One Gaussian of the good images' pooled features; an image's score is its Mahalanobis
    distance under the covariance shrunk by the Oracle Approximating Shrinkage rule (the same as
    padim's: 1280 dimensions from tens of images is far from invertible without it). Its arrays
    are the mean and the scatter sum, so new good images merge in exactly on the device.

No heat map: the score is about the whole image. numpy only, and the graph
(:func:`image_scores_nodes`) computes the same numbers op for op.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import ConfigError, DataError
from . import registry
from .heldout import FOLDS
from .patch import oas_shrink

IMAGE_KINDS = registry.names("image")


@dataclass(frozen=True)
class ImageConfig:
    """How an image-level head is built.

    Attributes:
        kind: ``knn`` or ``gaussian``.
        k: knn: neighbours averaged into the score.
        max_images: knn: upper bound on the memory (bounds model size and cost per image).
        projection: knn: coreset distances on a seeded random projection to this many dimensions.
        seed: seeds the coreset.
    """

    kind: str = "knn"
    k: int = 2
    max_images: int = 2000
    projection: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if not registry.known(self.kind, "image"):
            raise ConfigError(f"image head {self.kind!r} is not one of {', '.join(registry.names('image'))}")
        if self.k < 1 or self.max_images < 1 or self.projection < 1:
            raise ConfigError("k, max_images and projection must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ImageConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"option(s) {', '.join(unknown)} do not apply to image heads; theirs are {', '.join(sorted(known))}"
            )
        return cls(**d)


@dataclass
class ImageHead:
    """A fitted image-level head. ``arrays``: knn: ``memory`` (K, D); gaussian: ``mean`` (D,),
    ``m2`` (D, D) scatter sum and ``count``. Derived constants are rebuilt on load."""

    config: ImageConfig
    dims: int
    arrays: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def memory_size(self) -> int:
        return registry.get(self.kind, "image").memory_size(self)

    @property
    def images(self) -> int:
        return registry.get(self.kind, "image").images(self)

    def constants(self) -> dict[str, np.ndarray]:
        """float32 constants of the scoring: knn: -2 M^T, sum(M*M), k; gaussian: mean, inverse covariance."""
        if "c" not in self._cache:
            self._cache["c"] = registry.get(self.kind, "image").constants(self)
        return self._cache["c"]

    def scores(self, Z: np.ndarray) -> np.ndarray:
        """(N, D) pooled features -> (N,) float32 distances."""
        Z = self.check(Z)
        return registry.get(self.kind, "image").scores(self, Z, self.constants())

    def check(self, Z: np.ndarray) -> np.ndarray:
        Z = np.asarray(Z, np.float32)
        if Z.ndim != 2 or Z.shape[1] != self.dims:
            raise DataError(f"image head expects pooled features of shape (N, {self.dims}), got {Z.shape}")
        return Z


def gaussian_params(arrays: dict) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), shrunk inverse covariance (D, D)) as float32 from the stored moments."""
    mean = arrays["mean"].astype(np.float64)
    n = int(np.asarray(arrays["count"]).reshape(-1)[0])
    cov = arrays["m2"].astype(np.float64) / max(n - 1, 1)
    cov, _ = oas_shrink(cov, n)
    inv = np.linalg.inv(cov)
    return mean.astype(np.float32), (0.5 * (inv + inv.T)).astype(np.float32)


def moments(Z: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    Z = np.asarray(Z, np.float64)
    mean = Z.mean(axis=0)
    C = Z - mean
    m2 = C.T @ C
    return mean, 0.5 * (m2 + m2.T), len(Z)


def fit_image_head(Z: np.ndarray, cfg: ImageConfig) -> ImageHead:
    """Fit ``cfg.kind`` on good images' pooled features (N, D).

    Raises:
        DataError: fewer than two images (a nearest neighbour and a spread need two).
    """
    Z = np.asarray(Z, np.float32)
    if Z.ndim != 2 or len(Z) < 2:
        raise DataError(f"image-level heads need pooled features of >= 2 good images, got {Z.shape}")
    return registry.get(cfg.kind, "image").fit(Z, cfg)


def update_image_head(head: ImageHead, Z: np.ndarray) -> ImageHead:
    """``head`` after also learning the good images ``Z``: knn's memory grows (a coreset of old +
    new rows past ``max_images``); gaussian's moments merge exactly."""
    Z = head.check(Z)
    meta = dict(head.meta, images=head.images + len(Z))
    arrays = registry.get(head.kind, "image").update(head, Z)
    return dataclasses.replace(head, arrays=arrays, meta=meta, _cache={})


def held_out_scores(
    Z: np.ndarray, cfg: ImageConfig, *, folds: int = FOLDS, seed: int = 0, groups: np.ndarray | None = None
) -> np.ndarray:
    """Scores of the training images by heads that saw neither them nor any image of their group
    (``groups``: one entry per row, e.g. the frame a tile was cut from; None: each row its own):
    knn on the full memory with the row's group left out (exact when no coreset thinned it),
    gaussian by ``folds``-fold refits over whole groups (:mod:`edgetl.heads.heldout`)."""
    Z = np.asarray(Z, np.float32)
    return registry.get(cfg.kind, "image").held_out_scores(Z, cfg, folds=folds, seed=seed, groups=groups)


def image_scores_nodes(b, head: ImageHead, z: str) -> str:
    """Graph nodes (on a :class:`edgetl.heads.patch_graph.GraphBuilder`) scoring pooled features
    ``z`` (N, D): the score's name, computed as :meth:`ImageHead.scores` computes it."""
    return registry.get(head.kind, "image").graph_scores(b, head, z)
