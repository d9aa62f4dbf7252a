"""TensorRT engine-build scripts written into Jetson bundles.

A TensorRT engine is specific to the GPU and the TensorRT version, so it is built on the device
from the bundle's explicitly quantized (QDQ, symmetric INT8) ONNX graph. The bundle carries two
equivalent ways to do that: ``build_engine.sh`` (trtexec, ships with JetPack) and
``build_engine.py`` (the tensorrt Python API). At run time ``edgetl predict`` uses ONNX Runtime's
TensorRT execution provider when the device's onnxruntime-gpu has it (providers in the profile),
falling back to CUDA and then CPU.
"""

from __future__ import annotations

from pathlib import Path

_SH = """#!/usr/bin/env bash
# Build a TensorRT engine for this bundle ON THE JETSON (engines are tied to GPU + TensorRT version).
# Usage: ./build_engine.sh [model.onnx|backbone.onnx]   (default: the fused model)
set -euo pipefail
cd "$(dirname "$0")"
ONNX="${{1:-{fused}}}"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
# --stronglyTyped: every tensor keeps the type the graph gives it, so INT8 is where the Q/DQ nodes
# put it (explicit quantization, scales from the graph, no calibrator) and the float layers stay
# FP32, which is what the head was trained on. Strong typing builds on TensorRT 10 (JetPack 6
# ships 10.3) and is the only mode TensorRT 11 has (it removed --int8 / --fp16).
"$TRTEXEC" --onnx="$ONNX" --saveEngine="${{ONNX%.onnx}}.engine" --stronglyTyped \\
  --memPoolSize=workspace:{workspace}M --builderOptimizationLevel={level} --skipInference
echo "engine written to ${{ONNX%.onnx}}.engine"
"""

_PY = '''"""Build a TensorRT engine for this bundle with the tensorrt Python API (run it on the Jetson).

Usage: python3 build_engine.py [model.onnx|backbone.onnx]   (default: the fused model)
"""
import sys

import tensorrt as trt

onnx_path = sys.argv[1] if len(sys.argv) > 1 else "{fused}"
logger = trt.Logger(trt.Logger.WARNING)
builder = trt.Builder(logger)
# Strongly typed: INT8 exactly where the graph's Q/DQ nodes put it, FP32 elsewhere (what the head
# learned). TensorRT 10 has it and TensorRT 11 requires it: no precision builder flags are set.
network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
parser = trt.OnnxParser(network, logger)
with open(onnx_path, "rb") as f:
    if not parser.parse(f.read()):
        for i in range(parser.num_errors):
            print(parser.get_error(i), file=sys.stderr)
        sys.exit("could not parse " + onnx_path)
config = builder.create_builder_config()
config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, {workspace} << 20)
config.builder_optimization_level = {level}
engine = builder.build_serialized_network(network, config)
if engine is None:
    sys.exit("engine build failed")
out = onnx_path[: -len(".onnx")] + ".engine"
with open(out, "wb") as f:
    f.write(engine)
print("engine written to", out)
'''


def write_build_scripts(folder: Path, *, fused: str, workspace_mb: int, level: int) -> list[Path]:
    """Write build_engine.sh / build_engine.py into a bundle being staged."""
    kw = dict(fused=fused, workspace=workspace_mb, level=level)
    sh = folder / "build_engine.sh"
    sh.write_text(_SH.format(**kw))
    sh.chmod(0o755)
    py = folder / "build_engine.py"
    py.write_text(_PY.format(**kw))
    return [sh, py]
