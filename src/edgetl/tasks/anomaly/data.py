"""Finding good images (and a labelled test set) for defect detection.

Layouts: MVTec AD (``train/good``, ``test/good``, ``test/<defect>``, ``ground_truth/<defect>/
<name>_mask.png``), ``DATA/good/``, or a folder of images. Without a ``test`` folder,
every good image is scored out of fold (by a model of the others) to set the threshold, and the
model keeps them all (``val_split`` holds a part out instead).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...core.preprocess import PreprocessConfig, check_cost, decode, resize_crop
from ...errors import DataError
from ..classify.data import Sample, check_image, is_image_name

# Mask pixels above this (0..255) are defect; MVTec masks are 0/255.
_MASK_LEVEL = 127


@dataclass
class AnomalyData:
    """Good training images, good held-out images, and a labelled test set when one exists.

    Layouts: MVTec AD (``train/good``, ``test/good``, ``test/<defect>``, ``ground_truth/<defect>/
    <name>_mask.png``), ``DATA/good/``, or a folder of images. Without a ``test`` folder, every
    good image is scored out of fold to set the threshold (or ``val_split`` of them held out).
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


def images_in(folder: Path, label: str, skipped: list, *, strict: bool) -> list[Sample]:
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


def load_anomaly_data(
    root: str | Path, *, val_split: float | None = None, seed: int = 0, strict: bool = False
) -> AnomalyData:
    """Find good training images (and a labelled test set) under ``root``. Without a test set,
    ``val_split`` of the good images is held out; None (the default) holds none out: ``fit``
    then scores every good image out of fold to set the threshold.

    Raises:
        DataError: no good images, or too few to hold any out when there is no test set.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"{root}: no such folder; expected DATA/train/good (MVTec layout), DATA/good or a folder of images"
        )
    skipped: list = []
    if (root / "train" / "good").is_dir():
        layout, train = "mvtec", images_in(root / "train" / "good", "good", skipped, strict=strict)
    elif (root / "good").is_dir():
        layout, train = "good", images_in(root / "good", "good", skipped, strict=strict)
    else:
        layout = "flat"
        train = [s for s in images_in(root, "good", skipped, strict=strict) if s.path.parent == root]
    if not train:
        raise DataError(f"{root}: no good training images; put them in {root}/train/good/ or {root}/good/")
    test: list[Sample] = []
    masks: dict[str, Path] = {}
    if (root / "test").is_dir():
        for kind_dir in sorted(p for p in (root / "test").iterdir() if p.is_dir() and not p.name.startswith(".")):
            samples = images_in(kind_dir, kind_dir.name, skipped, strict=strict)
            test += samples
            masks.update(find_masks(root, kind_dir.name, samples))
    val: list[Sample] = []
    if val_split is None and not any(s.label == "good" for s in test) and len(train) < 3:
        raise DataError(
            f"{root}: {len(train)} good image(s); need >= 3 (each is scored by a model of the others "
            "to set the threshold) or a test/good folder"
        )
    if val_split is not None and not any(s.label == "good" for s in test):
        if len(train) < 2:
            raise DataError(
                f"{root}: {len(train)} good image; need >= 2 (some are held out to set the threshold) "
                "or a test/good folder"
            )
        order = np.random.default_rng(seed).permutation(len(train))
        n_val = min(len(train) - 1, max(1, round(len(train) * val_split)))
        val = [train[i] for i in sorted(order[:n_val])]
        train = [train[i] for i in sorted(order[n_val:])]
    return AnomalyData(root, layout, train, val, test, masks, skipped)


def load_mask(path: Path | None, pre: PreprocessConfig) -> np.ndarray | None:
    """A defect mask brought to the map's pixels: the image's own resize + crop, nearest neighbour."""
    if path is None:
        return None
    # through the decoder's pixel budget, like every image edgetl reads (a mask may be as hostile)
    with decode(path, path, load=False) as src:
        check_cost(src, path)
        im = src.convert("L")
        if pre.roi is not None:  # the mask follows its image through the region of interest
            width, height = im.size
            im = im.crop(pre.roi.box(width, height, path))
        arr = np.asarray(resize_crop(im, dataclasses.replace(pre, interpolation="nearest")))
    return arr > _MASK_LEVEL


def labelled_images(data: str | Path, *, strict: bool = False) -> tuple[list[Sample], dict, list]:
    """Good and defective images of an MVTec-style folder (``test/good``, ``test/<defect>``,
    ``ground_truth``) or of ``good`` / ``<defect>`` sub-folders: (samples, masks, skipped).

    Raises:
        DataError: no such folder.
    """
    root = Path(data)
    base = root / "test" if (root / "test").is_dir() else root
    if not base.is_dir():
        raise DataError(f"{data}: no such folder")
    skipped: list = []
    samples: list[Sample] = []
    masks: dict[str, Path] = {}
    for kind_dir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        got = images_in(kind_dir, kind_dir.name, skipped, strict=strict)
        samples += got
        masks.update(find_masks(root, kind_dir.name, got))
    return samples, masks, skipped


def find_masks(root: Path, kind: str, samples: list[Sample]) -> dict[str, Path]:
    gt = root / "ground_truth" / kind
    out = {}
    for s in samples:
        for cand in (gt / f"{s.path.stem}_mask.png", gt / f"{s.path.stem}.png"):
            if cand.is_file():
                out[str(s.path)] = cand
                break
    return out


def good_images(data: str | Path, *, strict: bool = False) -> tuple[list[Sample], list]:
    """Newly confirmed good images for an update: ``DATA/train/good``, ``DATA/good`` or ``DATA``.

    Raises:
        DataError: no folder, or no readable image in it.
    """
    root = Path(data)
    folder = next((f for f in (root / "train" / "good", root / "good") if f.is_dir()), root)
    if not folder.is_dir():
        raise DataError(f"{data}: no such folder of good images")
    skipped: list = []
    samples = images_in(folder, "good", skipped, strict=strict)
    if not samples:
        raise DataError(f"{data}: no readable good images to learn from")
    return samples, skipped


def is_anomaly_layout(data: str | Path) -> bool:
    """A folder whose only class is ``good`` (``DATA/train/good`` or ``DATA/good``): one-class data."""
    root = Path(data)
    for base in (root / "train", root):
        if base.is_dir() and (base / "good").is_dir():
            others = [
                p
                for p in base.iterdir()
                if p.is_dir() and not p.name.startswith(".") and p.name not in ("good", "test", "ground_truth", "val")
            ]
            return not others
    return False
