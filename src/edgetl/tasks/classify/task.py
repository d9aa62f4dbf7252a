"""Image classification: a folder of labelled images in, a classifier bundle out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ...core.features import ImageExtractor, load_input
from ...core.preprocess import PreprocessConfig
from ...errors import ConfigError
from ..base import Calibration, digest_of, stratified_subset
from .classifier import ClassifierTask
from .data import CheckedImages, list_images, load_dataset, regroup, scan_images

# Augmented views of a training image used to fill the calibration set when there are fewer
# training images than it asks for (activation ranges see more variety; the report says how many
# were real).
MAX_CALIBRATION_VIEWS = 3


class ImageClassifyTask(ClassifierTask):
    """``DATA/<class>/*.jpg`` (or train/val folders, or a CSV manifest) -> which class is this image?"""

    name = "classify"
    items = "images"
    backbone_kind = "image"
    accuracy_control = True
    gate_metric = "accuracy"
    ranks_backbones = True  # edgetl.pipeline.rank compares image classifiers on labelled images

    def claims(self, data: Path) -> bool:
        return Path(data).is_dir() or Path(data).suffix.lower() == ".csv"

    def load_data(self, data: Path, options, cache_root: Path):
        return load_dataset(
            data,
            val=options.val,
            val_split=options.val_split,
            seed=options.seed,
            strict=options.strict,
            checked=CheckedImages(cache_root),
            group_by=options.group_by,
        )

    def views(self, options) -> int:
        if not 0 <= options.augment <= 32:
            raise ConfigError(f"--augment {options.augment}: use 0 to 32 augmented views per training image")
        return options.augment

    def calibration(self, data, target, exported, seed: int) -> Calibration:
        return image_calibration(data.train, target, exported, seed)

    def extractor_for(self, session, model_path: Path, backbone: dict, root: Path) -> ImageExtractor:
        return ImageExtractor(session, PreprocessConfig.from_dict(backbone["preprocess"]), model_path)

    def fused_outputs(self, fused_session, items, exported) -> np.ndarray:
        pre = PreprocessConfig.from_dict(exported.preprocess)
        return fused_session(np.stack([load_input(s.path, pre) for s in items]))

    baseline_key = "pixel-baseline-1"

    @property
    def baseline_name(self) -> str:
        from ...transfer.negative import BASELINE_NAME

        return BASELINE_NAME

    def baseline_features(self, items: Sequence, cache, exported) -> np.ndarray:
        from ...core.preprocess import load_rgb
        from ...transfer.negative import pixel_baseline_features

        # the baseline sees what the backbone sees: the bundle's region of interest, decoded as sized
        pre = PreprocessConfig.from_dict(exported.preprocess)
        rows = [cache.get(s.digest, 0) for s in items]
        for i in [i for i, r in enumerate(rows) if r is None]:
            rows[i] = pixel_baseline_features([load_rgb(items[i].path, cfg=pre)])[0]
            cache.put(items[i].digest, 0, rows[i])
        return np.stack(rows)

    def scan(self, data, *, bundle=None, strict: bool = False, group_by: str | None = None) -> tuple[list, list]:
        layout, samples, val, skipped = scan_images(data, strict=strict, group_by=group_by)
        items, _ = regroup(samples + (val or []), group_by, layout)
        return items, skipped

    def predict_items(self, inputs: Sequence) -> list:
        return list_images(list(inputs))


def image_calibration(train: list, target, exported, seed: int) -> Calibration:
    """Which training images (and augmented views) calibrate INT8: a class-stratified subset of
    the *training* split, never validation. With fewer images than the profile's calibration size,
    every image is used once plainly and then as augmented views (at most
    :data:`MAX_CALIBRATION_VIEWS` each) up to the size. Only the plan is made here (its content
    hashes key the model cache); pixels are decoded on a cache miss only."""
    size = target.quantization.calibration_size
    chosen = [train[i] for i in stratified_subset([s.label for s in train], size=size, seed=seed)]
    plan = [(s, 0) for s in chosen]
    view = 1
    while len(plan) < size and view <= MAX_CALIBRATION_VIEWS:
        plan += [(s, view) for s in chosen][: size - len(plan)]
        view += 1
    pre = PreprocessConfig.from_dict(exported.preprocess)
    info = {"images": len(chosen), "augmented_views": len(plan) - len(chosen), "requested": size}
    # A region of interest changes the pixels the plan decodes, so it keys the INT8 model too.
    keys = [f"{s.digest}:{v}" for s, v in plan] + ([f"roi:{pre.roi.to_dict()}"] if pre.roi is not None else [])
    return Calibration(digest_of(keys), lambda: calibration_inputs(plan, pre), info, len(plan))


def calibration_inputs(plan: list, preprocess: PreprocessConfig) -> np.ndarray:
    """The calibration plan's images (and augmented views) as one preprocessed batch, decoded on
    two threads (Pillow releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        return np.stack(
            list(pool.map(lambda sv: load_input(sv[0].path, preprocess, digest=sv[0].digest, view=sv[1]), plan))
        )
