"""Dataset discovery, validation, splitting and decoding of every image mode users bring."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from edgetl.core.preprocess import PreprocessConfig, load_rgb, preprocess_file
from edgetl.errors import DataError
from edgetl.tasks.classify.data import list_images, load_dataset
from tests.conftest import make_folder, write_image


def test_folder_layout_and_stratified_split(tmp_path):
    make_folder(tmp_path, classes=("bolt", "nut", "washer"), per_class=10)
    ds = load_dataset(tmp_path, val_split=0.2, seed=1)
    assert ds.layout == "folder" and ds.classes == ["bolt", "nut", "washer"]
    assert {c: v["val"] for c, v in ds.counts().items()} == {"bolt": 2, "nut": 2, "washer": 2}
    assert not {s.path for s in ds.train} & {s.path for s in ds.val}
    again = load_dataset(tmp_path, val_split=0.2, seed=1)
    assert [s.path for s in again.val] == [s.path for s in ds.val]
    other = load_dataset(tmp_path, val_split=0.2, seed=2)
    assert [s.path for s in other.val] != [s.path for s in ds.val]


def test_train_val_layout(tmp_path):
    make_folder(tmp_path / "train", per_class=3)
    make_folder(tmp_path / "val", per_class=2)
    ds = load_dataset(tmp_path)
    assert ds.layout == "train+val" and len(ds.train) == 6 and len(ds.val) == 4


@pytest.mark.parametrize("holdout", ["test", "validation", "valid", "Val"])
def test_train_with_any_holdout_folder_is_a_split_never_two_classes(tmp_path, holdout):
    make_folder(tmp_path / "train", per_class=3)
    make_folder(tmp_path / holdout, per_class=2)
    ds = load_dataset(tmp_path, val_split=None)
    assert ds.layout == "train+val" and len(ds.train) == 6 and len(ds.val) == 4
    assert "train" not in ds.classes and holdout not in ds.classes and ds.split["method"] == "explicit"


def test_val_is_the_holdout_when_test_is_there_too(tmp_path, caplog, monkeypatch):
    # an in-process CLI run earlier in the session stops "edgetl" propagating to the root logger
    monkeypatch.setattr(logging.getLogger("edgetl"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="edgetl")
    make_folder(tmp_path / "train", per_class=3)
    make_folder(tmp_path / "val", per_class=2)
    make_folder(tmp_path / "test", per_class=1)
    ds = load_dataset(tmp_path)
    assert len(ds.val) == 4 and not any(s.path.relative_to(tmp_path).parts[0] == "test" for s in ds.train + ds.val)
    assert "test/ left out" in caplog.text, caplog.text


def test_train_folder_alone_is_its_classes(tmp_path):
    make_folder(tmp_path / "train", per_class=3)
    ds = load_dataset(tmp_path, val_split=None)
    assert ds.classes == ["a", "b"] and len(ds.train) == 6 and not ds.val


@pytest.mark.parametrize("folders", [("test", "bolt"), ("train", "nut"), ("val",)])
def test_split_folders_without_a_known_layout_are_refused_in_one_line(tmp_path, folders):
    for f in folders:
        make_folder(tmp_path / f, per_class=2)
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path)
    assert "not a layout edgetl knows" in str(e.value) and "\n" not in str(e.value)


def test_no_val_split_keeps_every_item_for_training(tmp_path):
    make_folder(tmp_path, classes=("bolt", "nut"), per_class=5)
    ds = load_dataset(tmp_path, val_split=None)
    assert len(ds.train) == 10 and not ds.val and ds.split["method"] == "out-of-fold"


def test_csv_manifest_with_split(tmp_path):
    make_folder(tmp_path / "img", per_class=3)
    rows = (
        ["path,label,split"]
        + [f"img/a/a{i}.png,a,{'val' if i == 0 else 'train'}" for i in range(3)]
        + [f"img/b/b{i}.png,b,{'val' if i == 0 else 'train'}" for i in range(3)]
    )
    (tmp_path / "labels.csv").write_text("\n".join(rows))
    ds = load_dataset(tmp_path / "labels.csv")
    assert ds.layout == "csv" and len(ds.train) == 4 and len(ds.val) == 2


def test_csv_outside_root_is_refused(tmp_path):
    write_image(tmp_path / "outside.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "labels.csv").write_text("path,label\n../outside.png,a\n")
    with pytest.raises(DataError, match="outside"):
        load_dataset(tmp_path / "sub" / "labels.csv")


@pytest.mark.parametrize("case", ["missing", "empty", "single", "loose"])
def test_bad_datasets_give_one_line_errors(tmp_path, case):
    root = tmp_path / "data"
    if case == "empty":
        root.mkdir()
    elif case == "single":
        make_folder(root, classes=("only",))
    elif case == "loose":
        write_image(root / "x.png")
    with pytest.raises(DataError) as err:
        load_dataset(root)
    msg = str(err.value)
    assert "\n" not in msg and str(root) in msg


def test_class_with_no_usable_image(tmp_path):
    make_folder(tmp_path, classes=("a", "b"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="'c' has no usable image"):
        load_dataset(tmp_path)


def test_bad_files_skipped_and_named_or_fatal_with_strict(tmp_path):
    make_folder(tmp_path, per_class=4)
    good = (tmp_path / "a" / "a0.png").read_bytes()
    (tmp_path / "a" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "b" / "notes.txt").write_text("hello")
    ds = load_dataset(tmp_path)
    skipped = {p.name for p, _ in ds.skipped}
    assert skipped == {"truncated.png", "notes.txt"}
    with pytest.raises(DataError, match="truncated.png"):
        load_dataset(tmp_path, strict=True)


def test_validation_class_unknown_to_training(tmp_path):
    make_folder(tmp_path / "train", classes=("a", "b"))
    make_folder(tmp_path / "val", classes=("a", "z"))
    with pytest.raises(DataError, match="'z'"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "1", "I;16", "LA"])
def test_every_mode_decodes_to_rgb(tmp_path, mode):
    suffix = ".tif" if mode in ("CMYK", "I;16") else ".png"
    p = write_image(tmp_path / f"im{suffix}", mode=mode)
    im = load_rgb(p)
    assert im.mode == "RGB" and im.size == (64, 48)
    x = preprocess_file(p, PreprocessConfig())
    assert x.shape == (3, 224, 224) and x.dtype == np.float32 and np.isfinite(x).all()


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 40000, dtype=np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(arr).save(p)
    px = np.asarray(load_rgb(p))
    assert 150 < px.mean() < 160  # 40000/65535*255 = 155.6; clipping would give 255


def test_exif_rotation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif.tobytes())
    assert load_rgb(p).size == (20, 40)


def test_transparent_pixels_become_grey(tmp_path):
    p = tmp_path / "cut.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(p)
    assert tuple(np.asarray(load_rgb(p))[0, 0]) == (128, 128, 128)


def test_split_keeps_one_val_per_class(tmp_path):
    make_folder(tmp_path, classes=("a", "b"), per_class=2)
    ds = load_dataset(tmp_path, val_split=0.1)
    assert sorted(s.label for s in ds.val) == ["a", "b"]


def test_list_images_expands_folders_and_rejects_missing(tmp_path):
    make_folder(tmp_path, per_class=2)
    assert len(list_images([tmp_path])) == 4
    with pytest.raises(DataError, match="no such file"):
        list_images([tmp_path / "nope.jpg"])


def test_checked_images_skip_the_decode_of_known_content_only(tmp_path, monkeypatch):
    from edgetl.tasks.classify.data import CheckedImages, check_image

    good = write_image(tmp_path / "a.png")
    checked = CheckedImages(tmp_path / "cache")
    digest = check_image(good, checked)
    assert digest in checked
    truncated = tmp_path / "t.png"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(DataError):
        check_image(truncated, checked)
    # Known content is not decoded again (the decoder is made to fail to prove it); unknown still is.
    monkeypatch.setattr(Image, "open", lambda *a, **k: (_ for _ in ()).throw(OSError("decoder called")))
    assert check_image(good, checked) == digest
    with pytest.raises(DataError, match="decoder called"):
        check_image(truncated, checked)
