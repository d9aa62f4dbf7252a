"""What ``fit`` can be told: its own module, so that ``rank`` (which ``fit --backbone auto`` calls)
reads the same options without importing ``fit``."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class FitOptions:
    """Everything ``fit`` can be told, for every task. Defaults are what ``edgetl fit DATA --out B`` does.

    Attributes:
        task: ``classify``, ``text`` or ``anomaly``; None: from the data (and ``head``).
        backbone: a registry name, timm architecture, or (text) model folder / hub name; None:
            the task's default.
        head: the head: a kind name, a :class:`HeadConfig` / :class:`AnomalyConfig`, or a dict of
            its settings; None: the task's default.
        target, precision, runtime: the profile, and overrides that compose with it.
        val, val_split, group_by: an explicit validation set (a folder / file, or a held-out
            fraction; by default none: every item is scored out of fold) and where groups come from.
        head_auto: choose the head kind by out-of-fold accuracy (set when ``head`` names no kind).
        augment: augmented views cached per training image (images).
        calibration_size: INT8 calibration items (default: the profile's).
        allow_drop: write the bundle even when the gate refuses.
        reference: measure the FP32 reference (the gate needs it).
        exemplars_per_class: the replay memory's size (default: the task's).
        text_column, label_column, quantization, exporter: text datasets and encoders.
        roi: image tasks: the region of interest, ``"x,y,w,h"`` in pixels or fractions of the
            frame (:meth:`Roi.parse`); stored in the bundle's preprocessing, cut out everywhere.
    """

    task: str | None = None
    backbone: str | None = None
    weights: str | None = None
    head: Any = None
    target: str | None = None
    precision: str | None = None
    runtime: str | None = None
    val: str | None = None
    val_split: float | None = None
    group_by: str | None = None
    augment: int = 0
    seed: int = 0
    cache_dir: str | None = None
    strict: bool = False
    calibration_size: int | None = None
    allow_drop: bool = False
    reference: bool = True
    exemplars_per_class: int | None = None
    batch_size: int = 32
    quiet: bool = False
    text_column: str | None = None
    label_column: str | None = None
    quantization: str = "auto"
    exporter: str = "auto"
    roi: str | None = None
    head_auto: bool = False

    def to_dict(self) -> dict:
        d = (
            asdict(self)
            if not hasattr(self.head, "to_dict")
            else {**asdict(dataclasses.replace(self, head=None)), "head": self.head.to_dict()}
        )
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FitOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
