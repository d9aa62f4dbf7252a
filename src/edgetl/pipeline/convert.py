"""Turn the FP32 ONNX backbone into what a target runs: INT8 / bf16 / FP16 / FP32, ONNX or OpenVINO IR.

One conversion for every task, cached by its inputs (:func:`converted_model`). INT8 is
post-training quantization calibrated on the user's own training data. The engine is the target
profile's choice:

* ``nncf`` — NNCF on the OpenVINO model (IR out) or on the ONNX graph (QDQ ONNX out). NNCF's
  min-max statistics with fast bias correction keep EfficientNet-Lite features within a cosine of
  about 0.99 of FP32, where ONNX Runtime's default MinMax quantize_static gave 0.89.
* ``ort`` — ``onnxruntime.quantization.quantize_static`` (QDQ), for profiles that need its exact
  knobs, e.g. signed symmetric activations for TensorRT's explicit quantization.

Text encoders are quantized as transformers: dynamically for ONNX Runtime (Optimum's quantizer,
:func:`edgetl.export.text.quantize_dynamic`), or statically by NNCF with its transformer scheme.

torch is never imported here; NNCF, OpenVINO and onnx are imported inside functions (``[train]``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.backbone import TEXT, ExportedBackbone
from ..core.console import quantizer_output, quiet_requested, status
from ..core.features import file_digest, publish_dir, staging_dir
from ..core.fuse import model_files
from ..core.targets import Target
from ..errors import ConfigError, require

log = logging.getLogger("edgetl")


@dataclass
class ConvertedModel:
    """A model file for the target runtime and how it was made."""

    path: Path  # .onnx, or .xml with its .bin beside it
    runtime: str
    precision: str
    info: dict = field(default_factory=dict)

    def files(self) -> list[Path]:
        return model_files(self.path)


def set_static_batch(model, batch: int):
    """Fix the batch dimension of every graph input/output of an ONNX model (NPU/TensorRT want it)."""
    onnx = require("onnx", extra="base", purpose="editing ONNX graphs")
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = batch
    del model.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model)


def load_nncf():
    """Import NNCF with its log on stderr at WARNING (ERROR with ``--quiet``). At import NNCF
    attaches a handler that writes INFO lines to *stdout*, which would corrupt ``--json`` output
    (accuracy control logs a line per iteration); edgetl reports progress itself. NNCF imports
    torch when it is installed; torch's "No CUDA runtime is found" notice is not for our users."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    nncf = require("nncf", extra="train", purpose="INT8 quantization")

    logger = logging.getLogger("nncf")
    if quiet_requested():
        logger.setLevel(logging.ERROR)
    logger.setLevel(max(logger.level, logging.WARNING))
    for h in logger.handlers:
        if isinstance(h, logging.StreamHandler) and h.stream is sys.stdout:
            h.setStream(sys.stderr)
    return nncf


def _nncf_dataset(calibration, batch: int, input_name: str | None = None):
    """Calibration items one model call each; the ONNX backend wants {input name: array} dicts.
    A list of feed dicts (text encoders) is taken as it is."""
    nncf = load_nncf()
    if isinstance(calibration, list):
        return nncf.Dataset(calibration)
    step = batch if batch > 0 else 1
    # NNCF's statistics are per sample; batches of the model's own static size keep shapes valid.
    items = [calibration[i : i + step] for i in range(0, len(calibration) - step + 1, step)]
    if input_name is not None:
        items = [{input_name: x} for x in items]
    return nncf.Dataset(items)


