"""Target profiles are data: every shipped file validates, and bad files fail naming the bad key."""

from __future__ import annotations

import pytest

from edgetl.core.targets import list_targets, load_target
from edgetl.errors import ConfigError

SHIPPED = {"cpu-x86", "cpu-arm64", "jetson-orin", "intel-npu", "openvino-cpu", "openvino-cpu-vnni"}


def test_shipped_profiles_load_and_describe_themselves():
    ts = {t.name: t for t in list_targets()}
    assert SHIPPED <= set(ts)
    for t in ts.values():
        assert t.description and "\n" not in t.description
        assert t.device_packages
    assert ts["intel-npu"].static and ts["jetson-orin"].static and not ts["cpu-x86"].static
    assert ts["jetson-orin"].quantization.symmetric_activations
    assert ts["intel-npu"].runtime == "openvino" and ts["intel-npu"].device == "NPU"


def _write(tmp_path, text, name="mine"):
    p = tmp_path / f"{name}.toml"
    p.write_text(text)
    return p


BASE = 'description = "d"\nruntime = "onnxruntime"\nprecision = "int8"\n'


def test_user_profile_file(tmp_path):
    t = load_target(_write(tmp_path, BASE + "batch = 4\n[quantization]\ncalibration_size = 64\n"))
    assert t.name == "mine" and t.batch == 4 and t.quantization.calibration_size == 64


@pytest.mark.parametrize(
    "text, needle",
    [
        (BASE + "precison = 'int8'\n", "unknown key 'precison' (did you mean 'precision'?)"),
        (BASE + "[quantization]\ncalib_size = 3\n", "unknown key 'calib_size'"),
        (BASE + "batch = 'one'\n", "batch = 'one' should be int"),
        (BASE.replace("int8", "int4"), "precision = 'int4' is not one of"),
        (BASE + "device = 'NPU'\n", "static input shape"),
        (BASE + "batch = 1\n[tensorrt]\n", "symmetric int8"),
        ('runtime = "openvino"\nprecision = "int8"\n', "missing required key 'description'"),
        (BASE + "opset = 11\n", "opset"),
        ("this is = = not toml", "invalid TOML"),
        (
            BASE + "[quantization]\nengine = 'ort'\ncalibration_method = 'mean_minmax'\n",
            "calibration_method = 'mean_minmax' is not one of minmax, percentile, entropy",
        ),
        (BASE + "[quantization]\ncalibration_method = 'entropy'\n", "is not one of minmax, mean_minmax, histogram"),
        (BASE + "[quantization]\naccuracy_control = true\n", "accuracy_control needs runtime openvino"),
    ],
)
def test_invalid_profiles_name_the_problem(tmp_path, text, needle):
    with pytest.raises(ConfigError) as err:
        load_target(_write(tmp_path, text))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_unknown_target_name_lists_shipped():
    with pytest.raises(ConfigError, match="did you mean cpu-x86"):
        load_target("cpu-x68")


def test_overrides_are_revalidated():
    t = load_target("cpu-x86").with_overrides(precision="fp16")
    assert t.precision == "fp16"
    with pytest.raises(ConfigError):
        load_target("cpu-x86").with_overrides(precision="int3")
