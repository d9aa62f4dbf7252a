"""Helpers the transfer and drift benchmarks (and tests/transfer) share: FP32 features of image
files through a registry backbone, cached the way ``fit`` caches them, and a labelled folder as
arrays. Thin wrappers over edgetl's public pieces."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgetl.core.features import ImageExtractor
from edgetl.core.preprocess import load_rgb
from edgetl.core.sessions import open_session
from edgetl.pipeline.rank import backbone_features as _backbone_features
from edgetl.tasks.classify.data import load_dataset
from edgetl.transfer._stats import train_linear_head  # noqa: F401  (re-exported for the benchmarks)


def backbone_features(paths: Sequence, backbone: str, *, cache_dir=None) -> np.ndarray:
    """FP32 ONNX Runtime features of image files (cached: a second call runs no backbone)."""
    return _backbone_features([Path(p) for p in paths], backbone, cache_dir=cache_dir)[0]


def backbone_session(backbone: str, *, cache_dir=None, threads: int | None = None):
    """(session, preprocess config) of the FP32 ONNX feature extractor of ``backbone``."""
    from edgetl.export import export_backbone

    exported = export_backbone(backbone, cache_dir=cache_dir)
    return open_session(exported.path, runtime="onnxruntime", threads=threads), exported.image_preprocess


def predict_features(paths: Sequence, session, preprocess, *, batch_size: int = 1) -> np.ndarray:
    """Features the way ``edgetl predict`` computes them: decode, preprocess, backbone; no cache."""
    return ImageExtractor(session, preprocess, "").features([Path(p) for p in paths], batch_size=batch_size)


def read_rgb(path) -> np.ndarray:
    """An image decoded the way edgetl decodes every image (EXIF, modes, 16-bit), as uint8 HxWx3."""
    return np.asarray(load_rgb(Path(path)), dtype=np.uint8)


def image_folder(root, *, val_split: float = 0.2, seed: int = 0) -> dict:
    """edgetl's dataset loader on ``root``: paths, integer labels and groups of both splits."""
    ds = load_dataset(root, val_split=val_split, seed=seed)
    index = {c: i for i, c in enumerate(ds.classes)}

    def side(samples):
        return (
            [s.path for s in samples],
            np.array([index[s.label] for s in samples], np.int64),
            np.array([s.group for s in samples], dtype=object),
        )

    tr, va = side(ds.train), side(ds.val)
    return {
        "classes": list(ds.classes),
        "train_paths": tr[0],
        "y_train": tr[1],
        "groups_train": tr[2],
        "val_paths": va[0],
        "y_val": va[1],
        "groups_val": va[2],
        "split": dict(ds.split),
    }