def _nncf_params(target: Target, n: int, *, transformer: bool = False):
    """The profile's NNCF settings. ``transformer``: NNCF's transformer scheme with its own
    activation ranges and fast bias correction: the profiles' global min/max ranges and full bias
    correction are tuned for ReLU CNNs, and on MiniLM they took the INT8 embedding cosine to FP32
    from 0.98 down to 0.955 (attention and LayerNorm activations have rare large outliers that
    global extremes chase, and NNCF's per-image average ignores)."""
    nncf = load_nncf()
    q = target.quantization
    preset = nncf.QuantizationPreset.PERFORMANCE if q.preset == "performance" else nncf.QuantizationPreset.MIXED
    ignored = (
        nncf.IgnoredScope(patterns=list(q.keep_float), types=list(q.keep_float_types), validate=False)
        if q.keep_float or q.keep_float_types
        else None
    )
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    # NNCF's own default for per-tensor activations is MEAN_MINMAX: the mean over calibration
    # items of each item's min and max. With one image per item that clips every activation whose
    # peak only some images reach; on EfficientNet-Lite0 the feature cosine to FP32 (exact INT8
    # arithmetic, benchmarks/quant_ablation.py) was 0.759 with it and 0.962 with the global MINMAX.
    ranges = {
        "minmax": RangeEstimatorParametersSet.MINMAX,
        "mean_minmax": RangeEstimatorParametersSet.MEAN_MINMAX,
        "histogram": RangeEstimatorParametersSet.HISTOGRAM,
    }[q.calibration_method]
    advanced = AdvancedQuantizationParameters(
        overflow_fix={
            "enable": OverflowFix.ENABLE,
            "first_layer": OverflowFix.FIRST_LAYER,
            "disable": OverflowFix.DISABLE,
        }[q.overflow_fix],
        disable_channel_alignment=not q.channel_alignment,
        activations_range_estimator_params=None if transformer else ranges,
    )
    params = dict(
        preset=preset,
        subset_size=n,
        fast_bias_correction=q.fast_bias_correction or transformer,
        ignored_scope=ignored,
        advanced_parameters=advanced,
    )
    return {**params, "model_type": nncf.ModelType.TRANSFORMER} if transformer else params


def _ov_core():
    ov = require("openvino", extra="openvino", purpose="OpenVINO IR export")
    return ov


def onnx_to_openvino(onnx_path: Path, *, batch: int):
    """Read an ONNX graph into an OpenVINO model, with a static batch when ``batch`` > 0."""
    ov = _ov_core()
    model = ov.convert_model(str(onnx_path))
    if batch > 0:
        shape = list(model.inputs[0].get_partial_shape())
        shape[0] = batch
        model.reshape({model.inputs[0]: ov.PartialShape(shape)})
    return model


def _quantize_ort(src: Path, dst: Path, calibration: np.ndarray, target: Target) -> dict:
    """ONNX Runtime's static QDQ quantizer with the profile's types and symmetry."""
    q = target.quantization
    oq = require("onnxruntime.quantization", extra="base", purpose="INT8 quantization")
    onnx = require("onnx", extra="base", purpose="reading ONNX graphs")
    graph = onnx.load(str(src), load_external_data=False).graph
    input_name = graph.input[0].name
    excluded = [n.name for n in graph.node if n.op_type in q.keep_float_types] or None
    step = target.batch or 8

    class Reader(oq.CalibrationDataReader):
        def __init__(self):
            self._it = iter(range(0, len(calibration) - step + 1 if target.batch else len(calibration), step))

        def get_next(self):
            i = next(self._it, None)
            return None if i is None else {input_name: calibration[i : i + step]}

    qtype = {"int8": oq.QuantType.QInt8, "uint8": oq.QuantType.QUInt8}
    # ORT warns once per layer, on the root logger, that a bias overflows int32 where a BN-folded
    # channel has near-zero weights (its bias is then clipped). The count goes into the report
    # instead of flooding the terminal.
    clipped: list[str] = []

    class _BiasFilter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            msg = record.getMessage()
            if "exceeds the range of a int32" in msg:
                clipped.append(msg.split("`")[1] if "`" in msg else msg)
                return False
            return "pre-processing before quantization" not in msg

    root = logging.getLogger()
    flt = _BiasFilter()
    root.addFilter(flt)
    for h in root.handlers:
        h.addFilter(flt)
    method = {
        "minmax": oq.CalibrationMethod.MinMax,
        "percentile": oq.CalibrationMethod.Percentile,
        "entropy": oq.CalibrationMethod.Entropy,
    }[q.calibration_method]
    oq.quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=oq.QuantFormat.QDQ,
        per_channel=q.per_channel,
        activation_type=qtype[q.activation_type],
        weight_type=qtype[q.weight_type],
        calibrate_method=method,
        reduce_range=q.overflow_fix == "enable",
        nodes_to_exclude=excluded,
        extra_options={
            "ActivationSymmetric": q.symmetric_activations,
            "WeightSymmetric": q.symmetric_weights,
            # TensorRT reads Q/DQ pairs around each op; ORT's default would drop some on outputs
            "QuantizeBias": True,
        },
    )
    root.removeFilter(flt)
    for h in root.handlers:
        h.removeFilter(flt)
    return {
        "engine": "onnxruntime.quantization",
        "calibration_method": q.calibration_method,
        "biases_clipped_to_int32": len(clipped),
    }


