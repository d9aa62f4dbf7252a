"""The one decoder, sized for the model: JPEG DCT scaling, box reduction, EXIF, 16-bit, CMYK, and the
region of interest, on real files written here."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from edgetl.core.features import load_input
from edgetl.core.preprocess import PreprocessConfig, Roi, load_rgb, resize_crop, resize_side, to_tensor
from edgetl.errors import ConfigError, DataError

skdata = pytest.importorskip("skimage.data")
CFG = PreprocessConfig()  # resize side 256


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(skdata.astronaut()).resize((1600, 1200), Image.Resampling.BICUBIC)


def _tensor(path, need=None, cfg=CFG):
    return to_tensor(resize_crop(load_rgb(path, cfg=cfg, need=need), cfg), cfg)


def test_jpeg_decodes_at_the_smallest_dct_scale_that_covers_the_need(tmp_path, photo):
    p = tmp_path / "a.jpg"
    photo.save(p, quality=92)
    assert load_rgb(p).size == (1600, 1200)  # no cfg, no need: full resolution, as before
    assert load_rgb(p, cfg=CFG).size == (400, 300)  # 1/4: 300 >= 256, and 1/8 (150) would not cover it
    assert load_rgb(p, need=100).size == (200, 150)  # 1/8
    assert load_rgb(p, cfg=CFG, need=0).size == (1600, 1200)
    # The DCT-domain scale is a low-pass filter: the model input stays within JPEG noise of a full decode
    # (the quantisation step of this file's quality is larger than this gap).
    full, sized = _tensor(p, need=0), _tensor(p)
    assert np.abs(full - sized).mean() < 2 * 2 / 255  # two 8-bit steps, in the [-1, 1] units of mean = std = 0.5


def test_other_formats_are_box_reduced_keeping_twice_the_need(tmp_path, photo):
    for suffix in (".png", ".bmp", ".tiff"):
        p = tmp_path / f"a{suffix}"
        photo.save(p)
        im = load_rgb(p, cfg=CFG)
        assert im.size == (800, 600), suffix  # factor 2: 600 >= 2 x 256 > 400
        assert 2 * resize_side(CFG) <= min(im.size) < 4 * resize_side(CFG)
        full, sized = _tensor(p, need=0), _tensor(p)
        assert np.abs(full - sized).mean() < 2 / 255, suffix


def test_fit_and_device_compute_the_same_numbers(tmp_path, photo):
    p = tmp_path / "a.jpg"
    photo.save(p)
    # load_input is what fit's extraction, predict, eval, adapt and serve all call.
    np.testing.assert_array_equal(load_input(p, CFG), _tensor(p))
    stream = io.BytesIO(p.read_bytes())
    assert np.array_equal(np.asarray(load_rgb(stream, "upload", cfg=CFG)), np.asarray(load_rgb(p, cfg=CFG)))


def test_exif_orientation_is_applied_before_sizing(tmp_path, photo):
    p = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: displayed rotated 90 degrees clockwise
    photo.save(p, exif=exif, quality=92)
    full, sized = load_rgb(p), load_rgb(p, cfg=CFG)
    assert full.size == (1200, 1600) and sized.size == (300, 400)
    # The same picture: the sized decode equals the full upright one brought to its size.
    ref = np.asarray(full.resize(sized.size, Image.Resampling.BOX), np.float32)
    assert np.abs(ref - np.asarray(sized, np.float32)).mean() < 4


def test_sixteen_bit_and_cmyk_keep_their_conversions(tmp_path):
    ramp = (np.linspace(0, 65535, 1200)[None, :] * np.ones((900, 1))).astype(np.uint16)
    p16 = tmp_path / "g16.png"
    Image.fromarray(ramp).save(p16)
    full, sized = load_rgb(p16), load_rgb(p16, cfg=CFG)
    assert full.mode == sized.mode == "RGB" and min(sized.size) >= 2 * 256
    # Rescaled to 8 bits over the full 16-bit range, not clipped: a ramp from black to white.
    row = np.asarray(sized)[0, :, 0].astype(int)
    assert row[0] <= 1 and row[-1] >= 254 and np.all(np.diff(row) >= 0)
    cmyk = tmp_path / "c.jpg"
    Image.new("CMYK", (1200, 900), (0, 255, 255, 0)).save(cmyk)  # red in CMYK
    im = load_rgb(cmyk, cfg=CFG)
    assert im.mode == "RGB" and min(im.size) >= 256
    r, g, b = np.asarray(im).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60


def _marked_frame(path, size=(1000, 800), box=(600, 100, 900, 400)):
    """A grey frame with a red region at ``box``."""
    arr = np.full((size[1], size[0], 3), 128, np.uint8)
    arr[box[1] : box[3], box[0] : box[2]] = (220, 20, 20)
    Image.fromarray(arr).save(path)


@pytest.mark.parametrize("spec", ["600,100,300,300", "0.6,0.125,0.3,0.375"])
def test_region_of_interest_is_cut_out_before_anything_else(tmp_path, spec):
    p = tmp_path / "frame.png"
    _marked_frame(p)
    cfg = PreprocessConfig(roi=Roi.parse(spec))
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg and cfg.digest() != CFG.digest()
    x = load_input(p, cfg)
    rgb = (x.transpose(1, 2, 0) * 0.5 + 0.5) * 255
    # Only the red region is seen (interior: the resample blends one pixel at the border).
    assert np.all(np.abs(rgb[4:-4, 4:-4] - (220, 20, 20)) < 2)


def test_a_frame_without_the_region_is_one_error_naming_the_file(tmp_path):
    p = tmp_path / "small.png"
    Image.new("RGB", (640, 480)).save(p)
    cfg = PreprocessConfig(roi=Roi.parse("600,100,300,300"))
    with pytest.raises(DataError, match="small.png.*640 x 480 frame does not contain the region of interest"):
        load_input(p, cfg)


@pytest.mark.parametrize("bad", ["1,2,3", "a,b,c,d", "-1,0,10,10", "0,0,0,10", "0.5,0,0.6,1", "1.5,0,20,20"])
def test_roi_parse_refuses_what_is_not_a_region(bad):
    with pytest.raises(ConfigError, match="--roi"):
        Roi.parse(bad)


def test_default_config_digest_is_unchanged_by_the_roi_field():
    # Cache keys of bundles and features without a region stay what they were.
    assert "roi" not in CFG.to_dict()


def test_decoded_keeps_order_and_raises_at_the_items_turn():
    import time

    from edgetl.core.features import decoded

    def slow(k):
        time.sleep(0.002 * (k % 3))  # later items often finish first
        if k == 7:
            raise DataError(f"item {k}: unreadable")
        return k * k

    got, started = [], []
    with pytest.raises(DataError, match="item 7"):
        for item, result in decoded(slow, range(20), depth=4, threads=3):
            got.append((item, result))
            started.append(item)
    assert got == [(k, k * k) for k in range(7)]  # in order, up to the failing item


def test_decoded_runs_at_most_depth_items_ahead():
    import threading

    from edgetl.core.features import decoded

    done = []
    lock = threading.Lock()

    def work(k):
        with lock:
            done.append(k)
        return k

    ahead = []
    for item, _ in decoded(work, range(50), depth=5, threads=2):
        with lock:
            ahead.append(max(done) - item)
    assert max(ahead) <= 5


@pytest.mark.parametrize(
    "roi, ok",
    [
        ({"x": 10, "y": 20, "w": 100, "h": 50, "unit": "px"}, True),
        ({"x": 0.1, "y": 0, "w": 0.9, "h": 1, "unit": "fraction"}, True),
        ({"x": -1, "y": 0, "w": 10, "h": 10, "unit": "px"}, False),
        ({"x": 0.5, "y": 0, "w": 0.6, "h": 1, "unit": "fraction"}, False),
        ({"x": 1.5, "y": 0, "w": 10, "h": 10, "unit": "px"}, False),
        ({"x": 0, "y": 0, "w": float("nan"), "h": 10}, False),
        ({"x": 0, "y": 0, "w": 10, "h": 10, "unit": "mm"}, False),
        ([0, 0, 10, 10], False),
    ],
)
def test_manifest_region_of_interest_is_checked_on_load(roi, ok):
    from edgetl.core.manifest import validate
    from edgetl.errors import BundleError
    from tests.conftest import minimal_manifest

    entry = {"sha256": "0" * 64, "bytes": 1}
    m = minimal_manifest(files={"backbone.onnx": entry, "heads/v1.npz": entry})
    m["backbone"]["preprocess"]["roi"] = roi
    if ok:
        validate(m)
        assert PreprocessConfig.from_dict(m["backbone"]["preprocess"]).roi is not None
    else:
        with pytest.raises(BundleError, match="backbone.preprocess.roi"):
            validate(m)
