"""The single-file model for apps: the backbone and a head graph fused into one model.

One writer for every task: a head's graph (``head.graph(opset, ir_version)``: ONNX, one input
fed by the backbone's first output, its own outputs the fused model's outputs; internal names
prefixed so nothing clashes) is merged
behind ``backbone.onnx``, or grafted onto ``backbone.xml`` for OpenVINO IR. Classification heads
give ``probabilities``; defect heads ``anomaly_map`` and ``score``. Runs on the device too
(``adapt`` regenerates the fused model for a new head), so it needs only ``onnx`` (ONNX bundles)
or ``openvino`` (IR bundles), never torch. edgetl's own ``predict`` uses the backbone + numpy head
for classification, and every fit checks the two agree (``report.json: fused_parity``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from ..errors import GateError, require


def set_metadata(model, meta: dict) -> None:
    """Store labels / preprocessing / version as ONNX metadata_props (JSON values)."""
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)


def _fuse_onnx(backbone_path: Path, head, out_path: Path, meta: dict) -> Path:
    onnx = require("onnx", extra="base", purpose="building ONNX graphs")
    backbone = onnx.load(str(backbone_path))
    opset = next(o.version for o in backbone.opset_import if o.domain in ("", "ai.onnx"))
    head = head.graph(opset, backbone.ir_version)
    del head.opset_import[:]
    head.opset_import.extend(backbone.opset_import)  # a QDQ backbone may use extra domains
    outputs = [o.name for o in head.graph.output]
    fused = onnx.compose.merge_models(
        backbone, head, io_map=[(backbone.graph.output[0].name, head.graph.input[0].name)], outputs=outputs
    )
    batch_dim = backbone.graph.input[0].type.tensor_type.shape.dim[0]
    for o in fused.graph.output:  # a static-batch backbone gives static-batch outputs
        o.type.tensor_type.shape.dim[0].CopyFrom(batch_dim)
    set_metadata(fused, meta)
    onnx.save(fused, str(out_path))
    return out_path


def _fuse_openvino(backbone_xml: Path, head, out_xml: Path, meta: dict) -> Path:
    ov = require("openvino", extra="openvino", purpose="building OpenVINO models")
    onnx = require("onnx", extra="base", purpose="building ONNX graphs")
    backbone = ov.Core().read_model(str(backbone_xml))
    head_onnx = head.graph(18, None)
    names = [o.name for o in head_onnx.graph.output]
    with tempfile.TemporaryDirectory() as tmp:
        hp = Path(tmp) / "head.onnx"
        onnx.save(head_onnx, str(hp))
        hmodel = ov.convert_model(str(hp))
    feature_source = backbone.outputs[0].get_node().input_value(0)
    param = hmodel.get_parameters()[0]
    for target_input in list(param.output(0).get_target_inputs()):
        target_input.replace_source_output(feature_source)
    fused = ov.Model(hmodel.get_results(), backbone.get_parameters(), "edgetl_fused")
    for out, name in zip(fused.outputs, names):
        out.get_tensor().set_names({name})
    for key, value in meta.items():
        fused.set_rt_info(value if isinstance(value, str) else json.dumps(value), ["edgetl", key])
    # Head constants stay FP32 whatever the backbone's precision: inverse covariances and distance
    # expansions lose in FP16 the differences they exist to measure.
    ov.save_model(fused, str(out_xml), compress_to_fp16=False)
    return out_xml


def fuse(backbone_path: Path, head, out_path: Path, *, meta: dict) -> Path:
    """Write backbone + head as one model at ``out_path`` with the backbone's kind of suffix
    (``.onnx``, or ``.xml`` + ``.bin``); returns its path.

    Args:
        backbone_path: the bundle's backbone model.
        head: a trained head; ``head.graph(opset, ir_version) -> onnx.ModelProto`` is its graph
            for that opset (``ir_version`` None: any).
        out_path: where to write (the suffix is replaced by the backbone's).
        meta: key/values stored in the model (ONNX metadata, OpenVINO rt_info).
    """
    if Path(backbone_path).suffix == ".xml":
        return _fuse_openvino(backbone_path, head, Path(out_path).with_suffix(".xml"), meta)
    return _fuse_onnx(backbone_path, head, Path(out_path).with_suffix(".onnx"), meta)


def model_files(path: str | Path) -> list[Path]:
    """A model file and its weights (``.xml`` + ``.bin`` for OpenVINO IR)."""
    path = Path(path)
    return [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]


# The single-file model may differ from backbone + numpy head only by float summation order and
# the runtime compiling one graph instead of two; a larger gap means the fused graph is wrong.
PARITY_TOLERANCE = 1e-2


def check_parity(par: dict, value: float, what: str, *, allow: bool) -> None:
    """Refuse a bundle whose fused model disagrees with its reference by more than
    :data:`PARITY_TOLERANCE` (``value``: the worst difference), unless ``allow``.

    Raises:
        GateError: the fused model is off.
    """
    par["passed"] = bool(value <= PARITY_TOLERANCE)
    if not par["passed"] and not allow:
        raise GateError(
            f"the single-file model disagrees with backbone + head ({what} {value:.3g} > "
            f"{PARITY_TOLERANCE}); this is a runtime or edgetl bug, please report it. --allow-drop "
            "writes the bundle anyway (predict uses backbone + head, which are right)"
        )


def parity(fused_probs: np.ndarray, ref_probs: np.ndarray) -> dict:
    """How far the fused model's probabilities are from backbone + numpy head."""
    diff = np.abs(fused_probs - ref_probs)
    return {
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "top1_agreement": float(np.mean(fused_probs.argmax(1) == ref_probs.argmax(1))) if diff.size else 1.0,
    }


def score_parity(fused_scores: np.ndarray, ref_scores: np.ndarray, fused_maps=None, ref_maps=None) -> dict:
    """Fused scores vs numpy ones, relative to the numpy score (their scale is the data's); maps
    relative to the largest numpy score, so one number covers both."""
    fused_scores, ref_scores = np.asarray(fused_scores).reshape(-1), np.asarray(ref_scores).reshape(-1)
    out = {
        "images": int(len(ref_scores)),
        "max_rel_score_diff": float(np.max(np.abs(fused_scores - ref_scores) / np.maximum(np.abs(ref_scores), 1e-12))),
    }
    if fused_maps is not None:
        scale = max(float(np.max(np.abs(ref_scores))), 1e-12)
        out["max_map_diff_rel"] = float(np.max(np.abs(fused_maps - ref_maps)) / scale)
    return out