def convert(
    exported: ExportedBackbone | Path,
    *,
    target: Target,
    out_dir: Path,
    calibration=None,
    quiet: bool = False,
    mode: str = "auto",
) -> ConvertedModel:
    """Make the model file the target runs, at the target's precision.

    NNCF and Optimum draw progress bars on stdout; they go to stderr so that ``--json`` output
    stays one clean object (and nowhere with ``quiet``).

    Args:
        exported: the FP32 backbone (dynamic batch), or the path of an image backbone's ONNX file.
        target: the profile (runtime, precision, batch policy, quantization scheme).
        out_dir: where ``backbone.onnx`` or ``backbone.xml/.bin`` is written.
        calibration: INT8 calibration inputs: preprocessed images (N, 3, H, W) float32, or a list
            of feed dicts for a text encoder (one text each).
        mode: text encoders on ONNX Runtime: ``dynamic`` (``auto``) or ``static`` INT8.

    Raises:
        ConfigError: INT8 without calibration data, a static-shape profile for text, a bad mode.
        MissingDependency: the quantizer's package is not installed.
    """
    text = isinstance(exported, ExportedBackbone) and exported.kind == TEXT
    path = exported.path if isinstance(exported, ExportedBackbone) else Path(exported)
    if text and target.batch > 0:
        raise ConfigError(
            f"target {target.name} has a static batch ({target.batch}); text bundles need dynamic "
            "shapes for now (tokenized text varies in length): use cpu-x86, cpu-arm64 or openvino-cpu"
        )
    if mode not in ("auto", "dynamic", "static"):
        raise ConfigError(f"text quantization mode {mode!r}: use auto, dynamic or static")
    with quantizer_output(quiet):
        if text and target.precision == "int8" and target.runtime == "onnxruntime" and mode != "static":
            from ..export.text import quantize_dynamic

            t0 = time.perf_counter()
            out_dir.mkdir(parents=True, exist_ok=True)
            dst, info = quantize_dynamic(path, out_dir, target)
            info.update(
                precision="int8", runtime="onnxruntime", batch="dynamic", seconds=round(time.perf_counter() - t0, 2)
            )
            return ConvertedModel(dst, "onnxruntime", "int8", info)
        return _convert(path, target=target, out_dir=out_dir, calibration=calibration, transformer=text)


def _convert(
    fp32_onnx: Path,
    *,
    target: Target,
    out_dir: Path,
    calibration=None,
    stem: str = "backbone",
    transformer: bool = False,
) -> ConvertedModel:
    onnx = require("onnx", extra="base", purpose="exporting ONNX graphs")
    out_dir.mkdir(parents=True, exist_ok=True)
    precision, runtime, batch = target.precision, target.runtime, target.batch
    if precision == "int8" and (calibration is None or len(calibration) == 0):
        raise ConfigError("INT8 quantization needs calibration data; none were given")
    t0 = time.perf_counter()
    info: dict = {"precision": precision, "runtime": runtime, "batch": batch or "dynamic"}

    # A static-batch copy of the FP32 graph is the common starting point.
    src = fp32_onnx
    if batch > 0:
        src = out_dir / f".{stem}.static.onnx"
        onnx.save(set_static_batch(onnx.load(str(fp32_onnx)), batch), str(src))

    if runtime == "openvino":
        ov = _ov_core()
        model = onnx_to_openvino(src, batch=batch)
        if precision == "int8":
            nncf = load_nncf()
            n = len(calibration) // (batch or 1)
            model = nncf.quantize(
                model, _nncf_dataset(calibration, batch), **_nncf_params(target, n, transformer=transformer)
            )
            info.update(engine="nncf/openvino", preset=target.quantization.preset)
        dst = out_dir / f"{stem}.xml"
        # bf16 bundles keep FP16-compressed weights (half the file; the CPU computes in bf16, whose
        # mantissa is coarser than fp16's, so nothing is lost that bf16 would keep).
        ov.save_model(model, str(dst), compress_to_fp16=precision in ("fp16", "bf16"))
    else:
        dst = out_dir / f"{stem}.onnx"
        if precision == "fp32":
            shutil.copyfile(src, dst)
        elif precision == "fp16":
            f16 = require("onnxconverter_common.float16", extra="train", purpose="FP16 conversion")
            m16 = f16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
            onnx.save(m16, str(dst))
            info["engine"] = "onnxconverter-common"
        elif target.quantization.engine == "ort" and not transformer:
            info.update(_quantize_ort(src, dst, calibration, target))
        else:
            nncf = load_nncf()
            n = len(calibration) // (batch or 1)
            model = onnx.load(str(src))
            data = _nncf_dataset(calibration, batch, None if transformer else model.graph.input[0].name)
            qmodel = nncf.quantize(model, data, **_nncf_params(target, n, transformer=transformer))
            onnx.save(qmodel, str(dst))
            info.update(engine="nncf/onnx", preset=target.quantization.preset)
    if src != fp32_onnx:
        src.unlink(missing_ok=True)
    if precision == "int8":
        info["calibration_items"] = int(len(calibration))
        if transformer:
            info.update(mode="static", model_type="transformer")
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return ConvertedModel(dst, runtime, precision, info)


