"""Accuracy-controlled quantization: when plain INT8 misses a profile's tolerance, fit asks NNCF to
put the most damaging layers back in float, reports them, and gates the result.

A deliberately poor profile makes plain INT8 lose accuracy for real: ranges from NNCF's per-image
average over a single calibration image, full 8-bit weights (which saturate on an AVX2 CPU without
VNNI and still clip everywhere else), and a zero tolerance. Small data keeps the run to ~1-2 min;
the profile gives accuracy control an hour, so what it reverts never depends on how busy the
machine is (the default budget of 120 s ran out on a loaded 2-core machine).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

POOR = """description = "test: poorly calibrated INT8 with accuracy control"
runtime = "openvino"
precision = "int8"
accuracy_tolerance = 0.0
[quantization]
engine = "nncf"
preset = "mixed"
calibration_method = "mean_minmax"
calibration_size = 1
overflow_fix = "disable"
accuracy_control = {control}
accuracy_control_budget_s = 3600.0
"""


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from edgetl.datasets.images import make_surfaces

    out = tmp_path_factory.mktemp("ac") / "surfaces"
    make_surfaces(out, seed=1, per_class=6, val_per_class=3)
    return out


def _fit(small, tmp_path, control: bool):
    profile = tmp_path / f"poor-{control}.toml"
    profile.write_text(POOR.format(control=str(control).lower()))
    return run_cli("fit", small, "--out", tmp_path / f"b-{control}", "--target", profile, "--allow-drop", "--json")


def test_accuracy_control_keeps_layers_in_float_and_gains(small, cache_dir, tmp_path):
    plain = _fit(small, tmp_path, False)
    assert plain.returncode == 0, plain.stderr
    plain_gate = json.loads(plain.stdout)["gate"]
    if plain_gate["verdict"] != "refused":
        pytest.skip(f"plain INT8 was not shown to miss the tolerance on this host ({plain_gate}); nothing to restore")
    r = _fit(small, tmp_path, True)
    assert r.returncode == 0, r.stderr
    assert "accuracy-controlled quantization" in r.stderr
    gate = json.loads(r.stdout)["gate"]
    assert gate["plain_ptq"]["drop_pp"] == pytest.approx(plain_gate["drop_pp"])
    assert "stopped" not in gate["accuracy_control"], gate  # the profile's hour: never the machine's load
    layers = gate["accuracy_control"]["float_layers"]
    assert 0 < len(layers) < 49  # some convolutions (of EfficientNet-Lite0's 49) went back to float, not all
    assert gate["drop_pp"] < gate["plain_ptq"]["drop_pp"]  # and that bought accuracy back
    report = json.loads((tmp_path / "b-True" / "report.json").read_text())
    assert report["conversion"]["accuracy_control"]["float_layers"] == layers

    # Without --allow-drop the gate still decides, and its message says what was tried.
    if not gate["passed"]:
        profile = tmp_path / "poor-True.toml"
        again = run_cli("fit", small, "--out", tmp_path / "refused", "--target", profile)
        assert again.returncode == 3 and "kept in float by accuracy-controlled quantization" in again.stderr
        assert not (tmp_path / "refused").exists()
