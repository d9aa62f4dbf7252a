"""The device side: load a bundle and classify images with numpy, Pillow and the bundle's runtime.

No torch, no timm, no network (``tests/cli/test_no_torch.py`` runs this where torch cannot
import). Predictions are computed as backbone (ONNX Runtime / OpenVINO) -> numpy head, the same
head code ``fit`` trained, so a head version written by ``adapt`` is used immediately.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .bundle import Bundle, load_bundle
from .data import Sample, list_images, scan_images
from .errors import DataError
from .features import extract_features
from .report import classification_metrics
from .sessions import Session, open_session


@dataclass
class Prediction:
    """One image's answer. ``label`` is ``"unknown"`` when confidence is under the bundle's threshold."""

    path: str
    label: str
    confidence: float
    top_k: list[tuple[str, float]]
    unknown: bool = False

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "unknown": self.unknown,
            "top_k": [{"label": l, "p": round(p, 6)} for l, p in self.top_k],
        }


def open_bundle_model(bundle: Bundle, path: Path, *, device: str | None = None, threads: int | None = None,
                      exact: bool = True) -> Session:
    """A session for one of the bundle's model files, with its target's device / providers.

    With ``exact`` (the default), a bundle whose head was trained on exact INT8 features
    (``fit_features = "simulated"``: ARM, Jetson, NPU profiles) computes those same numbers on a
    CPU whose own INT8 kernels would saturate, by emulation: slower, but the predictions are the
    device's. ``exact=False`` measures this host's native kernels (``bench``).
    """
    target = bundle.manifest.get("target", {})
    return open_session(
        path,
        runtime=bundle.runtime,
        device=device or target.get("device"),
        providers=target.get("providers"),
        threads=threads,
        exact=exact and bundle.precision == "int8" and target.get("fit_features") == "simulated",
        float_precision=bundle.float_precision,
    )


def open_backbone(bundle: Bundle, *, device: str | None = None, threads: int | None = None,
                  exact: bool = True) -> Session:
    """A session for the bundle's backbone (see :func:`open_bundle_model`)."""
    return open_bundle_model(bundle, bundle.model_file("backbone"), device=device, threads=threads, exact=exact)


def check_confidence(threshold: float | None) -> None:
    """A confidence threshold is a number in [0, 1] (or None for the bundle's own).

    Raises:
        ConfigError: anything else.
    """
    import math

    if threshold is not None and not (isinstance(threshold, (int, float)) and math.isfinite(threshold)
                                      and 0.0 <= threshold <= 1.0):
        from .errors import ConfigError

        raise ConfigError(f"--threshold {threshold!r}: a confidence between 0 and 1 (0 turns 'unknown' off)")


class Predictor:
    """A bundle ready to classify.

    Example:
        >>> p = Predictor("parts.bundle")  # doctest: +SKIP
        >>> [r.label for r in p.predict(["a.jpg", "b.jpg"])]  # doctest: +SKIP
    """

    def __init__(self, bundle: Bundle | str | Path, *, device: str | None = None, threads: int | None = None,
                 head_version: int | None = None):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.session = open_backbone(self.bundle, device=device, threads=threads)
        self.head = self.bundle.load_head(head_version)
        self.preprocess = self.bundle.preprocess
        entry = self.bundle.head_entry(head_version)
        self.threshold = float(entry.get("unknown_threshold", self.bundle.manifest.get("thresholds", {}).get("unknown", 0.0)))

    @property
    def labels(self) -> list[str]:
        return self.head.labels

    def features(self, paths: Sequence[Path], *, quiet: bool = True, skipped: list | None = None) -> np.ndarray:
        return extract_features(paths, session=self.session, preprocess=self.preprocess, quiet=quiet, desc="predict",
                                skipped=skipped)

    def proba(self, paths: Sequence[Path], *, quiet: bool = True) -> np.ndarray:
        return self.head.proba(self.features(paths, quiet=quiet))

    def predict(self, paths: Sequence[str | Path], *, top_k: int = 1, quiet: bool = True,
                threshold: float | None = None, skipped: list | None = None) -> list[Prediction]:
        """Classify image files (folders are expanded).

        Unreadable files raise :class:`DataError`, or, when ``skipped`` is a list, are recorded
        there as ``(path, reason)`` and left out.

        Raises:
            DataError: an unreadable file (without ``skipped``).  ConfigError: a threshold outside 0..1.
        """
        check_confidence(threshold)
        files = list_images(list(paths))
        bad: list = []
        feats = self.features(files, quiet=quiet, skipped=bad if skipped is not None else None)
        if skipped is not None:
            skipped.extend(bad)
            gone = {str(p) for p, _ in bad}
            files = [f for f in files if str(f) not in gone]
        probs = self.head.proba(feats) if len(files) else np.zeros((0, len(self.labels)))
        thr = self.threshold if threshold is None else threshold
        out = []
        k = max(1, min(top_k, len(self.labels)))
        for path, p in zip(files, probs):
            order = np.argsort(-p, kind="stable")[:k]
            best = int(order[0])
            unknown = bool(p[best] < thr)
            out.append(Prediction(
                str(path), "unknown" if unknown else self.labels[best], float(p[best]),
                [(self.labels[int(i)], float(p[int(i)])) for i in order], unknown,
            ))
        return out

    def evaluate(self, data: str | Path, *, quiet: bool = True, strict: bool = False) -> dict:
        """Accuracy, per-class recall and confusion matrix on every labelled image under ``data``.

        Raises:
            DataError: no usable images, or a class the bundle does not know.
        """
        layout, samples, val, skipped = scan_images(data, strict=strict)
        samples = samples + (val or [])
        if not samples:
            raise DataError(f"{data}: no usable labelled images to evaluate ({len(skipped)} skipped)")
        unknown = sorted({s.label for s in samples} - set(self.labels))
        if unknown:
            raise DataError(
                f"{data}: class {unknown[0]!r} is not in this bundle (knows: {', '.join(self.labels)}); "
                "teach it first with: edgetl adapt BUNDLE DATA"
            )
        index = {l: i for i, l in enumerate(self.labels)}
        X = extract_features([s.path for s in samples], session=self.session, preprocess=self.preprocess,
                             digests=[s.digest for s in samples], quiet=quiet, desc="eval")
        y = np.array([index[s.label] for s in samples], dtype=np.int64)
        m = classification_metrics(y, self.head.predict(X), self.labels)
        m["skipped"] = [{"path": str(p), "reason": r} for p, r in skipped]
        m["head_version"] = self.bundle.head_version
        return m


def samples_to_paths(samples: Sequence[Sample]) -> list[Path]:
    return [s.path for s in samples]
