"""The anomaly head as a graph: patch features in, anomaly map and image score out, fused with the
backbone into one model (``model.onnx``, or ``model.xml`` for OpenVINO bundles).

The graph computes exactly what :meth:`edgetl.anomaly.AnomalyHead.maps` computes, op for op in the
same order, in float32 (the scoring part is never quantized: a Mahalanobis form or a squared
distance expansion in INT8 would lose the small differences it exists to find):

* patchcore: ``d2 = (sum(x*x) + x @ (-2 M^T)) + sum(M*M)``; ``ReduceMin`` over the bank; ``Sqrt``.
* padim: ``D = x - mean``; ``sum((D @ inv) * D)`` with the inverse covariances as constants
  (a batched MatMul over positions); ``Sqrt``.
* both: ``map = (A @ S) @ A^T`` (upsampling + Gaussian smoothing as two constant matrices);
  ``score = ReduceMax(map)``.

Only standard ONNX ops (Gather, Reshape, Transpose, Sub, Mul, Add, MatMul, Reduce*, Max, Sqrt), so
every runtime and converter reads it. No torch; runs on the device (``adapt`` regenerates it).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from .errors import require
from .fuse import set_metadata

PREFIX = "anomaly/"
INPUT = PREFIX + "features"
OUTPUTS = ("anomaly_map", "score")


def scoring_graph(head, *, opset: int = 18, ir_version: int | None = None):
    """The head's ONNX model: input ``anomaly/features`` (N, C, H, W) -> ``anomaly_map`` (N, S, S),
    ``score`` (N,). Raw scores: the threshold stays in the manifest."""
    onnx = require("onnx", extra="base", purpose="building ONNX graphs")
    helper, TP = onnx.helper, onnx.TensorProto
    nodes, inits = [], []
    counter = [0]

    def name(tag: str) -> str:
        counter[0] += 1
        return f"{PREFIX}{tag}_{counter[0]}"

    def const(tag: str, value) -> str:
        arr = np.asarray(value)
        n = name(tag)
        inits.append(onnx.numpy_helper.from_array(arr, n))
        return n

    def op(kind: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or name(kind.lower())
        nodes.append(helper.make_node(kind, inputs, [out], name=name(kind), **attrs))
        return out

    def reduce(kind: str, x: str, axes: list[int], keepdims: int, out: str | None = None) -> str:
        # ReduceSum takes axes as an input from opset 13, ReduceMin/Max only from 18.
        if kind == "ReduceSum" or opset >= 18:
            return op(kind, [x, const("axes", np.array(axes, np.int64))], out, keepdims=keepdims)
        return op(kind, [x], out, axes=axes, keepdims=keepdims)

    C = head.channels_in
    H, W = head.grid
    P = H * W
    zero = const("zero", np.array(0.0, np.float32))
    if head.kind == "patchcore":
        mt2, mm = head._knn_constants()
        x = op("Reshape", [INPUT, const("shape", np.array([0, C, P], np.int64))])
        x = op("Transpose", [x], perm=[0, 2, 1])  # (N, P, C)
        xx = reduce("ReduceSum", op("Mul", [x, x]), [-1], 1)
        xm = op("MatMul", [x, const("memory_t_x_minus2", mt2)])  # (N, P, K)
        d2 = op("Add", [op("Add", [xx, xm]), const("memory_sq", mm)])
        d2 = reduce("ReduceMin", d2, [-1], 0)  # (N, P)
    else:
        mean, inv = head.padim_params()
        ch = head.arrays["channels"].astype(np.int64)
        x = INPUT
        if len(ch) != C or np.any(ch != np.arange(C)):
            x = op("Gather", [x, const("channels", ch)], axis=1)
        x = op("Reshape", [x, const("shape", np.array([0, len(ch), P], np.int64))])  # (N, d, P)
        if inv.ndim == 3:  # one Gaussian per position: work position-major
            x = op("Transpose", [x], perm=[2, 0, 1])  # (P, N, d)
            D = op("Sub", [x, const("mean", mean[:, None, :])])
            q = reduce("ReduceSum", op("Mul", [op("MatMul", [D, const("inv_cov", inv)]), D]), [-1], 0)  # (P, N)
            d2 = op("Transpose", [q], perm=[1, 0])
        else:
            x = op("Transpose", [x], perm=[0, 2, 1])  # (N, P, d)
            D = op("Sub", [x, const("mean", mean[None])])
            d2 = reduce("ReduceSum", op("Mul", [op("MatMul", [D, const("inv_cov", inv)]), D]), [-1], 0)
    s = op("Sqrt", [op("Max", [d2, zero])])
    s = op("Reshape", [s, const("grid", np.array([-1, H, W], np.int64))])
    A = head.operator
    m = op("MatMul", [const("upsample_blur", A), s])  # (N, S, W)
    m = op("MatMul", [m, const("upsample_blur_t", np.ascontiguousarray(A.T))], OUTPUTS[0])  # (N, S, S)
    reduce("ReduceMax", m, [1, 2], 0, OUTPUTS[1])
    S = head.size
    graph = helper.make_graph(
        nodes, f"edgetl_anomaly_{head.kind}",
        [helper.make_tensor_value_info(INPUT, TP.FLOAT, ["batch", C, H, W])],
        [helper.make_tensor_value_info(OUTPUTS[0], TP.FLOAT, ["batch", S, S]),
         helper.make_tensor_value_info(OUTPUTS[1], TP.FLOAT, ["batch"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgetl")
    if ir_version is not None:
        model.ir_version = ir_version
    return model


def fuse_anomaly_onnx(backbone_path: Path, head, out_path: Path, *, meta: dict) -> Path:
    """backbone.onnx (patch features, any precision) + scoring graph -> one ONNX model."""
    onnx = require("onnx", extra="base", purpose="building ONNX graphs")
    backbone = onnx.load(str(backbone_path))
    opset = next(o.version for o in backbone.opset_import if o.domain in ("", "ai.onnx"))
    sg = scoring_graph(head, opset=opset, ir_version=backbone.ir_version)
    del sg.opset_import[:]
    sg.opset_import.extend(backbone.opset_import)  # a QDQ backbone may use extra domains
    fused = onnx.compose.merge_models(backbone, sg, io_map=[(backbone.graph.output[0].name, INPUT)],
                                      outputs=list(OUTPUTS))
    batch_dim = backbone.graph.input[0].type.tensor_type.shape.dim[0]
    for o in fused.graph.output:  # a static-batch backbone gives static-batch outputs
        o.type.tensor_type.shape.dim[0].CopyFrom(batch_dim)
    set_metadata(fused, meta)
    onnx.save(fused, str(out_path))
    return out_path


def fuse_anomaly_openvino(backbone_xml: Path, head, out_xml: Path, *, meta: dict) -> Path:
    """backbone.xml (IR) + scoring graph -> model.xml: the scoring graph is grafted onto the IR."""
    ov = require("openvino", extra="openvino", purpose="building OpenVINO models")
    onnx = require("onnx", extra="base", purpose="building ONNX graphs")
    core = ov.Core()
    backbone = core.read_model(str(backbone_xml))
    with tempfile.TemporaryDirectory() as tmp:
        sp = Path(tmp) / "scoring.onnx"
        onnx.save(scoring_graph(head, opset=18), str(sp))
        smodel = ov.convert_model(str(sp))
    feature_source = backbone.outputs[0].get_node().input_value(0)
    param = smodel.get_parameters()[0]
    for target_input in list(param.output(0).get_target_inputs()):
        target_input.replace_source_output(feature_source)
    fused = ov.Model(smodel.get_results(), backbone.get_parameters(), "edgetl_anomaly")
    for out, nm in zip(fused.outputs, OUTPUTS):
        out.get_tensor().set_names({nm})
    for key, value in meta.items():
        fused.set_rt_info(value if isinstance(value, str) else json.dumps(value), ["edgetl", key])
    # The scoring constants stay FP32 whatever the backbone's precision: inverse covariances and
    # distance expansions lose the differences they measure in FP16.
    ov.save_model(fused, str(out_xml), compress_to_fp16=False)
    return out_xml


def fuse_anomaly(backbone_path: Path, head, out_path: Path, *, meta: dict) -> Path:
    """Write the fused model next to the backbone's kind (``.onnx`` or ``.xml`` + ``.bin``)."""
    if Path(backbone_path).suffix == ".xml":
        return fuse_anomaly_openvino(backbone_path, head, Path(out_path).with_suffix(".xml"), meta=meta)
    return fuse_anomaly_onnx(backbone_path, head, Path(out_path).with_suffix(".onnx"), meta=meta)


def fused_parity(fused_session, backbone_session, head, x: np.ndarray, shape: tuple[int, int, int]) -> dict:
    """Fused model vs backbone + numpy head on the same inputs.

    Scores are compared relative to the numpy score (their scale is the data's); maps relative to
    the largest numpy score, so one number covers both.
    """
    maps_f, scores_f = fused_session.run(x)[:2]
    F = backbone_session(x).reshape(len(x), *shape)
    maps_r, scores_r = head.maps(F)
    scale = max(float(np.max(np.abs(scores_r))), 1e-12)
    return {
        "images": int(len(x)),
        "max_rel_score_diff": float(np.max(np.abs(scores_f.reshape(-1) - scores_r) / np.maximum(np.abs(scores_r), 1e-12))),
        "max_map_diff_rel": float(np.max(np.abs(maps_f - maps_r)) / scale),
    }
