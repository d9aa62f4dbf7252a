"""Target profiles: what a class of device needs, kept as data in ``targets/*.toml``.

A new device is a new TOML file, not new code. Files are validated strictly into a typed
:class:`Target`: unknown keys are rejected with the list of valid ones, values are type-checked,
and cross-field rules (a static batch for NPUs, symmetric INT8 for TensorRT, ...) are enforced.
The shipped profiles live in the wheel (``edgetl/targets``); ``--target FILE`` loads a user's own.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .compat import tomllib

# bf16: FP32 weights computed in bfloat16, on OpenVINO where the CPU has native bf16 (AVX-512 BF16,
# AMX); on other CPUs OpenVINO keeps f32 and the report says so.
PRECISIONS = ("int8", "bf16", "fp16", "fp32")
RUNTIMES = ("onnxruntime", "openvino")
FLOAT_PRECISIONS = ("f32", "bf16", "f16")
DEFAULT_TARGET = "openvino-cpu"  # the fastest INT8 path measured on x86 CPUs (see docs/BENCHMARKS.md)


@dataclass(frozen=True)
class Quantization:
    """How INT8 post-training quantization is done for this target."""

    engine: str = "nncf"  # nncf: NNCF (OpenVINO or ONNX backend); ort: onnxruntime.quantization
    activation_type: str = "uint8"  # uint8 | int8
    weight_type: str = "int8"  # int8 | uint8
    symmetric_activations: bool = False
    symmetric_weights: bool = True
    per_channel: bool = True
    calibration_size: int = 128
    # Activation ranges. Both engines: minmax (global min/max over the calibration set). ort engine:
    # percentile | entropy. nncf engine: mean_minmax (NNCF's default: per-image extremes averaged)
    # | histogram.
    calibration_method: str = "minmax"
    preset: str = "performance"  # nncf: performance (symmetric) | mixed (asymmetric activations)
    fast_bias_correction: bool = True  # nncf: false runs the full (slower, better) BiasCorrection
    keep_float: tuple[str, ...] = ()  # node-name patterns kept in float
    keep_float_types: tuple[str, ...] = ()  # op types kept in float (ONNX or OpenVINO type names)
    # x86 CPUs without VNNI (AVX2 only) multiply u8 x s8 pairs into a saturating int16 sum; full
    # 8-bit weights then overflow. "enable" quantizes weights to 7 bits everywhere (NNCF's overflow
    # fix / ORT's reduce_range), "first_layer" only where inputs span the full range.
    overflow_fix: str = "first_layer"  # enable | first_layer | disable
    channel_alignment: bool = False  # NNCF cross-layer equalisation (depthwise-separable nets)
    accuracy_control: bool = False  # on a missed tolerance, retry with NNCF accuracy control (OpenVINO)
    # Accuracy control re-validates the model once per reverted layer: on a slow or busy CPU that can
    # run for many minutes, so fit stops it after this many seconds and keeps plain INT8 (said).
    accuracy_control_budget_s: float = 120.0


@dataclass(frozen=True)
class TensorRT:
    """Engine-build settings written into the bundle's build script (Jetson)."""

    workspace_mb: int = 2048
    min_compute_capability: str = "8.7"  # Orin; Xavier is 7.2
    builder_optimization_level: int = 3


