"""``fit --roi``: the region of interest is kept in the bundle and cut out the same way by every job;
a frame without it is one line naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from edgetl.errors import ConfigError
from tests.conftest import make_folder, run_cli

skdata = pytest.importorskip("skimage.data")
ROI = (160, 40, 128, 128)  # x, y, w, h


def _frame(inside: np.ndarray, outside: np.ndarray, k: int) -> Image.Image:
    """A 320 x 240 frame: ``outside`` texture everywhere, ``inside`` texture in the region."""
    x, y, w, h = ROI
    frame = np.stack([outside[k : k + 240, k : k + 320]] * 3, axis=-1).copy()
    frame[y : y + h, x : x + w] = np.stack([inside[2 * k : 2 * k + h, 2 * k : 2 * k + w]] * 3, axis=-1)
    return Image.fromarray(frame)


@pytest.fixture(scope="module")
def roi_bundle(cache_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("roi")
    brick, grass = skdata.brick(), skdata.grass()
    # Outside the region each class carries the other class's texture: only the region tells them apart.
    for name, own, other in (("brick", brick, grass), ("grass", grass, brick)):
        for k in range(10):
            (root / "data" / name).mkdir(parents=True, exist_ok=True)
            _frame(own, other, 8 * k).save(root / "data" / name / f"{name}{k}.png")
    out = root / "roi.bundle"
    r = run_cli(
        "fit",
        root / "data",
        "--out",
        out,
        "-t",
        "cpu-x86",
        "--precision",
        "fp32",
        "--val-split",
        "0.3",
        "--roi",
        ",".join(map(str, ROI)),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    return root, out, json.loads(r.stdout)


def test_roi_is_stored_and_learned_from(roi_bundle):
    root, out, summary = roi_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backbone"]["preprocess"]["roi"] == dict(zip("xywh", ROI), unit="px")
    # Outside the region each class wears the other's texture: a model that saw the surroundings
    # would score below chance; one that sees only the region scores above it.
    assert summary["val"]["accuracy"] > 0.5


def test_every_job_applies_the_roi(roi_bundle, tmp_path):
    root, out, _ = roi_bundle
    brick, grass, gravel = skdata.brick(), skdata.grass(), skdata.gravel()
    _frame(brick, grass, 3).save(tmp_path / "a.png")
    _frame(brick, gravel, 3).save(tmp_path / "b.png")  # same region, another surrounding
    r = run_cli("predict", out, tmp_path / "a.png", tmp_path / "b.png", "--json")
    assert r.returncode == 0, r.stderr
    a, b = json.loads(r.stdout)["predictions"]
    assert a["label"] == b["label"] == "brick"
    assert a["top_k"] == b["top_k"]  # the surrounding pixels never reach the model
    r = run_cli("eval", out, root / "data", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["accuracy"] > 0.5  # below chance if the surroundings were seen


def test_a_frame_without_the_roi_is_one_line_naming_it(roi_bundle, tmp_path):
    _, out, _ = roi_bundle
    Image.new("RGB", (200, 150), (90, 90, 90)).save(tmp_path / "small.png")
    _frame(skdata.brick(), skdata.grass(), 0).save(tmp_path / "good.png")
    r = run_cli("predict", out, tmp_path / "small.png", "--strict")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "small.png" in line and "does not contain the region of interest" in line
    r = run_cli("predict", out, tmp_path, "--json")  # without --strict: skipped, the good frame answered
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert [p["path"].endswith("good.png") for p in res["predictions"]] == [True]
    assert res["skipped"][0]["path"].endswith("small.png")


def test_a_malformed_roi_is_refused_before_any_work(tmp_path):
    make_folder(tmp_path / "data")
    r = run_cli("fit", tmp_path / "data", "--out", tmp_path / "x.bundle", "--roi", "1,2,3")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "--roi" in r.stderr


def test_a_camera_file_gives_the_same_region(tmp_path):
    from edgetl.core.preprocess import Roi

    (tmp_path / "cam3.toml").write_text("[roi]\nx = 100\ny = 50\nw = 800\nh = 600\n# the station's fixture\n")
    (tmp_path / "cam3.json").write_text('{"roi": {"x": 0.1, "y": 0.05, "w": 0.8, "h": 0.9, "unit": "fraction"}}')
    assert Roi.load(str(tmp_path / "cam3.toml")) == Roi.parse("100,50,800,600")
    assert Roi.load(str(tmp_path / "cam3.json")) == Roi.parse("0.1,0.05,0.8,0.9")


@pytest.mark.parametrize(
    "name, text, says",
    [
        ("none.toml", None, "cannot read"),
        ("cam.toml", "[camera]\nx = 1\n", "'roi' table"),
        ("cam.toml", "[roi]\nx = 1\ny = 1\nw = 0\nh = 5\n", "w and h > 0"),
        ("cam.toml", "[roi\nx=", "cannot read"),
        ("cam.json", '{"roi": {"x": 0, "y": 0, "w": 1, "h": 1, "unit": "mm"}}', "unit"),
    ],
)
def test_a_bad_camera_file_is_one_line_naming_it(tmp_path, name, text, says):
    from edgetl.core.preprocess import Roi

    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=says) as err:
        Roi.load(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_the_no_pretraining_baseline_sees_the_region(tmp_path):
    """The negative-transfer baseline describes what the backbone sees: the region of interest, not
    the whole frame (so a check on a station with a fixture is not judged on the fixture)."""
    from types import SimpleNamespace

    from edgetl.core.features import FeatureCache
    from edgetl.core.preprocess import PreprocessConfig, Roi
    from edgetl.tasks.classify.data import Sample
    from edgetl.tasks.classify.task import ImageClassifyTask
    from edgetl.transfer.negative import pixel_baseline_features

    frame = _frame(skdata.brick(), skdata.grass(), 0)
    frame.save(tmp_path / "frame.png")
    x, y, w, h = ROI
    frame.crop((x, y, x + w, y + h)).save(tmp_path / "region.png")
    pre = PreprocessConfig(input_size=224, crop_pct=0.875, interpolation="bicubic", roi=Roi(*ROI))
    exported = SimpleNamespace(preprocess=pre.to_dict())
    item = Sample(tmp_path / "frame.png", "brick", "d" * 64)
    got = ImageClassifyTask().baseline_features([item], FeatureCache(tmp_path / "c", "b"), exported)[0]
    region = pixel_baseline_features([Image.open(tmp_path / "region.png")])[0]
    whole = pixel_baseline_features([frame])[0]
    assert np.allclose(got, region, atol=1e-6) and not np.allclose(got, whole, atol=1e-2)
