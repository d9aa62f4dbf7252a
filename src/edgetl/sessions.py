"""One small interface over the inference runtimes a device may have (ONNX Runtime, OpenVINO).

``open_session(path, runtime=...)`` returns a :class:`Session` whose ``run(batch)`` takes a float32
NCHW array and returns the model's outputs as numpy arrays, whatever the runtime. Models with a
static batch size (what NPUs and TensorRT engines want) are fed in chunks of that size, padded, so
callers never care. No torch here: this module is on the device path.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .errors import ConfigError, MissingDependency, require

log = logging.getLogger("edgetl")

RUNTIMES = ("onnxruntime", "openvino")


def default_threads() -> int:
    """Intra-op threads: EDGETL_THREADS, else every core the process may use."""
    env = os.environ.get("EDGETL_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class Session:
    """A loaded model. ``run`` maps an input batch to a list of output arrays (in graph order)."""

    runtime: str = ""
    device: str = ""
    input_name: str = ""
    output_names: list[str]
    static_batch: int | None = None

    def _run(self, x: np.ndarray) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = self.static_batch
        if not n or x.shape[0] == n:
            return self._run(x)
        parts: list[list[np.ndarray]] = []
        for start in range(0, x.shape[0], n):
            chunk = x[start : start + n]
            real = chunk.shape[0]
            if real < n:  # pad the last chunk; the padded rows' outputs are dropped
                chunk = np.concatenate([chunk, np.zeros((n - real,) + chunk.shape[1:], np.float32)])
            parts.append([o[:real] for o in self._run(chunk)])
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The first output only (the feature vector or logits)."""
        return self.run(x)[0]


class OrtSession(Session):
    runtime = "onnxruntime"

    def __init__(self, path: Path, *, providers: list[str] | None = None, threads: int | None = None,
                 simulate: bool = False):
        ort = require("onnxruntime", extra="base", purpose="running ONNX models")
        opts = ort.SessionOptions()
        if simulate:
            # No graph rewriting: Quantize/DequantizeLinear run as ops, convolutions in float, so
            # the result is exact INT8 arithmetic without this host's integer-kernel shortcuts.
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # keep ORT's own warnings off the user's terminal
        available = ort.get_available_providers()
        wanted = [p for p in (providers or ["CPUExecutionProvider"]) if p in available]
        if not wanted:
            wanted = ["CPUExecutionProvider"]
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
        except Exception as exc:  # ORT raises its own exception types for bad files
            raise ConfigError(f"{path}: ONNX Runtime cannot load this model ({str(exc).splitlines()[0]})") from None
        self.device = self._sess.get_providers()[0]
        inp = self._sess.get_inputs()[0]
        self.input_name = inp.name
        self.output_names = [o.name for o in self._sess.get_outputs()]
        self.static_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        return self._sess.run(None, {self.input_name: x})


class OpenVinoSession(Session):
    runtime = "openvino"

    def __init__(self, path: Path, *, device: str = "CPU", threads: int | None = None):
        ov = require("openvino", extra="openvino", purpose="running OpenVINO models")
        core = ov.Core()
        available = core.available_devices
        chosen = device
        base = device.split(":")[-1].split(",")[0] if device.startswith(("AUTO", "MULTI", "HETERO")) else device
        if not device.startswith(("AUTO", "MULTI", "HETERO")) and base not in available:
            # The NPU profile must still run on a laptop without an NPU (and in CI): fall back to CPU
            # and say so once, instead of failing.
            log.warning("OpenVINO device %s not found (available: %s); running on CPU", device, ", ".join(available))
            chosen = "CPU"
        config = {}
        if chosen == "CPU":
            config["INFERENCE_NUM_THREADS"] = threads or default_threads()
        try:
            model = core.read_model(str(path))
            self._compiled = core.compile_model(model, chosen, config)
        except Exception as exc:
            raise ConfigError(f"{path}: OpenVINO cannot compile this model for {chosen} ({str(exc).splitlines()[0]})") from None
        self._request = self._compiled.create_infer_request()
        self.device = chosen
        inp = self._compiled.inputs[0]
        self.input_name = inp.get_any_name()
        self.output_names = [o.get_any_name() for o in self._compiled.outputs]
        ps = inp.get_partial_shape()
        self.static_batch = ps[0].get_length() if ps[0].is_static else None

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        res = self._request.infer({0: x})
        return [np.asarray(res[o]).copy() for o in self._compiled.outputs]


def open_session(
    path: str | Path,
    *,
    runtime: str | None = None,
    device: str | None = None,
    providers: list[str] | None = None,
    threads: int | None = None,
    simulate: bool = False,
) -> Session:
    """Load a model for inference.

    Args:
        path: ``.onnx`` (ONNX Runtime, or OpenVINO) or ``.xml`` (OpenVINO IR).
        runtime: ``onnxruntime`` or ``openvino``; inferred from the suffix when omitted.
        device: OpenVINO device (``CPU``, ``NPU``, ``GPU``, ``AUTO``); missing devices fall back to CPU.
        providers: ONNX Runtime execution providers in preference order; unavailable ones are skipped.
        threads: intra-op threads (default: all cores this process may use).
        simulate: ONNX Runtime only: run a QDQ graph unfused (exact INT8 numerics in float).

    Raises:
        ConfigError: unknown runtime or a model the runtime cannot load.
        MissingDependency: the runtime's package is not installed.
    """
    path = Path(path)
    if runtime is None:
        runtime = "openvino" if path.suffix == ".xml" else "onnxruntime"
    if runtime == "onnxruntime":
        return OrtSession(path, providers=providers, threads=threads, simulate=simulate)
    if runtime == "openvino":
        return OpenVinoSession(path, device=device or "CPU", threads=threads)
    if runtime == "tensorrt":
        raise MissingDependency(
            "runtime 'tensorrt' runs through ONNX Runtime's TensorRT provider on the device; "
            "use runtime onnxruntime with providers [TensorrtExecutionProvider, ...]"
        )
    raise ConfigError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