# Accuracy-controlled quantization ranks every quantizer group by reverting it and re-validating,
# then reverts the worst one per iteration. Both are bounded: at most this many iterations, and a
# wall-clock budget after which it stops and the plain INT8 model stands (the gate then refuses).
ACCURACY_CONTROL_MAX_ITERATIONS = 12


class _OutOfTime(Exception):
    """Raised from inside NNCF's validation callback when accuracy control's budget is spent."""


def float_layers(model) -> list[str]:
    """Names of the convolutions / matmuls of an NNCF-quantized OpenVINO model whose weights are
    not quantized (what accuracy control reverted to float)."""
    out = []
    for op in model.get_ordered_ops():
        if op.get_type_name() not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        # Quantized weights reach the op through a FakeQuantize, or (compressed) as an int8
        # constant followed by Convert / Subtract / Multiply.
        src = op.input_value(1).get_node()
        while src.get_type_name() in ("Reshape", "Convert", "Transpose", "Multiply", "Subtract", "Unsqueeze"):
            src = src.input_value(0).get_node()
        integer = src.get_type_name() == "Constant" and src.get_element_type().get_type_name() in (
            "i8",
            "u8",
            "i4",
            "u4",
        )
        if src.get_type_name() != "FakeQuantize" and not integer:
            out.append(op.get_friendly_name().removesuffix("/WithoutBiases"))
    return out


