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
:func:`edgetl.core.fuse.fuse` puts it behind the backbone. :class:`GraphBuilder` and
:func:`patch_scores_nodes` are shared with the combined detector's graph (:mod:`.defect`).
"""

from __future__ import annotations

import numpy as np

from ..errors import require
from . import registry

PREFIX = "anomaly/"
INPUT = PREFIX + "features"
OUTPUTS = ("anomaly_map", "score")


class GraphBuilder:
    """Nodes and constants of one head graph, every internal name prefixed so nothing clashes with
    the backbone it is fused behind."""

    def __init__(self, opset: int, prefix: str = PREFIX):
        self.onnx = require("onnx", extra="base", purpose="building ONNX graphs")
        self.opset, self.prefix = opset, prefix
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def name(self, tag: str) -> str:
        self._n += 1
        return f"{self.prefix}{tag}_{self._n}"

    def const(self, tag: str, value) -> str:
        n = self.name(tag)
        self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(value), n))
        return n

    def op(self, kind: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.name(kind.lower())
        self.nodes.append(self.onnx.helper.make_node(kind, inputs, [out], name=self.name(kind), **attrs))
        return out

    def reduce(self, kind: str, x: str, axes: list[int], keepdims: int, out: str | None = None) -> str:
        # ReduceSum takes axes as an input from opset 13, ReduceMin/Max/Mean only from 18.
        if kind == "ReduceSum" or self.opset >= 18:
            return self.op(kind, [x, self.const("axes", np.array(axes, np.int64))], out, keepdims=keepdims)
        return self.op(kind, [x], out, axes=axes, keepdims=keepdims)

    def model(self, graph_name: str, inputs: list, outputs: list, ir_version: int | None):
        helper = self.onnx.helper
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], producer_name="edgetl")
        if ir_version is not None:
            model.ir_version = ir_version
        return model


def patch_scores_nodes(b: GraphBuilder, head, x: str) -> tuple[str, str]:
    """Nodes scoring patch features ``x`` (N, C, H, W) with ``head``: (map (N, S, S), score (N,))
    names, in the order and precision of :meth:`AnomalyHead.maps`."""
    H, W = head.grid
    op, const, reduce = b.op, b.const, b.reduce
    zero = const("zero", np.array(0.0, np.float32))
    d2 = registry.get(head.kind, "patch").graph_d2(b, head, x)  # (N, P)
    s = op("Sqrt", [op("Max", [d2, zero])])
    s = op("Reshape", [s, const("grid", np.array([-1, H, W], np.int64))])
    A = head.operator
    m = op("MatMul", [const("upsample_blur", A), s])  # (N, S, W)
    m = op("MatMul", [m, const("upsample_blur_t", np.ascontiguousarray(A.T))])  # (N, S, S)
    return m, reduce("ReduceMax", m, [1, 2], 0)


def scoring_graph(head, *, opset: int = 18, ir_version: int | None = None):
    """The head's ONNX model: input ``anomaly/features`` (N, C, H, W) -> ``anomaly_map`` (N, S, S),
    ``score`` (N,). Raw scores: the threshold stays in the manifest."""
    b = GraphBuilder(opset)
    TP, helper = b.onnx.TensorProto, b.onnx.helper
    m, s = patch_scores_nodes(b, head, INPUT)
    b.op("Identity", [m], OUTPUTS[0])
    b.op("Identity", [s], OUTPUTS[1])
    C, (H, W), S = head.channels_in, head.grid, head.size
    return b.model(
        f"edgetl_anomaly_{head.kind}",
        [helper.make_tensor_value_info(INPUT, TP.FLOAT, ["batch", C, H, W])],
        [
            helper.make_tensor_value_info(OUTPUTS[0], TP.FLOAT, ["batch", S, S]),
            helper.make_tensor_value_info(OUTPUTS[1], TP.FLOAT, ["batch"]),
        ],
        ir_version,
    )