@dataclass(frozen=True)
class Target:
    """A validated target profile.

    Attributes:
        name: profile name (the file's stem).
        description: one line for ``edgetl targets``.
        runtime: ``onnxruntime`` or ``openvino``.
        device: OpenVINO device (``CPU``, ``NPU``, ``GPU``, ``AUTO``); falls back to CPU when absent.
        providers: ONNX Runtime execution providers in preference order.
        precision: ``int8``, ``fp16`` or ``fp32``.
        batch: ``0`` for a dynamic batch dimension, else the static batch size.
        opset: ONNX opset of exported graphs.
        accuracy_tolerance: maximal accuracy drop vs FP32, in percentage points.
        latency_budget_ms: batch-1 latency the bundle should meet on the device (reported).
        device_packages: what ``pip install`` the device needs to run the bundle.
        float_precision: what the runtime computes non-quantized ops in (``f32`` by default; a
            profile may opt into ``bf16`` / ``f16`` where that is faster). ``precision = "bf16"``
            implies ``bf16``.
    """

    name: str
    description: str
    runtime: str = "onnxruntime"
    device: str = "CPU"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    precision: str = "int8"
    batch: int = 0
    opset: int = 18
    accuracy_tolerance: float = 1.0
    latency_budget_ms: float = 50.0
    device_packages: tuple[str, ...] = ("edgetl", "onnxruntime")
    float_precision: str = "f32"
    # How fit computes training features from the converted model on the laptop/CI machine:
    # "runtime" runs the host's own INT8 kernels; "simulated" computes exact INT8 arithmetic in
    # float (ONNX Runtime: the QDQ graph unfused; OpenVINO: FakeQuantize run as float ops, the CPU
    # plugin's low-precision passes off). Devices whose integer kernels never saturate (ARM
    # dot-product, TensorRT, NPUs) compute the simulated numbers, while an AVX2 host without VNNI
    # would saturate and hand the head features the device never produces.
    fit_features: str = "runtime"
    quantization: Quantization = field(default_factory=Quantization)
    tensorrt: TensorRT | None = None
    source: str = ""
    # Settings an override (--precision / --runtime) made irrelevant and dropped, for the report.
    adjusted: tuple[str, ...] = ()

    @property
    def static(self) -> bool:
        return self.batch > 0

    @property
    def session_precision(self) -> str:
        """The float precision sessions of this target's models are compiled with."""
        return "bf16" if self.precision == "bf16" else self.float_precision

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        if not d["adjusted"]:
            d.pop("adjusted")
        return d

    def with_overrides(self, **kw: Any) -> Target:
        """A copy with ``precision`` / ``runtime`` replaced (None values ignored), re-validated.

        Overrides compose with any profile: settings an override makes irrelevant are dropped and
        listed in :attr:`adjusted` (which the report shows), e.g. accuracy control once nothing is
        INT8, or an OpenVINO device once the runtime is ONNX Runtime. An override that would need
        settings the profile does not have fails with the name of a profile that has them.

        Raises:
            ConfigError: the combination needs another profile (named in the message).
        """
        kw = {k: v for k, v in kw.items() if v is not None and getattr(self, k) != v}
        if not kw:
            return self
        t = dataclasses.replace(self, **kw)
        where = self.source or self.name
        q, notes = t.quantization, list(self.adjusted)
        asked = " ".join(f"--{k} {v}" for k, v in kw.items())
        if t.runtime == "openvino" and t.precision == "int8" and q.engine != "nncf":
            raise ConfigError(
                f"{asked}: {self.name} quantizes with ONNX Runtime's quantizer, which makes no OpenVINO "
                "model; for INT8 on OpenVINO use --target openvino-cpu (or intel-npu)"
            )
        if t.runtime == "openvino" and t.tensorrt is not None:
            raise ConfigError(f"{asked}: {self.name} is a TensorRT profile; for OpenVINO use --target openvino-cpu")
        if t.precision == "bf16" and t.runtime != "openvino":
            raise ConfigError(
                f"{asked}: bf16 runs on OpenVINO's CPU plugin; use --target openvino-cpu --precision bf16"
            )
        if t.precision != "int8":
            if q.accuracy_control:
                q = dataclasses.replace(q, accuracy_control=False)
                notes.append("quantization.accuracy_control dropped: nothing is INT8")
            if t.fit_features != "runtime":
                t = dataclasses.replace(t, fit_features="runtime")
                notes.append("fit_features = runtime: exact-INT8 emulation is moot without INT8")
        if t.runtime == "onnxruntime":
            if q.accuracy_control:
                q = dataclasses.replace(q, accuracy_control=False)
                notes.append("quantization.accuracy_control dropped: it needs OpenVINO (NNCF's OpenVINO backend)")
            if t.float_precision != "f32":
                t = dataclasses.replace(t, float_precision="f32")
                notes.append("float_precision = f32: ONNX Runtime computes in the model's own types")
            if self.runtime == "openvino" and t.device != "CPU":
                notes.append(
                    f"device {t.device} dropped: ONNX Runtime runs on its providers ({', '.join(t.providers)})"
                )
                t = dataclasses.replace(t, device="CPU")
        t = dataclasses.replace(t, quantization=q, adjusted=tuple(notes))
        _check_rules(t, where)
        return t


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _coerce(where: str, key: str, value: Any, default: Any) -> Any:
    """Type-check one value against its default's type (tuples come from TOML lists)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, tuple):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{where}: {key} = {value!r} should be {type(default).__name__}")
    return value


def _build(cls, data: dict, where: str, *, required: tuple[str, ...] = (), extra: dict | None = None):
    allowed = _fields(cls)
    allowed.pop("source", None)
    allowed.pop("adjusted", None)
    out = dict(extra or {})
    for key, value in data.items():
        if key not in allowed or key in out:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(sorted(allowed))}")
        f = allowed[key]
        if key == "quantization":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [quantization] must be a table")
            out[key] = _build(Quantization, value, f"{where} [quantization]")
        elif key == "tensorrt":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [tensorrt] must be a table")
            out[key] = _build(TensorRT, value, f"{where} [tensorrt]")
        else:
            default = f.default if f.default is not dataclasses.MISSING else ""
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            out[key] = _coerce(where, key, value, default)
    for key in required:
        if key not in out:
            raise ConfigError(f"{where}: missing required key {key!r}")
    return cls(**out)


def _check_rules(t: Target, where: str) -> None:
    """Cross-field rules; each names the key to fix."""
    q = t.quantization
    choices = {
        "runtime": (t.runtime, RUNTIMES),
        "fit_features": (t.fit_features, ("runtime", "simulated")),
        "precision": (t.precision, PRECISIONS),
        "float_precision": (t.float_precision, FLOAT_PRECISIONS),
        "quantization.engine": (q.engine, ("nncf", "ort")),
        "quantization.activation_type": (q.activation_type, ("int8", "uint8")),
        "quantization.weight_type": (q.weight_type, ("int8", "uint8")),
        "quantization.calibration_method": (
            q.calibration_method,
            ("minmax", "percentile", "entropy") if q.engine == "ort" else ("minmax", "mean_minmax", "histogram"),
        ),
        "quantization.preset": (q.preset, ("performance", "mixed")),
        "quantization.overflow_fix": (q.overflow_fix, ("enable", "first_layer", "disable")),
    }
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"{where}: {key} = {value!r} is not one of {', '.join(valid)}")
    if t.batch < 0:
        raise ConfigError(f"{where}: batch = {t.batch}; use 0 for dynamic or a positive static size")
    if not 17 <= t.opset <= 21:
        raise ConfigError(f"{where}: opset = {t.opset}; edgetl exports opset 17 to 21 (18 recommended)")
    if t.accuracy_tolerance < 0:
        raise ConfigError(f"{where}: accuracy_tolerance must be >= 0 (percentage points)")
    if not 0 < q.accuracy_control_budget_s < float("inf"):
        raise ConfigError(f"{where}: quantization.accuracy_control_budget_s must be a positive number of seconds")
    if not 1 <= q.calibration_size <= 100_000:
        raise ConfigError(f"{where}: quantization.calibration_size must be between 1 and 100000")
    if t.device.upper().startswith("NPU") and not t.static:
        raise ConfigError(f"{where}: device NPU needs a static input shape; set batch = 1 (or another fixed size)")
    if t.runtime == "openvino" and q.engine != "nncf":
        raise ConfigError(f'{where}: runtime openvino quantizes with NNCF; set quantization.engine = "nncf"')
    if t.tensorrt is not None:
        if not (
            q.symmetric_activations and q.symmetric_weights and q.activation_type == "int8" and q.weight_type == "int8"
        ):
            raise ConfigError(
                f"{where}: TensorRT explicit quantization needs symmetric int8 activations and weights; "
                'set quantization.symmetric_activations = true and activation_type = "int8"'
            )
        if not t.static:
            raise ConfigError(
                f"{where}: TensorRT profiles need a static input shape; set batch = 1 (or another fixed size)"
            )
        if t.runtime != "onnxruntime":
            raise ConfigError(f'{where}: a [tensorrt] profile ships ONNX; set runtime = "onnxruntime"')
    if t.precision == "bf16" and t.runtime != "openvino":
        raise ConfigError(
            f'{where}: precision bf16 runs on OpenVINO\'s CPU plugin; set runtime = "openvino" '
            "(or use --target openvino-cpu --precision bf16)"
        )
    if t.float_precision != "f32" and t.runtime != "openvino":
        raise ConfigError(
            f'{where}: float_precision = "{t.float_precision}" needs runtime openvino; ONNX '
            'Runtime computes float ops in the model\'s own types (use precision = "fp16" for FP16)'
        )
    if q.accuracy_control and t.runtime != "openvino":
        raise ConfigError(f"{where}: quantization.accuracy_control needs runtime openvino (NNCF's OpenVINO backend)")


def parse_target(text: str, *, name: str, where: str) -> Target:
    """Parse and validate one profile's TOML text.

    Raises:
        ConfigError: TOML syntax error, unknown key, wrong type or a broken cross-field rule.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: invalid TOML ({exc})") from None
    if "name" in data and data["name"] != name:
        raise ConfigError(f"{where}: name = {data['name']!r} does not match the file name {name!r}")
    data.pop("name", None)
    t = _build(Target, data, where, required=("description", "runtime", "precision"), extra={"name": name})
    t = dataclasses.replace(t, source=where)
    _check_rules(t, where)
    return t


