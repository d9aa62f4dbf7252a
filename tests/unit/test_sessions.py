"""The session layer pins what decides the numbers, on any CPU this suite runs on.

These tests hold on AVX2-only, AVX-512 VNNI and AVX-512 BF16 / AMX machines alike: they compare
what a compiled model reports it runs with what the bundle asked for and what the runtime says
this CPU can do, never with the development machine's own behaviour.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgetl.core.features import numerics_tag
from edgetl.core.sessions import cpu_family, open_session
from edgetl.core.targets import load_target
from edgetl.errors import ConfigError


@pytest.fixture(scope="module")
def conv_model(tmp_path_factory):
    """A small conv + relu + global pool graph: enough float work to see a precision change."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path_factory.mktemp("model") / "conv.onnx"
    onnx.save(model, str(path))
    return path


def _ov_has_native_bf16() -> bool:
    ov = pytest.importorskip("openvino")
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def test_openvino_runs_f32_unless_asked(conv_model):
    pytest.importorskip("openvino")
    s = open_session(conv_model, runtime="openvino")
    # OpenVINO's own default is bf16 on CPUs with native bf16; edgetl's is f32 everywhere
    assert (s.requested_precision, s.float_precision) == ("f32", "f32")
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    ref = open_session(conv_model, runtime="onnxruntime")(x)
    np.testing.assert_allclose(s(x), ref, rtol=1e-5, atol=1e-5)


def test_bf16_is_what_the_cpu_can_do(conv_model):
    native = _ov_has_native_bf16()
    s = open_session(conv_model, runtime="openvino", float_precision="bf16")
    assert s.requested_precision == "bf16"
    # read back from the compiled model: bf16 only where the CPU has it, f32 otherwise
    assert s.float_precision == ("bf16" if native else "f32")
    assert cpu_family()["native_bf16"] == native or not cpu_family()["machine"].startswith(("x86", "amd64"))


def test_onnxruntime_computes_f32(conv_model):
    s = open_session(conv_model, runtime="onnxruntime")
    assert s.float_precision == "f32" and s.describe()["float_precision"] == "f32"


def test_unknown_float_precision_is_refused(conv_model):
    with pytest.raises(ConfigError, match="float precision"):
        open_session(conv_model, runtime="onnxruntime", float_precision="fp8")


def test_feature_cache_keys_follow_the_numerics(conv_model):
    pytest.importorskip("openvino")
    f32 = open_session(conv_model, runtime="openvino")
    exact = open_session(conv_model, runtime="openvino", simulate=True)
    bf16 = open_session(conv_model, runtime="openvino", float_precision="bf16")
    assert numerics_tag(f32) != numerics_tag(exact)
    if bf16.float_precision != f32.float_precision:
        assert numerics_tag(bf16) != numerics_tag(f32)


# ----------------------------------------------------------------- precision in target profiles
def test_bf16_needs_openvino():
    with pytest.raises(ConfigError, match="openvino-cpu"):
        load_target("cpu-x86").with_overrides(precision="bf16")
    t = load_target("openvino-cpu").with_overrides(precision="bf16")
    assert t.session_precision == "bf16" and not t.quantization.accuracy_control
    assert any("accuracy_control" in note for note in t.adjusted)


def test_shipped_profiles_run_float_ops_in_f32():
    from edgetl.core.targets import list_targets

    for t in list_targets():
        assert t.session_precision == "f32", t.name


def test_overrides_drop_what_they_make_irrelevant():
    t = load_target("openvino-cpu").with_overrides(precision="fp32", runtime="onnxruntime")
    assert (t.precision, t.runtime) == ("fp32", "onnxruntime")
    assert not t.quantization.accuracy_control and t.adjusted
    assert list(t.to_dict()["adjusted"]) == list(t.adjusted)
    npu = load_target("intel-npu").with_overrides(runtime="onnxruntime")
    assert npu.device == "CPU" and any("NPU" in n for n in npu.adjusted)
    assert load_target("cpu-x86").with_overrides(precision=None, runtime=None) == load_target("cpu-x86")


@pytest.mark.parametrize(
    "base, kw",
    [
        ("cpu-x86", {"runtime": "openvino"}),
        ("jetson-orin", {"runtime": "openvino"}),
        ("cpu-arm64", {"precision": "bf16"}),
    ],
)
def test_overrides_that_need_another_profile_name_it(base, kw):
    with pytest.raises(ConfigError, match="openvino-cpu"):
        load_target(base).with_overrides(**kw)
