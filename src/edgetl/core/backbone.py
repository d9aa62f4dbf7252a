"""What a fit knows about an exported backbone: the model file and how to feed it.

:mod:`edgetl.export` makes these (the only place torch runs); everything after export — conversion,
feature extraction, the bundle — reads only this description. Its :meth:`ExportedBackbone.to_dict`
is the manifest's ``backbone`` section, so a device knows the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .preprocess import PreprocessConfig

# What a backbone outputs: pooled features of an image, a patch-feature map, a sentence embedding.
# Named, so code that asks "is this a text encoder?" reads as a question about the backbone (a text
# backbone's preprocess kind is TEXT too), never as a question about which task made the bundle.
IMAGE, IMAGE_PATCH, TEXT = "image", "image-patch", "text"
KINDS = (IMAGE, IMAGE_PATCH, TEXT)
# Opset 18: torch's dynamo exporter emits it natively (its down-conversion to 17 fails on Pad), and
# ONNX Runtime, OpenVINO and TensorRT 10 all read it.
ONNX_OPSET = 18


@dataclass(frozen=True)
class ExportedBackbone:
    """An FP32 ONNX backbone on disk.

    Attributes:
        name: the registry name (or timm / hub name).
        kind: one of :data:`KINDS`.
        path: the FP32 ONNX file (dynamic batch).
        num_features: width of the output (channels of a patch map).
        digest: sha256 identifying the weights.
        opset: ONNX opset of the graph.
        preprocess: how an input becomes the model's input: an image's :class:`PreprocessConfig`
            as a dict, or ``{"kind": "text", "tokenizer": ..., "max_length": ...}``.
        tokenizer: the tokenizer file of a text backbone.
        feature_shape: (C, H, W) of a patch-feature map.
        info: the rest the manifest records (exporter, source, inputs ...).
    """

    name: str
    kind: str
    path: Path
    num_features: int
    digest: str
    opset: int
    preprocess: dict
    tokenizer: Path | None = None
    feature_shape: tuple[int, int, int] | None = None
    info: dict = field(default_factory=dict)

    @property
    def image_preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.preprocess)

    def with_preprocess(self, preprocess: dict) -> ExportedBackbone:
        import dataclasses

        return dataclasses.replace(self, preprocess=dict(preprocess))

    def to_dict(self) -> dict:
        d = {
            "name": self.name,
            "kind": self.kind,
            "num_features": self.num_features,
            "weights_sha256": self.digest,
            "opset": self.opset,
            "preprocess": dict(self.preprocess),
            **self.info,
        }
        if self.feature_shape is not None:
            d["feature_shape"] = list(self.feature_shape)
        return d
