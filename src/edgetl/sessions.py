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


_SATURATES: bool | None = None


def cpu_int8_saturates() -> bool:
    """Whether this CPU's INT8 kernels can saturate: x86 without VNNI.

    Without VNNI, x86 INT8 convolutions multiply u8 x s8 pairs into a *saturating* int16 sum
    (``vpmaddubsw``), so a model quantized with full 8-bit weights computes different numbers here
    than on an ARM dot-product CPU, a TensorRT GPU, an NPU or a VNNI CPU, which all accumulate in
    int32. Set ``EDGETL_EXACT_INT8=0`` or ``1`` to override the detection.
    """
    global _SATURATES
    env = os.environ.get("EDGETL_EXACT_INT8")
    if env in ("0", "1"):
        return env == "1"
    if _SATURATES is None:
        import platform

        if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
            _SATURATES = False
        else:
            try:
                flags = Path("/proc/cpuinfo").read_text()
            except OSError:  # not Linux: assume a current CPU
                flags = "avx_vnni"
            _SATURATES = not any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    return _SATURATES


class Session:
    """A loaded model. ``run`` maps an input batch to a list of output arrays (in graph order).

    ``emulated`` is True when INT8 runs as exact float emulation instead of this host's kernels.
    """

    runtime: str = ""
    device: str = ""
    emulated: bool = False
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
                 simulate: bool = False, exact: bool = False):
        ort = require("onnxruntime", extra="base", purpose="running ONNX models")
        available = ort.get_available_providers()
        wanted = [p for p in (providers or ["CPUExecutionProvider"]) if p in available]
        if not wanted:
            wanted = ["CPUExecutionProvider"]
        simulate = simulate or (exact and wanted[0] == "CPUExecutionProvider" and cpu_int8_saturates())
        self.emulated = simulate
        opts = ort.SessionOptions()
        if simulate:
            # No graph rewriting: Quantize/DequantizeLinear run as ops, convolutions in float, so
            # the result is exact INT8 arithmetic without this host's integer-kernel shortcuts.
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # keep ORT's own warnings off the user's terminal
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

    def __init__(self, path: Path, *, device: str = "CPU", threads: int | None = None, simulate: bool = False,
                 exact: bool = False):
        ov = require("openvino", extra="openvino", purpose="running OpenVINO models")
        core = ov.Core()
        available = core.available_devices
        # Exact INT8 numerics: the CPU plugin with its low-precision passes off runs every
        # FakeQuantize as float ops, which is what an NPU (or a VNNI CPU) computes, free of this
        # host's saturating AVX2 kernels. Fit-time features only; never the device path.
        chosen = "CPU" if simulate else device
        if not chosen.startswith(("AUTO", "MULTI", "HETERO")) and chosen not in available:
            # The NPU profile must still run on a laptop without an NPU (and in CI): fall back to CPU
            # and say so once, instead of failing.
            log.warning("OpenVINO device %s not found (available: %s); running on CPU", device, ", ".join(available))
            chosen = "CPU"
        simulate = simulate or (exact and chosen == "CPU" and cpu_int8_saturates())
        self.emulated = simulate
        config: dict = {}
        if chosen == "CPU":
            config["INFERENCE_NUM_THREADS"] = threads or default_threads()
        if simulate:
            config["LP_TRANSFORMS_MODE"] = False
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
    exact: bool = False,
) -> Session:
    """Load a model for inference.

    Args:
        path: ``.onnx`` (ONNX Runtime, or OpenVINO) or ``.xml`` (OpenVINO IR).
        runtime: ``onnxruntime`` or ``openvino``; inferred from the suffix when omitted.
        device: OpenVINO device (``CPU``, ``NPU``, ``GPU``, ``AUTO``); missing devices fall back to CPU.
        providers: ONNX Runtime execution providers in preference order; unavailable ones are skipped.
        threads: intra-op threads (default: all cores this process may use).
        simulate: exact INT8 numerics in float (ONNX Runtime: the QDQ graph unfused; OpenVINO: on
            the CPU with low-precision transformations off), for fit-time features.
        exact: the model's INT8 numbers must be those of an int32-accumulating device (the
            profile's ``fit_features = "simulated"``): emulate when the session would run on a CPU
            whose INT8 kernels saturate (:func:`cpu_int8_saturates`), run natively otherwise.

    Raises:
        ConfigError: unknown runtime or a model the runtime cannot load.
        MissingDependency: the runtime's package is not installed.
    """
    path = Path(path)
    if runtime is None:
        runtime = "openvino" if path.suffix == ".xml" else "onnxruntime"
    if runtime == "onnxruntime":
        return OrtSession(path, providers=providers, threads=threads, simulate=simulate, exact=exact)
    if runtime == "openvino":
        return OpenVinoSession(path, device=device or "CPU", threads=threads, simulate=simulate, exact=exact)
    if runtime == "tensorrt":
        raise MissingDependency(
            "runtime 'tensorrt' runs through ONNX Runtime's TensorRT provider on the device; "
            "use runtime onnxruntime with providers [TensorrtExecutionProvider, ...]"
        )
    raise ConfigError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
