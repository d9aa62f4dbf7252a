"""Synthetic image classes where an ImageNet backbone has nothing to offer (numpy only).

Used by the negative-transfer tests and ``benchmarks/transfer.py``; deterministic for a seed.

* :func:`spectrograms` — spectrogram-like images (time across, frequency up): every class is one
  tone at its own absolute frequency row, switched on for a random stretch of time, over
  log-power noise, with a distractor tone at a random row and random broadband clicks. What
  separates the classes is *which row*, exactly what a pooled, translation-tolerant backbone
  discards, and exactly what a per-row pixel average keeps.
* :func:`noise_textures` — isotropic band-pass noise whose classes differ only in the centre
  spatial frequency, with random brightness and contrast.
* :func:`pixel_noise` — independent pixels whose classes differ only in the distribution of a
  pixel value (normal, uniform, Laplace, two-level, skewed either way) at equal mean and variance.

Measured (``benchmarks/transfer.py``): only the spectrograms defeat an ImageNet backbone; it reads
noise frequency and pixel distributions better than the pixel baseline does.
"""

from __future__ import annotations

import numpy as np

__all__ = ["spectrograms", "noise_textures", "pixel_noise"]


def _to_uint8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def spectrograms(
    n_per_class: int, *, n_classes: int = 8, size: int = 64, seed: int = 0, first_row: int = 14, spacing: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, size, size, 3) uint8, labels (n,)): class c has a tone at row ``first_row + c *
    spacing`` (counted from the bottom)."""
    if first_row + (n_classes - 1) * spacing >= size - 2:
        raise ValueError("classes do not fit in the image; lower spacing or n_classes")
    rng = np.random.default_rng(seed)
    images, labels = [], []
    rows = np.arange(size)[:, None]
    for c in range(n_classes):
        for _ in range(n_per_class):
            power = rng.exponential(1.0, size=(size, size))
            # a soft spectral tilt and a random overall gain, as real recordings have
            tilt = np.linspace(1.5, 0.5, size)[::-1][:, None] * rng.uniform(0.5, 1.5)
            power = power * tilt
            for tone_row, strength, min_len in (
                (first_row + c * spacing, rng.uniform(6, 14), size // 2),
                (rng.integers(2, size - 2), rng.uniform(4, 10), size // 6),
            ):
                length = int(rng.integers(min_len, size + 1))
                start = int(rng.integers(0, size - length + 1))
                r = size - 1 - tone_row  # row 0 of the array is the top (highest frequency)
                profile = np.exp(-0.5 * ((rows - r) / 0.7) ** 2)
                power[:, start : start + length] += strength * profile
            for _ in range(int(rng.integers(0, 4))):  # broadband clicks
                power[:, int(rng.integers(0, size))] += rng.uniform(2, 6)
            db = 10 * np.log10(power + 1e-3)
            lo, hi = np.percentile(db, 1), np.percentile(db, 99.5)
            g = (db - lo) / max(hi - lo, 1e-6) * 255
            images.append(np.repeat(_to_uint8(g)[..., None], 3, axis=2))
            labels.append(c)
    return np.stack(images), np.array(labels, np.int64)


def noise_textures(
    n_per_class: int, *, n_classes: int = 6, size: int = 64, seed: int = 0, low: float = 0.06, ratio: float = 1.3
) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, size, size, 3) uint8, labels (n,)): class c is band-pass noise centred on
    ``low * ratio**c`` cycles per pixel (one-octave-wide Gaussian band on a log scale)."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(size)
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    radius[0, 0] = 1e-6
    images, labels = [], []
    for c in range(n_classes):
        centre = low * ratio**c
        if centre >= 0.5:
            raise ValueError("the highest class frequency reaches Nyquist; lower low or ratio")
        band = np.exp(-0.5 * (np.log2(radius / centre) / 0.25) ** 2)
        band[0, 0] = 0.0
        for _ in range(n_per_class):
            white = rng.normal(size=(size, size))
            tex = np.real(np.fft.ifft2(np.fft.fft2(white) * band))
            tex = tex / (tex.std() + 1e-12)
            img = 128 + rng.uniform(-30, 30) + rng.uniform(20, 45) * tex
            images.append(np.repeat(_to_uint8(img)[..., None], 3, axis=2))
            labels.append(c)
    return np.stack(images), np.array(labels, np.int64)


def pixel_noise(n_per_class: int, *, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, size, size, 3) uint8, labels (n,)): six classes of i.i.d. pixels, unit variance
    before a random brightness (+-20) and contrast (25-40 grey levels per unit)."""
    rng = np.random.default_rng(seed)
    root3 = np.sqrt(3.0)
    draws = (
        lambda s: rng.normal(size=s),
        lambda s: rng.uniform(-root3, root3, size=s),
        lambda s: rng.laplace(scale=1 / np.sqrt(2.0), size=s),
        lambda s: rng.choice([-1.0, 1.0], size=s) + 0.1 * rng.normal(size=s),
        lambda s: rng.exponential(size=s) - 1.0,
        lambda s: 1.0 - rng.exponential(size=s),
    )
    images, labels = [], []
    for c, draw in enumerate(draws):
        for _ in range(n_per_class):
            v = draw((size, size))
            v = (v - v.mean()) / (v.std() + 1e-12)
            img = 128 + rng.uniform(-20, 20) + rng.uniform(25, 40) * v
            images.append(np.repeat(_to_uint8(img)[..., None], 3, axis=2))
            labels.append(c)
    return np.stack(images), np.array(labels, np.int64)