def convert_with_accuracy_control(
    fp32_onnx: Path,
    *,
    target: Target,
    out_dir: Path,
    calibration: np.ndarray,
    validation: np.ndarray,
    score,
    max_drop: float,
    stem: str = "backbone",
    budget_s: float | None = None,
    quiet: bool = False,
) -> ConvertedModel:
    """INT8 through NNCF's accuracy-controlled quantization (OpenVINO IR only).

    Quantizes like :func:`convert`, then reverts the quantizers that cost most on ``validation``
    images to float, until ``score`` of the model's outputs falls no more than ``max_drop`` below
    its FP32 value (or :data:`ACCURACY_CONTROL_MAX_ITERATIONS` is reached). ``score(outputs)``
    returns ``(metric, per-image values)``; fit passes the FP32-trained head's accuracy, so
    "accuracy" means what the gate means. The layers left in float are in
    ``info["accuracy_control"]["float_layers"]``. After ``budget_s`` seconds it stops: then no
    model file is written and ``info["accuracy_control"]["stopped"]`` says why (the caller keeps
    the plain INT8 model); None: the profile's ``quantization.accuracy_control_budget_s``.

    Raises:
        ConfigError: the target's runtime is not OpenVINO.
    """
    if target.runtime != "openvino":
        raise ConfigError(f"accuracy-controlled quantization needs runtime openvino (target {target.name})")
    ov = _ov_core()
    nncf = load_nncf()
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    budget_s = target.quantization.accuracy_control_budget_s if budget_s is None else budget_s

    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    batch = target.batch
    model = onnx_to_openvino(fp32_onnx, batch=batch)
    params = _nncf_params(target, len(calibration) // (batch or 1))
    # One model call per validation item, and NNCF ranks quantizers by per-item values: items are
    # single images (the static batch where the model has one), the value an item's mean score.
    step = batch or 1

    def validate(compiled, items) -> tuple[float, list[float]]:
        if time.perf_counter() - t0 > budget_s:
            raise _OutOfTime
        outs = [np.asarray(compiled(x)[0]) for x in items]
        metric, per_image = score(np.concatenate(outs).reshape(sum(len(o) for o in outs), -1))
        bounds = np.cumsum([0] + [len(o) for o in outs])
        return metric, [float(np.mean(per_image[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]

    val_items = [validation[i : i + step] for i in range(0, len(validation) - step + 1, step)]
    info = {
        "precision": "int8",
        "runtime": "openvino",
        "batch": batch or "dynamic",
        "engine": "nncf/openvino",
        "preset": target.quantization.preset,
        "calibration_images": int(len(calibration)),
    }
    try:
        with quantizer_output(quiet):
            restored = nncf.quantize_with_accuracy_control(
                model,
                _nncf_dataset(calibration, batch),
                nncf.Dataset(val_items),
                validate,
                max_drop=max_drop,
                preset=params["preset"],
                subset_size=params["subset_size"],
                fast_bias_correction=params["fast_bias_correction"],
                ignored_scope=params["ignored_scope"],
                advanced_quantization_parameters=params["advanced_parameters"],
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                    max_num_iterations=ACCURACY_CONTROL_MAX_ITERATIONS, num_ranking_workers=1
                ),
            )
    except _OutOfTime:
        info.update(
            accuracy_control={
                "max_drop": max_drop,
                "float_layers": [],
                "stopped": f"time budget of {budget_s:.0f} s spent",
            },
            seconds=round(time.perf_counter() - t0, 2),
        )
        return ConvertedModel(out_dir / f"{stem}.none", "openvino", "int8", info)
    dst = out_dir / f"{stem}.xml"
    ov.save_model(restored, str(dst), compress_to_fp16=False)
    layers = float_layers(ov.Core().read_model(str(dst)))  # as saved: quantized weights are int8 constants
    info.update(
        accuracy_control={"max_drop": max_drop, "float_layers": layers}, seconds=round(time.perf_counter() - t0, 2)
    )
    return ConvertedModel(dst, "openvino", "int8", info)


@dataclass(frozen=True)
class Restore:
    """Accuracy control's inputs: ``validation()`` (the validation items' model inputs),
    ``score(outputs)`` (the FP32-trained head's accuracy and per-item hits), the allowed drop, and
    ``key`` (what they depend on, for the model cache)."""

    validation: object
    score: object
    max_drop: float
    key: str


def converted_model(
    exported: ExportedBackbone,
    target: Target,
    cache_root: Path,
    calibration=None,
    *,
    restore: Restore | None = None,
    quiet: bool = False,
    mode: str = "auto",
) -> ConvertedModel:
    """The target's model of ``exported``, from the cache when the same model, settings and
    calibration items made it before (``calibration``: a :class:`edgetl.tasks.base.Calibration`
    for INT8; its inputs are decoded on a miss only). With ``restore``, NNCF's
    accuracy-controlled quantization makes it (:func:`convert_with_accuracy_control`)."""
    settings = {
        "precision": target.precision,
        "runtime": target.runtime,
        "batch": target.batch,
        "opset": target.opset,
        "fp32": file_digest(exported.path),
        "kind": exported.kind,
        "mode": mode,
    }
    int8 = target.precision == "int8"
    if int8:
        settings["quantization"] = dataclasses.asdict(target.quantization)
        settings["calibration"] = calibration.key if calibration is not None else None
    if restore is not None:
        settings["accuracy_control"] = restore.key
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    folder = Path(cache_root) / "models" / key
    info_path = folder / "info.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        return ConvertedModel(folder / info["file"], target.runtime, target.precision, info)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(folder)
    items = "texts" if exported.kind == TEXT else "images"
    status(
        f"converting the backbone to {target.precision} for {target.name} ({target.runtime})"
        + (f", calibrated on {calibration.count} training {items}" if int8 and calibration is not None else "")
        + (": accuracy-controlled" if restore is not None else ""),
        quiet=quiet,
    )
    needs_calibration = int8 and not (exported.kind == TEXT and target.runtime == "onnxruntime" and mode != "static")
    inputs = calibration.load() if needs_calibration and calibration is not None else None
    try:
        if restore is None:
            converted = convert(exported, target=target, out_dir=tmp, calibration=inputs, quiet=quiet, mode=mode)
        else:
            converted = convert_with_accuracy_control(
                exported.path,
                target=target,
                out_dir=tmp,
                calibration=inputs,
                validation=restore.validation(),
                score=restore.score,
                max_drop=restore.max_drop,
                quiet=quiet,
            )
        if calibration is not None and int8:
            converted.info["calibration"] = calibration.info
        converted.info["file"] = converted.path.name
        (tmp / "info.json").write_text(json.dumps(converted.info, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not publish_dir(tmp, folder, info_path.name):  # another process converted the same model first: use theirs
        info = json.loads(info_path.read_text())
        return ConvertedModel(folder / info["file"], target.runtime, target.precision, info)
    return ConvertedModel(folder / converted.path.name, converted.runtime, converted.precision, converted.info)