def _shipped_dir():
    """Profiles inside the installed package; in a source checkout, the repository's targets/."""
    pkg = resources.files("edgetl") / "targets"
    if pkg.is_dir():
        return pkg
    repo = Path(__file__).resolve().parents[3] / "targets"
    return repo


def list_targets() -> list[Target]:
    """Every shipped profile, sorted by name."""
    folder = _shipped_dir()
    out = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            name = entry.name[: -len(".toml")]
            out.append(parse_target(entry.read_text(encoding="utf-8"), name=name, where=f"targets/{entry.name}"))
    return out


def load_target(name_or_path: str | Path | None = None) -> Target:
    """A shipped profile by name, or a user's profile file by path.

    Raises:
        ConfigError: unknown name (with close matches) or an invalid file.

    Example:
        >>> load_target("cpu-x86").precision
        'int8'
    """
    name_or_path = str(name_or_path or DEFAULT_TARGET)
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.is_file():
        if not p.is_file():
            raise ConfigError(f"{p}: target profile file not found")
        return parse_target(p.read_text(encoding="utf-8"), name=p.stem, where=str(p))
    shipped = {t.name: t for t in list_targets()}
    if name_or_path in shipped:
        return shipped[name_or_path]
    close = difflib.get_close_matches(name_or_path, list(shipped), n=2)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(f"unknown target {name_or_path!r}; {hint}shipped: {', '.join(shipped)} (or pass a .toml file)")
