"""One small interface over the inference runtimes a device may have (ONNX Runtime, OpenVINO).

``open_session(path, runtime=...)`` returns a :class:`Session` whose ``run(x)`` takes a float32
NCHW array (or, for models with several inputs such as text encoders, a dict of named arrays) and
returns the model's outputs as numpy arrays, whatever the runtime. Models with a static batch size
(what NPUs and TensorRT engines want) are fed in chunks of that size, padded, so callers never care.

Precision is pinned, never left to the runtime. OpenVINO's CPU plugin runs every non-quantized op
in bfloat16 by default on CPUs with native bf16 (AVX-512 BF16, AMX: Zen 4 and later, Sapphire
Rapids and later), so an unpinned "FP32" model computes different numbers on such a machine than
on an AVX2 laptop (feature cosine 0.998, probabilities up to 0.35 apart). Every session here asks
for the float precision the bundle records (``f32`` unless a profile opts into ``bf16``/``f16``)
and reads back what the compiled model really runs (:attr:`Session.float_precision`), which the
report and ``bench`` show. ONNX Runtime's CPU provider has no implicit down-cast; its one opt-in
(bf16 fast math for ARM64 GEMMs) is set off explicitly.

No torch here: this module is on the device path.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError, MissingDependency, require
from .backbone import TEXT

log = logging.getLogger("edgetl")

RUNTIMES = ("onnxruntime", "openvino")
# What non-quantized ops compute in. f32 is the default everywhere; bf16/f16 are opt-in per profile.
FLOAT_PRECISIONS = ("f32", "bf16", "f16")
_OV_TYPE_NAMES = {"f32": "f32", "float32": "f32", "bf16": "bf16", "bfloat16": "bf16", "f16": "f16", "float16": "f16"}


def default_threads() -> int:
    """Intra-op threads: EDGETL_THREADS, else every core the process may use."""
    from .environment import env_number

    threads = env_number("EDGETL_THREADS", 0, lo=1, hi=4096, integer=True)
    if threads:
        return int(threads)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume a current CPU
        return "avx_vnni avx512_bf16"


def _is_x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


_SATURATES: bool | None = None


def cpu_int8_saturates() -> bool:
    """Whether this CPU's INT8 kernels can saturate: x86 without VNNI.

    Without VNNI, x86 INT8 convolutions multiply u8 x s8 pairs into a *saturating* int16 sum
    (``vpmaddubsw``), so a model quantized with full 8-bit weights computes different numbers here
    than on an ARM dot-product CPU, a TensorRT GPU, an NPU or a VNNI CPU, which all accumulate in
    int32 (``vpdpbusd`` on AVX-512 VNNI / AVX-VNNI). Set ``EDGETL_EXACT_INT8=0`` or ``1`` to
    override the detection.
    """
    global _SATURATES
    env = os.environ.get("EDGETL_EXACT_INT8")
    if env in ("0", "1"):
        return env == "1"
    if _SATURATES is None:
        if not _is_x86():
            _SATURATES = False
        else:
            flags = _cpu_flags()
            _SATURATES = not any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    return _SATURATES


def cpu_family() -> dict:
    """What decides this CPU's numbers and speed: the ISA features edgetl's choices depend on.

    ``int8``: ``int32`` (VNNI, AMX, ARM dot product: exact) or ``saturating-int16`` (AVX2 only);
    ``bf16``: whether the CPU runs bfloat16 natively (OpenVINO's default float precision there).
    """
    import platform

    flags = _cpu_flags() if _is_x86() else ""
    return {
        "machine": platform.machine(),
        "int8": "saturating-int16" if cpu_int8_saturates() else "int32",
        "native_bf16": bool(_is_x86() and any(f in flags for f in ("avx512_bf16", "amx_bf16"))),
        "amx": "amx_int8" in flags,
    }


class Session:
    """A loaded model. ``run`` maps an input batch to a list of output arrays (in graph order).

    Attributes:
        runtime: ``onnxruntime`` or ``openvino``.
        device: the ORT provider or OpenVINO device that runs it.
        emulated: INT8 runs as exact float emulation instead of this host's integer kernels.
        float_precision: what non-quantized ops really compute in, read back from the runtime
            (``f32``, ``bf16`` or ``f16``); ``requested_precision`` is what edgetl asked for.
        input_names: the model's inputs, in graph order.
    """

    runtime: str = ""
    device: str = ""
    emulated: bool = False
    float_precision: str = "f32"
    requested_precision: str = "f32"
    input_name: str = ""
    input_names: list[str]
    output_names: list[str]
    static_batch: int | None = None
    input_shape: tuple = ()  # the first input's dimensions, None where dynamic
    # False for a graph that quantizes activations at run time with one scale per tensor
    # (ONNX Runtime's dynamic INT8): there a row's result depends on the other rows of its batch,
    # padding included, so callers that want one answer per input run it one input at a time.
    rows_independent: bool = True

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, x: np.ndarray | dict[str, np.ndarray]) -> list[np.ndarray]:
        if isinstance(x, dict):  # several named inputs (text encoders): no static-batch padding
            return self._run(x)
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = self.static_batch
        if not n or x.shape[0] == n:
            return self._run({self.input_name: x})
        parts: list[list[np.ndarray]] = []
        for start in range(0, x.shape[0], n):
            chunk = x[start : start + n]
            real = chunk.shape[0]
            if real < n:  # pad the last chunk; the padded rows' outputs are dropped
                chunk = np.concatenate([chunk, np.zeros((n - real,) + chunk.shape[1:], np.float32)])
            parts.append([o[:real] for o in self._run({self.input_name: chunk})])
        return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The first output only (the feature vector or logits)."""
        return self.run(x)[0]

    def describe(self) -> dict:
        """What ran, for reports: runtime, device, float precision asked for and read back, INT8 path."""
        return {
            "runtime": self.runtime,
            "device": self.device,
            "float_precision": self.float_precision,
            "requested_float_precision": self.requested_precision,
            "int8": "exact emulation" if self.emulated else "native kernels",
        }


def _check_precision(float_precision: str) -> str:
    if float_precision not in FLOAT_PRECISIONS:
        raise ConfigError(f"float precision {float_precision!r} is not one of {', '.join(FLOAT_PRECISIONS)}")
    return float_precision


class OrtSession(Session):
    runtime = "onnxruntime"

    def __init__(
        self,
        path: Path,
        *,
        providers: list[str] | None = None,
        threads: int | None = None,
        simulate: bool = False,
        exact: bool = False,
        float_precision: str = "f32",
        model_bytes: bytes | None = None,
    ):
        ort = require("onnxruntime", extra="base", purpose="running ONNX models")
        self.requested_precision = _check_precision(float_precision)
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
        # The CPU provider's only implicit down-cast is this ARM64 opt-in; pinned off so f32 is f32.
        opts.add_session_config_entry("mlas.enable_gemm_fastmath_arm64_bfloat16", "0")
        try:
            self._sess = ort.InferenceSession(
                model_bytes if model_bytes is not None else str(path), sess_options=opts, providers=wanted
            )
        except Exception as exc:  # ORT raises its own exception types for bad files
            raise ConfigError(f"{path}: ONNX Runtime cannot load this model ({str(exc).splitlines()[0]})") from None
        self.device = self._sess.get_providers()[0]
        # ORT computes in the model's own types (its TensorRT provider too, at its defaults).
        self.float_precision = "f32"
        inputs = self._sess.get_inputs()
        self.input_names = [i.name for i in inputs]
        self.input_name = self.input_names[0]
        self.output_names = [o.name for o in self._sess.get_outputs()]
        self.static_batch = inputs[0].shape[0] if isinstance(inputs[0].shape[0], int) else None
        self.input_shape = tuple(d if isinstance(d, int) else None for d in inputs[0].shape)
        self.rows_independent = not quantizes_at_run_time(model_bytes if model_bytes is not None else path)

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._sess.run(None, feeds)


def time_calls(call, *, runs: int = 20, warmup: int = 3) -> dict:
    """Wall time of ``call()``: median and p90 in ms over ``runs`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000)
    return {"p50_ms": round(float(np.median(times)), 3), "p90_ms": round(float(np.percentile(times, 90)), 3)}


def quantizes_at_run_time(path: Path | bytes) -> bool:
    """Whether an ONNX graph (a file, or its bytes) has DynamicQuantizeLinear (scales computed per
    batch at run time)."""
    onnx = require("onnx", extra="base", purpose="reading ONNX graphs")
    try:
        graph = (
            onnx.load_from_string(path) if isinstance(path, bytes) else onnx.load(str(path), load_external_data=False)
        ).graph
    except Exception:  # ORT loaded it, so this is only an exotic encoding: assume the common case
        return False
    return any(n.op_type == "DynamicQuantizeLinear" for n in graph.node)


class OpenVinoSession(Session):
    runtime = "openvino"

    def __init__(
        self,
        path: Path,
        *,
        device: str = "CPU",
        threads: int | None = None,
        simulate: bool = False,
        exact: bool = False,
        float_precision: str = "f32",
        model_bytes: bytes | None = None,
        weights_bytes: bytes | None = None,
    ):
        ov = require("openvino", extra="openvino", purpose="running OpenVINO models")
        self.requested_precision = _check_precision(float_precision)
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
        if chosen in ("CPU", "GPU"):
            # CPU: bf16 by default where the CPU has it; GPU: f16 by default. Pinned either way.
            config["INFERENCE_PRECISION_HINT"] = float_precision
        if chosen == "CPU":
            config["INFERENCE_NUM_THREADS"] = threads or default_threads()
        if simulate:
            config["LP_TRANSFORMS_MODE"] = False
        try:
            if model_bytes is None:
                model = core.read_model(str(path))
            else:
                # The weights tensor views the verified bytes; keep them alive with the session.
                self._weights = weights_bytes if weights_bytes is not None else b""
                model = core.read_model(model_bytes, ov.Tensor(np.frombuffer(self._weights, np.uint8)))
            self._compiled = core.compile_model(model, chosen, config)
        except Exception as exc:
            raise ConfigError(
                f"{path}: OpenVINO cannot compile this model for {chosen} ({str(exc).splitlines()[0]})"
            ) from None
        self._request = self._compiled.create_infer_request()
        self.device = chosen
        self.float_precision = self._read_precision()
        self.input_names = [i.get_any_name() for i in self._compiled.inputs]
        self.input_name = self.input_names[0]
        self.output_names = [o.get_any_name() for o in self._compiled.outputs]
        ps = self._compiled.inputs[0].get_partial_shape()
        self.static_batch = ps[0].get_length() if ps[0].is_static else None
        self.input_shape = tuple(d.get_length() if d.is_static else None for d in ps) if ps.rank.is_static else ()

    def _read_precision(self) -> str:
        """What the compiled model really runs float ops in. A CPU without native bf16 keeps f32
        when bf16 is asked for; one without native f16 (this Zen 5, for one) runs f16 as bf16."""
        try:
            value = self._compiled.get_property("INFERENCE_PRECISION_HINT")
        except Exception:  # a plugin without the property (NPU): its own fixed precision
            return "device default"
        name = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
        return _OV_TYPE_NAMES.get(name, name)

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        res = self._request.infer(feeds)
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
    float_precision: str = "f32",
    model_bytes: bytes | None = None,
    weights_bytes: bytes | None = None,
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
        float_precision: what non-quantized ops compute in (``f32`` unless the bundle's profile
            opts into ``bf16`` / ``f16``); the session's :attr:`Session.float_precision` says what ran.
        model_bytes, weights_bytes: the model (and an OpenVINO IR's ``.bin``) already read and
            verified; the runtime is handed these and never opens ``path`` (which names it in messages).

    Raises:
        ConfigError: unknown runtime or precision, or a model the runtime cannot load.
        MissingDependency: the runtime's package is not installed.

    Example:
        >>> s = open_session("b/backbone.xml")  # doctest: +SKIP
        >>> s.float_precision  # doctest: +SKIP
        'f32'
    """
    path = Path(path)
    if runtime is None:
        runtime = "openvino" if path.suffix == ".xml" else "onnxruntime"
    if runtime == "onnxruntime":
        return OrtSession(
            path,
            providers=providers,
            threads=threads,
            simulate=simulate,
            exact=exact,
            float_precision=float_precision,
            model_bytes=model_bytes,
        )
    if runtime == "openvino":
        return OpenVinoSession(
            path,
            device=device or "CPU",
            threads=threads,
            simulate=simulate,
            exact=exact,
            float_precision=float_precision,
            model_bytes=model_bytes,
            weights_bytes=weights_bytes,
        )
    if runtime == "tensorrt":
        raise MissingDependency(
            "runtime 'tensorrt' runs through ONNX Runtime's TensorRT provider on the device; "
            "use runtime onnxruntime with providers [TensorrtExecutionProvider, ...]"
        )
    raise ConfigError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")


def bundle_session(
    bundle, path: str | Path, *, device: str | None = None, threads: int | None = None, exact: bool = True
) -> Session:
    """A session for one of a bundle's model files, with its target's device / providers and float
    precision.

    With ``exact`` (the default), a bundle whose head was trained on exact INT8 features
    (``fit_features = "simulated"``: ARM, Jetson, NPU and VNNI profiles) computes those same
    numbers on a CPU whose own INT8 kernels would saturate, by emulation: slower, but the
    predictions are the device's. ``exact=False`` measures this host's native kernels (``bench``).

    The runtime gets the bytes that were hashed (:meth:`edgetl.core.bundle.Bundle.read_verified`),
    and an image model's input must be the size the manifest's preprocessing makes.

    Raises:
        BundleError: the file is not the one the manifest lists, or its input size is not the
            manifest's ``input_size``.
    """
    from ..errors import BundleError

    target = bundle.manifest.get("target", {})
    path = Path(path)
    model = bundle.read_verified(path)
    weights = bundle.read_verified(path.with_suffix(".bin")) if path.suffix == ".xml" else None
    session = open_session(
        path,
        runtime=bundle.runtime,
        device=device or target.get("device"),
        providers=target.get("providers"),
        threads=threads,
        exact=exact and bundle.precision == "int8" and target.get("fit_features") == "simulated",
        float_precision=bundle.float_precision,
        model_bytes=model,
        weights_bytes=weights,
    )
    pre = bundle.manifest["backbone"]["preprocess"]
    if pre.get("kind") != TEXT:
        size = int(pre["input_size"])
        hw = list(session.input_shape[2:4]) if len(session.input_shape) == 4 else None
        if hw is None or any(d is not None and d != size for d in hw):
            raise BundleError(
                f"{bundle.path / 'manifest.json'}: backbone.preprocess.input_size = {size} but "
                f"{path.name} takes {session.input_shape} (N, C, H, W); the manifest does not describe "
                "this model, copy the bundle again"
            )
    return session
