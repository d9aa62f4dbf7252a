"""The pixel budget counts what a decode costs: bytes per pixel, the copies a conversion makes, and
what the image is resized to. Crafted files (strips, 16-bit, float) decoded in a fresh process,
whose peak resident memory is read back from the kernel (``ru_maxrss``), not timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetl.core.features import load_input
from edgetl.core.preprocess import OverBudget, PreprocessConfig, budget_bytes, resize_crop
from edgetl.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

# Decode one file through the path predict uses and report the peak resident memory it added.
_PROBE = r"""
import json, resource, sys
import numpy as np
from edgetl.core.features import load_input
from edgetl.core.preprocess import PreprocessConfig, budget_bytes
from edgetl.errors import ConfigError, DataError
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    x = load_input(sys.argv[1], PreprocessConfig())
    out = {"ok": True, "shape": list(x.shape), "finite": bool(np.isfinite(x).all())}
except DataError as exc:
    out = {"ok": False, "error": str(exc)}
out["peak_bytes"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
out["budget_bytes"] = budget_bytes()
print(json.dumps(out))
"""


def _probe(path: Path, megapixels: float) -> dict:
    env = {
        **os.environ,
        "EDGETL_MAX_MEGAPIXELS": str(megapixels),
        "PYTHONPATH": str(REPO / "src"),
        "OMP_NUM_THREADS": "1",
    }
    r = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("size", [(1, 10_000), (40_000, 1), (3, 2_000_000)])
def test_strips_cost_what_they_are_resized_to(tmp_path, size):
    p = tmp_path / "strip.png"
    Image.new("L", size, 77).save(p)  # a few hundred bytes on disk
    r = _probe(p, 64)
    assert r["ok"] and r["shape"] == [3, 224, 224] and r["finite"], r
    # Resized whole, the 1 x 10000 strip took 2.8 GB; its decode now stays well inside the budget.
    assert r["peak_bytes"] < r["budget_bytes"], r


def test_a_strip_whose_conversion_would_exceed_the_budget_is_one_line(tmp_path):
    p = tmp_path / "long.png"
    # Under 4 MP of pixels, but RGBA composited on grey takes 16 bytes a pixel where the budget
    # grants 12, and a 1-pixel-high strip cannot be reduced before its conversion.
    Image.new("RGBA", (3_900_000, 1), (77, 77, 77, 128)).save(p)
    with pytest.raises(OverBudget, match=r"long.png: 3900000 x 1 RGBA image would take \d+ MB .*pixel budget"):
        _load(p, 4)
    r = _probe(p, 4)
    assert not r["ok"] and "pixel budget" in r["error"], r


def _load(path, megapixels):
    old = os.environ.get("EDGETL_MAX_MEGAPIXELS")
    os.environ["EDGETL_MAX_MEGAPIXELS"] = str(megapixels)
    try:
        return load_input(path, PreprocessConfig())
    finally:
        if old is None:
            del os.environ["EDGETL_MAX_MEGAPIXELS"]
        else:
            os.environ["EDGETL_MAX_MEGAPIXELS"] = old


@pytest.mark.parametrize("kind", ["uint16-png", "float-tiff", "rgba-png"])
def test_deep_images_at_the_pixel_budget_stay_within_its_bytes(tmp_path, kind):
    mp = 16  # 4000 x 4000: the same arithmetic as the 64 MP default, a quarter of the disk and time
    side = 4000
    rng = np.random.default_rng(0)
    if kind == "uint16-png":
        arr = rng.integers(0, 65535, size=(side, side), dtype=np.uint16)
        p = tmp_path / "deep.png"
        Image.fromarray(arr).save(p, compress_level=1)
    elif kind == "float-tiff":
        arr = rng.random((side, side), dtype=np.float32)
        p = tmp_path / "deep.tiff"
        Image.fromarray(arr, mode="F").save(p)
    else:
        arr = rng.integers(0, 255, size=(side, side, 4), dtype=np.uint8)
        p = tmp_path / "deep.png"
        Image.fromarray(arr, "RGBA").save(p, compress_level=1)
    del arr
    r = _probe(p, mp)
    assert r["ok"] and r["finite"], r
    assert r["peak_bytes"] <= r["budget_bytes"], r  # the budget's bytes are a bound on the decode's peak


def test_budget_is_in_bytes_of_rgb_at_the_pixel_budget(monkeypatch):
    monkeypatch.setenv("EDGETL_MAX_MEGAPIXELS", "64")
    assert budget_bytes() == 64_000_000 * 12
    for bad in ("nan", "inf", "-3", "abc"):  # not a budget: one line naming the variable, never a traceback
        monkeypatch.setenv("EDGETL_MAX_MEGAPIXELS", bad)
        with pytest.raises(ConfigError, match="EDGETL_MAX_MEGAPIXELS"):
            budget_bytes()


def test_extreme_aspect_resize_computes_only_the_centre_crop():
    cfg = PreprocessConfig()
    arr = np.zeros((2, 15360), np.uint8)
    arr[:, 7680:] = 200  # dark left half, bright right half: the centre crop straddles the edge
    out = np.asarray(resize_crop(Image.fromarray(arr).convert("RGB"), cfg)).astype(int)
    assert out.shape == (224, 224, 3)  # resized whole it would be 256 x 1,966,080 (2 GB)
    assert out[:, :40].max() <= 5 and out[:, -40:].min() >= 195
    assert np.all(np.diff(out[100, :, 0]) >= -3)  # one rising edge, at the frame's centre


def test_a_strip_too_long_to_resize_whole_is_answered(tmp_path):
    p = tmp_path / "tall.png"
    Image.new("L", (1, 300_000), 5).save(p)
    x = load_input(p, PreprocessConfig())  # resized whole: 256 x 76,800,000, an OverflowError before
    assert x.shape == (3, 224, 224) and np.isfinite(x).all()
