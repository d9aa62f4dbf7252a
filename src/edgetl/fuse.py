"""The single-file model for apps: backbone + head + softmax fused into one graph.

Runs on the device too (``adapt`` regenerates it for a new head), so it needs only ``onnx``
(ONNX bundles) or ``openvino`` (IR bundles), never torch. edgetl's own ``predict`` uses the
backbone + numpy head instead, and every export checks the two agree (``report.json: parity``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import require


def head_graph(head, *, opset: int, ir_version: int | None = None, with_softmax: bool = True):
    """The head's ONNX graph (input ``features``), with a softmax output ``probabilities``."""
    onnx = require("onnx", extra="base", purpose="building ONNX graphs")
    g = head.to_onnx(input_name="features", output_name="logits", opset=opset)
    if with_softmax:
        g.graph.node.append(onnx.helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1, name="head_softmax"))
        k = len(head.labels)
        del g.graph.output[:]
        g.graph.output.append(onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, ["batch", k]))
    if ir_version is not None:
        g.ir_version = ir_version
    return g


def set_metadata(model, meta: dict) -> None:
    """Store labels / preprocessing / version as ONNX metadata_props (JSON values)."""
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)


def fuse_onnx(backbone_path: Path, head, out_path: Path, *, meta: dict) -> Path:
    """backbone.onnx + head -> model.onnx with outputs ``probabilities`` (and ``features``)."""
    onnx = require("onnx", extra="base", purpose="building ONNX graphs")
    backbone = onnx.load(str(backbone_path))
    opset = next(o.version for o in backbone.opset_import if o.domain in ("", "ai.onnx"))
    feat_out = backbone.graph.output[0].name
    hg = head_graph(head, opset=opset, ir_version=backbone.ir_version)
    # Keep the backbone's own opset imports (a QDQ graph may use extra domains).
    del hg.opset_import[:]
    hg.opset_import.extend(backbone.opset_import)
    hg = onnx.compose.add_prefix(hg, prefix="head/")
    fused = onnx.compose.merge_models(
        backbone, hg, io_map=[(feat_out, "head/features")],
        outputs=["head/probabilities"],
    )
    # Static-batch backbones give a fixed batch; make the head outputs agree with the input.
    batch_dim = backbone.graph.input[0].type.tensor_type.shape.dim[0]
    for o in fused.graph.output:
        d0 = o.type.tensor_type.shape.dim[0]
        d0.CopyFrom(batch_dim)
    fused.graph.output[0].name = "head/probabilities"
    set_metadata(fused, meta)
    onnx.save(fused, str(out_path))
    return out_path


def fuse_openvino(backbone_xml: Path, head, out_xml: Path, *, meta: dict) -> Path:
    """backbone.xml (IR) + head -> model.xml: the head's ONNX graph is grafted onto the IR."""
    ov = require("openvino", extra="openvino", purpose="building OpenVINO models")
    import tempfile

    core = ov.Core()
    backbone = core.read_model(str(backbone_xml))
    with tempfile.TemporaryDirectory() as tmp:
        hp = Path(tmp) / "head.onnx"
        onnx = require("onnx", extra="base", purpose="building ONNX graphs")
        onnx.save(head_graph(head, opset=18), str(hp))
        hmodel = ov.convert_model(str(hp))
    feature_source = backbone.outputs[0].get_node().input_value(0)
    param = hmodel.get_parameters()[0]
    for target_input in list(param.output(0).get_target_inputs()):
        target_input.replace_source_output(feature_source)
    fused = ov.Model(hmodel.get_results(), backbone.get_parameters(), "edgetl_fused")
    fused.outputs[0].get_tensor().set_names({"probabilities"})
    for key, value in meta.items():
        fused.set_rt_info(value if isinstance(value, str) else json.dumps(value), ["edgetl", key])
    ov.save_model(fused, str(out_xml), compress_to_fp16=False)
    return out_xml


def fuse(backbone_path: Path, head, out_path: Path, *, meta: dict) -> Path:
    """Write the fused model to ``out_path`` with the backbone's kind of suffix (``.onnx``, or
    ``.xml`` + ``.bin``); returns its path."""
    if backbone_path.suffix == ".xml":
        return fuse_openvino(backbone_path, head, Path(out_path).with_suffix(".xml"), meta=meta)
    return fuse_onnx(backbone_path, head, Path(out_path).with_suffix(".onnx"), meta=meta)


# The single-file model may differ from backbone + numpy head only by float summation order and
# the runtime compiling one graph instead of two; a larger gap means the fused graph is wrong.
PARITY_TOLERANCE = 1e-2


def check_parity(par: dict, value: float, what: str, *, allow: bool) -> None:
    """Refuse a bundle whose fused model disagrees with its reference by more than
    :data:`PARITY_TOLERANCE` (``value``: the worst difference), unless ``allow``.

    Raises:
        GateError: the fused model is off.
    """
    from .errors import GateError

    par["passed"] = bool(value <= PARITY_TOLERANCE)
    if not par["passed"] and not allow:
        raise GateError(f"the single-file model disagrees with backbone + head ({what} {value:.3g} > "
                        f"{PARITY_TOLERANCE}); this is a runtime or edgetl bug, please report it. --allow-drop "
                        "writes the bundle anyway (predict uses backbone + head, which are right)")


def parity(fused_probs: np.ndarray, ref_probs: np.ndarray) -> dict:
    """How far the fused model's probabilities are from backbone + numpy head."""
    diff = np.abs(fused_probs - ref_probs)
    return {
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "top1_agreement": float(np.mean(fused_probs.argmax(1) == ref_probs.argmax(1))) if diff.size else 1.0,
    }
