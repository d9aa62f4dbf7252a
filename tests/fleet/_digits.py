"""scikit-learn's ``load_digits`` (1,797 8x8 grey digits, 10 classes) as 64x64 RGB PNG folders.

Shared by the fleet tests and ``benchmarks/fleet.py``. Images are upscaled with bilinear
resampling so the real backbone sees something image-like; file names carry the dataset index so
a split is reproducible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 64, 64, 3), labels int64 (n,)) of the whole digits set."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    out = np.empty((len(d.images), 64, 64, 3), np.uint8)
    for i, im in enumerate(d.images):
        g = Image.fromarray((im * (255.0 / 16.0)).astype(np.uint8), mode="L").resize((64, 64), Image.BILINEAR)
        out[i] = np.asarray(g.convert("RGB"))
    return out, d.target.astype(np.int64)


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> Path:
    """``root/<digit>/<index>.png`` for the rows ``index`` (existing files are kept)."""
    from PIL import Image

    root = Path(root)
    for i in index:
        p = root / f"d{labels[i]}" / f"{int(i):04d}.png"
        if not p.exists():
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(p)
    return root


def factory_split(labels: np.ndarray, per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(factory rows: ``per_class`` per digit, the remaining rows), seeded."""
    rng = np.random.default_rng(seed)
    fac = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)])
    rest = np.setdiff1d(np.arange(len(labels)), fac)
    return np.sort(fac), rest
