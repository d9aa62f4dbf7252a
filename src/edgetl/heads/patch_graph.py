"""The anomaly head as a graph: patch features in, anomaly map and image score out, fused with the
backbone into one model (``model.onnx``, or ``model.xml`` for OpenVINO bundles).

The graph computes exactly what :meth:`edgetl.heads.patch.AnomalyHead.maps` computes, op for op in the
same order, in float32 (the scoring part is never quantized: a Mahalanobis form or a squared
distance expansion in INT8 would lose the small differences it exists to find):

* patchcore: ``d2 = (sum(x*x) + x @ (-2 M^T)) + sum(M*M)``; ``ReduceMin`` over the bank; ``Sqrt``.
* padim: ``D = x - mean``; ``sum((D @ inv) * D)`` with the inverse covariances as constants
  (a batched MatMul over positions); ``Sqrt``.
* both: ``map = (A @ S) @ A^T`` (upsampling + Gaussian smoothing as two constant matrices);
  ``score = ReduceMax(map)``.

Only standard ONNX ops (Gather, Reshape, Transpose, Sub, Mul, Add, MatMul, Reduce*, Max, Sqrt), so
every runtime and converter reads it. No torch; runs on the device (``adapt`` regenerates it).
:func:`edgetl.core.fuse.fuse` puts it behind the backbone.
"""

from __future__ import annotations

import numpy as np

from ..errors import require

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
        mt2, mm = head.knn_constants()
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
