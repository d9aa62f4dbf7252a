"""Negative transfer: does the pretrained backbone beat a model that knows nothing?

A frozen ImageNet backbone helps when its features separate your classes better than the pixels do.
Spectrograms, sensor maps and noise-like textures can be where it does not: resizing to 224 px,
the network's invariances and its pooling can throw away exactly what separates the classes (an
absolute frequency row, a noise grain). The check here trains the same edgetl head on two feature
sets of the *same* training images and scores both on the *same* validation images:

* the backbone's features (what ``fit`` trains on);
* a **baseline without pretrained knowledge** (:func:`pixel_baseline_features`): the image
  downscaled to 16 x 16 RGB pixels, its grey-level histogram (16 bins) and its radially averaged
  log power spectrum (24 bins) — 808 numbers a linear model can use directly.

:func:`transfer_check` compares the two with a paired interval on the validation items (Newcombe's,
from edgetl's conversion gate): transfer **helps** when the one-sided ``confidence`` lower bound of
(backbone - baseline) accuracy exceeds ``margin_pp``; otherwise it warns in one line — **negative
transfer** when the baseline is shown better (upper bound < 0), **no clear gain** when the data
cannot tell them apart — with what the user can try.

numpy and Pillow only (head training is edgetl's numpy trainer).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from ..core.gate import paired_difference_interval as paired_difference
from ._stats import train_linear_head

__all__ = [
    "TransferCheck",
    "pixel_baseline_features",
    "transfer_check",
    "compare_to_baseline",
    "baseline_outcome_check",
    "BASELINE_NAME",
]

CONFIDENCE = 0.95
BASELINE_NAME = "pixel baseline (16x16 pixels + histogram + spectrum, no pretraining)"
_ADVICE = (
    "try `edgetl rank` for another backbone, inputs closer to photographs (spectrograms: render them "
    "at full resolution, frequency axis kept, instead of resizing), more labelled images, or a model "
    "trained on the pixels themselves"
)


def _as_rgb(img) -> Image.Image:
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    a = np.asarray(img)
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
            a = a * 255.0
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3):
        raise ValueError(f"an image must be HxW or HxWxC, got shape {a.shape}")
    return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")


def _radial_bins(size: int, bins: int) -> np.ndarray:
    f = np.fft.fftfreq(size)
    r = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    idx = np.floor(r / 0.5 * bins).astype(np.int64)  # 0..bins-1 inside the Nyquist circle
    idx[0, 0] = -1  # the mean (DC) is left out: brightness is in the pixels already
    idx[idx >= bins] = -1
    return idx


def pixel_baseline_features(
    images: Iterable, *, size: int = 16, hist_bins: int = 16, spectrum_bins: int = 24, spectrum_size: int = 64
) -> np.ndarray:
    """Features that use no pretrained knowledge, for the negative-transfer check.

    Per image (uint8 or [0, 1] float arrays HxW / HxWx3 / HxWx4, or PIL images): the RGB image
    area-downscaled to ``size`` x ``size`` (values in [0, 1]), the grey-level histogram
    (``hist_bins`` fractions) and the radially averaged log power spectrum of the centre square
    resized to ``spectrum_size`` (``spectrum_bins`` values). Returns float32 (n, 3 size^2 +
    hist_bins + spectrum_bins).
    """
    ring = _radial_bins(spectrum_size, spectrum_bins)
    flat = ring.ravel()
    inside = flat >= 0
    counts = np.bincount(flat[inside], minlength=spectrum_bins).astype(np.float64)
    rows = []
    for img in images:
        im = _as_rgb(img)
        px = np.asarray(im.resize((size, size), Image.Resampling.BOX), np.float32).ravel() / 255.0
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        grey = im.convert("L").crop((left, top, left + side, top + side))
        if side != spectrum_size:
            grey = grey.resize((spectrum_size, spectrum_size), Image.Resampling.BOX)
        g = np.asarray(grey, np.float64)
        hist = (
            np.bincount(
                np.minimum((g.ravel() * hist_bins / 256.0).astype(np.int64), hist_bins - 1), minlength=hist_bins
            )
            / g.size
        )
        power = np.abs(np.fft.fft2(g - g.mean())) ** 2 / g.size
        spec = np.bincount(flat[inside], weights=power.ravel()[inside], minlength=spectrum_bins)
        spec = np.log10(spec / np.maximum(counts, 1) + 1e-3)
        rows.append(np.concatenate([px, hist.astype(np.float32), spec.astype(np.float32)]))
    if not rows:
        return np.zeros((0, 3 * size * size + hist_bins + spectrum_bins), np.float32)
    return np.stack(rows).astype(np.float32)


@dataclass(frozen=True)
class TransferCheck:
    """The paired comparison of a pretrained backbone's head with a no-pretraining baseline's head.

    Attributes:
        verdict: ``helps``, ``no clear gain`` or ``negative``; ``warn`` unless it ``helps``.
        transfer_accuracy / baseline_accuracy: on the same ``n`` validation items.
        difference_pp: transfer minus baseline, in points; ``lower_pp`` / ``upper_pp`` its one-sided
            ``confidence`` bounds (Newcombe's paired interval).
        message: one line for people ("" when transfer helps).
    """

    verdict: str
    warn: bool
    n: int
    transfer_accuracy: float
    baseline_accuracy: float
    difference_pp: float
    lower_pp: float
    upper_pp: float
    margin_pp: float
    confidence: float
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


def transfer_check(
    transfer_correct,
    baseline_correct,
    *,
    margin_pp: float = 0.0,
    confidence: float = CONFIDENCE,
    backbone: str = "the pretrained backbone",
    baseline: str = BASELINE_NAME,
    items: str = "images",
    advice: str = _ADVICE,
    scored: str = "validation",
) -> TransferCheck:
    """Decide from paired per-item correctness (1 = right) whether transfer clearly beats the baseline.

    Example:
        >>> transfer_check([1] * 90 + [0] * 10, [1] * 50 + [0] * 50).verdict
        'helps'
        >>> transfer_check([1] * 50 + [0] * 50, [1] * 90 + [0] * 10).verdict
        'negative'
    """
    t = np.asarray(transfer_correct, bool)
    b = np.asarray(baseline_correct, bool)
    if t.shape != b.shape or t.ndim != 1 or len(t) == 0:
        raise ValueError(f"paired outcomes must be two equal, non-empty vectors; got {t.shape} and {b.shape}")
    d, lo, hi = paired_difference(t, b, confidence=confidence)
    at, ab = float(t.mean()), float(b.mean())
    pts = lambda v: round(100.0 * float(v), 2)
    evidence = (
        f"{backbone} {at:.1%} vs {baseline} {ab:.1%} on the same {len(t)} {scored} {items} "
        f"(difference {100 * d:+.1f} pp, one-sided {confidence:.0%} bounds [{100 * lo:+.1f}, {100 * hi:+.1f}])"
    )
    if 100 * lo > margin_pp:
        verdict, message = "helps", ""
    elif hi < 0:
        verdict = "negative"
        message = (
            f"negative transfer: {evidence}; the pretrained features fit these {items} worse than the baseline: "
            + advice
        )
    else:
        verdict = "no clear gain"
        gap = f" by more than {margin_pp:g} pp" if margin_pp > 0 else ""
        message = (
            f"no clear gain from pretraining: {evidence}; the backbone is not shown to beat a model with no "
            f"pretraining{gap}: " + advice
        )
    return TransferCheck(
        verdict, verdict != "helps", len(t), at, ab, pts(d), pts(lo), pts(hi), float(margin_pp), confidence, message
    )


def compare_to_baseline(
    transfer_train,
    transfer_val,
    baseline_train,
    baseline_val,
    y_train,
    y_val,
    *,
    head_kind: str = "linear",
    seed: int = 0,
    margin_pp: float = 0.0,
    confidence: float = CONFIDENCE,
    backbone: str = "the pretrained backbone",
    baseline: str = BASELINE_NAME,
) -> TransferCheck:
    """Train edgetl's head on each feature set (same training rows, automatic L2) and compare them on
    the same validation rows with :func:`transfer_check`."""
    classes, yt = np.unique(np.asarray(y_train), return_inverse=True)
    index = {c: i for i, c in enumerate(classes.tolist())}
    try:
        yv = np.array([index[c] for c in np.asarray(y_val).tolist()], np.int64)
    except KeyError as exc:
        raise ValueError(f"validation class {exc.args[0]!r} has no training rows") from None
    k = len(classes)
    correct = []
    for tr, va in ((transfer_train, transfer_val), (baseline_train, baseline_val)):
        head = train_linear_head(np.asarray(tr, np.float32), yt, k, kind=head_kind, seed=seed)
        correct.append(head.predict(np.asarray(va, np.float32)) == yv)
    return transfer_check(
        correct[0], correct[1], margin_pp=margin_pp, confidence=confidence, backbone=backbone, baseline=baseline
    )


TEXT_BASELINE_NAME = "bag-of-words baseline (hashed word unigrams and bigrams, no pretraining)"


def bag_of_words_features(texts: Iterable[str], *, dim: int = 4096) -> np.ndarray:
    """Texts as L2-normalised counts of their lower-cased word unigrams and bigrams, hashed into
    ``dim`` buckets (a stable hash: the same text gives the same row in every process): what a
    linear model knows without any pretraining."""
    import hashlib
    import re

    rows = []
    for text in texts:
        words = re.findall(r"[a-z0-9]+", str(text).lower())
        v = np.zeros(dim, np.float32)
        for tok in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
            v[int.from_bytes(hashlib.blake2b(tok.encode(), digest_size=4).digest(), "little") % dim] += 1.0
        rows.append(v / max(float(np.linalg.norm(v)), 1e-12))
    return np.stack(rows) if rows else np.zeros((0, dim), np.float32)


TEXT_ADVICE = (
    "try another sentence encoder (--backbone), more labelled texts, or check that the texts are in "
    "the encoder's language"
)


def baseline_check(
    shipped_correct,
    baseline_train,
    y_train,
    baseline_val,
    y_val,
    *,
    backbone: str,
    baseline: str,
    items: str = "images",
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> TransferCheck:
    """The shipped head's validation correctness against a linear head trained on a baseline's
    features of the same training items (what ``fit`` runs after every classification fit)."""
    classes, yt = np.unique(np.asarray(y_train), return_inverse=True)
    index = {c: i for i, c in enumerate(classes.tolist())}
    yv = np.array([index.get(c, -1) for c in np.asarray(y_val).tolist()], np.int64)
    head = train_linear_head(np.asarray(baseline_train, np.float32), yt, len(classes), seed=seed)
    return transfer_check(
        shipped_correct,
        head.predict(np.asarray(baseline_val, np.float32)) == yv,
        confidence=confidence,
        backbone=backbone,
        baseline=baseline,
        items=items,
        advice=_ADVICE if items == "images" else TEXT_ADVICE,
    )


def baseline_outcome_check(
    shipped_correct,
    baseline_correct,
    *,
    backbone: str,
    baseline: str,
    items: str = "images",
    confidence: float = CONFIDENCE,
    scored: str = "out-of-fold",
) -> TransferCheck:
    """:func:`baseline_check` for a baseline already scored on the same items (``fit`` scores
    both out of fold, on the same folds)."""
    return transfer_check(
        shipped_correct,
        baseline_correct,
        confidence=confidence,
        backbone=backbone,
        baseline=baseline,
        items=items,
        advice=_ADVICE if items == "images" else TEXT_ADVICE,
        scored=scored,
    )
