"""The built-in example datasets: layout, determinism, honest splits, defect masks, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage", reason="the example datasets are built from scikit-image's images")

from edgetl import datasets  # noqa: E402
from edgetl.datasets import images as ex  # noqa: E402
from edgetl.errors import ConfigError, DataError, MissingDependency  # noqa: E402


def _manifest(root: Path) -> dict:
    return json.loads((root / ex.MANIFEST).read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).copy()


@pytest.fixture(scope="module")
def defects(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ex") / "defects"
    ex.make_defects(out, seed=0, n_train_good=6, n_test_good=3, n_test_defect=12, size=128)
    return out


# ----------------------------------------------------------------------------------- surfaces
def test_surfaces_layout_counts_and_loader(surfaces):
    """conftest builds it with per_class=16, val_per_class=8 at the default size."""
    from edgetl.tasks.classify.data import load_dataset

    doc = _manifest(surfaces)
    assert doc["classes"] == list(ex.SURFACE_CLASSES) and 6 <= len(doc["classes"]) <= 8
    for split, n in (("train", 16), ("val", 8)):
        assert sorted(p.name for p in (surfaces / split).iterdir()) == sorted(ex.SURFACE_CLASSES)
        for cls in ex.SURFACE_CLASSES:
            files = sorted((surfaces / split / cls).glob("*.png"))
            assert len(files) == n
            with Image.open(files[0]) as im:
                assert im.mode == "RGB" and im.size == (160, 160)
    assert len(doc["items"]) == 8 * (16 + 8)
    ds = load_dataset(surfaces, strict=True)
    assert ds.layout == "train+val" and ds.classes == sorted(ex.SURFACE_CLASSES)
    assert all(v == {"train": 16, "val": 8} for v in ds.counts().values())


def test_surfaces_val_crops_come_from_regions_no_train_crop_touches(surfaces):
    doc = _manifest(surfaces)
    by = {(it["label"], it["split"]): [] for it in doc["items"]}
    for it in doc["items"]:
        by[(it["label"], it["split"])].append(it)
    for cls in ex.SURFACE_CLASSES:
        src = doc["sources"][cls]
        assert not ex.boxes_overlap(src["train_region"], src["val_region"])
        for split in ("train", "val"):
            reg = src[f"{split}_region"]
            for it in by[(cls, split)]:
                b = it["box"]
                assert reg[0] <= b[0] < b[2] <= reg[2] and reg[1] <= b[1] < b[3] <= reg[3], (it, reg)
        for v in by[(cls, "val")]:
            assert not any(ex.boxes_overlap(v["box"], t["box"]) for t in by[(cls, "train")]), v
    # ...and the bookkeeping is what made the pixels: re-render some crops from their records.
    for cls in ex.SURFACE_CLASSES:
        for split in ("train", "val"):
            it = by[(cls, split)][0]
            np.testing.assert_array_equal(ex.rerender(surfaces, it), _read(surfaces / it["file"]))


def test_surfaces_rerender_detects_a_wrong_box(surfaces):
    """The re-render check above can fail: a record pointing elsewhere does not match the file."""
    it = dict(_manifest(surfaces)["items"][0])
    b = it["box"]
    it["box"] = [b[0] + 5, b[1] + 5, b[2] + 5, b[3] + 5]
    assert not np.array_equal(ex.rerender(surfaces, it), _read(surfaces / it["file"]))


def test_rotated_crops_take_no_fill_colour_from_outside_the_box():
    """A flat source stays flat: no black rotation corners reach the crop through the resize."""
    src = np.full((240, 240, 3), 200, np.uint8)
    flat = dict(
        ex._SURFACE_AUG, p_blur=0.0, p_noise=0.0, brightness=(1, 1), contrast=(1, 1), saturation=(1, 1), tint=0.0
    )
    for seed in range(60):
        rng = np.random.default_rng(seed)
        w = int(rng.integers(24, 200))
        out, params = ex._render_crop(src, [0, 0, w, w], 96, rng, flat)
        assert out.min() == out.max() == 200, (seed, w, params)


def test_surfaces_are_deterministic_per_seed(tmp_path):
    kw = dict(per_class=3, val_per_class=2, size=64)
    a = ex.make_surfaces(tmp_path / "a", seed=0, **kw)
    ex.make_surfaces(tmp_path / "b", seed=0, **kw)
    ex.make_surfaces(tmp_path / "c", seed=1, **kw)
    fa, fb, fc = (_files(tmp_path / n) for n in "abc")
    assert len(fa) == 8 * 5 + 1 and fa == fb
    assert fa.keys() == fc.keys()
    differ = [k for k in fa if k.endswith(".png") and fa[k] != fc[k]]
    assert len(differ) == 8 * 5
    assert a["counts"]["brick"] == {"train": 3, "val": 2} and Path(a["manifest"]).is_file()
    json.dumps(a)  # the CLI prints the summary as JSON


def test_pixel_baseline_is_above_chance_but_far_from_perfect(surfaces):
    """Logistic regression on 16x16 RGB thumbnails: the task is learnable, but not by raw pixels."""
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    def load(split):
        xs, ys = [], []
        for p in sorted((surfaces / split).glob("*/*.png")):
            with Image.open(p) as im:
                xs.append(np.asarray(im.resize((16, 16), Image.Resampling.BOX), np.float32).ravel() / 255)
            ys.append(p.parent.name)
        return np.array(xs), np.array(ys)

    xt, yt = load("train")
    xv, yv = load("val")
    with threadpool_limits(1):  # BLAS threads fighting over 2 cores made this tiny fit take 20 s
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(xt, yt)
        acc = clf.score(xv, yv)
    chance = 1 / len(ex.SURFACE_CLASSES)
    assert 2 * chance < acc < 0.9, acc


# ----------------------------------------------------------------------------------- defects
def test_defects_mvtec_layout_and_masks(defects):
    doc = _manifest(defects)
    assert doc["texture"] == "brick" and doc["defect_types"] == list(ex.DEFECT_TYPES)
    assert len(list((defects / "train" / "good").glob("*.png"))) == 6
    assert len(list((defects / "test" / "good").glob("*.png"))) == 3
    assert sorted(p.name for p in (defects / "test").iterdir()) == sorted(["good", *ex.DEFECT_TYPES])
    assert sorted(p.name for p in (defects / "ground_truth").iterdir()) == sorted(ex.DEFECT_TYPES)
    n = {k: len(list((defects / "test" / k).glob("*.png"))) for k in ex.DEFECT_TYPES}
    assert sum(n.values()) == 12 and set(n.values()) == {2, 3}  # 12 over 5 types: 3,3,2,2,2
    for kind in ex.DEFECT_TYPES:
        for img in sorted((defects / "test" / kind).glob("*.png")):
            mask_path = defects / "ground_truth" / kind / f"{img.stem}_mask.png"
            im, mask = _read(img), _read(mask_path)
            assert im.shape == (128, 128, 3) and mask.shape == (128, 128)
            assert set(np.unique(mask)) == {0, 255}
            assert 0.003 < (mask > 0).mean() < 0.25, (img, (mask > 0).mean())
    assert not (defects / "ground_truth" / "good").exists()


def test_defects_alter_exactly_the_masked_pixels(defects):
    doc = _manifest(defects)
    damaged = [it for it in doc["items"] if it["label"] != "good"]
    assert len(damaged) == 12
    for it in damaged:
        clean = ex.rerender(defects, it)
        bad = _read(defects / it["file"]).astype(int)
        mask = _read(defects / it["mask"]) > 0
        diff = np.abs(bad - clean).max(axis=2)
        assert (diff[~mask] == 0).all(), it["file"]  # nothing changes outside the mask
        assert diff[mask].max() >= 25, it["file"]  # ...and something visible changes inside it
        assert (diff[mask] > 2).mean() > 0.2, it["file"]  # the mask is not mostly slack
    for it in doc["items"]:
        if it["label"] == "good":
            np.testing.assert_array_equal(ex.rerender(defects, it), _read(defects / it["file"]))


def test_defects_train_and_test_come_from_disjoint_regions(defects):
    doc = _manifest(defects)
    src = doc["sources"]["brick"]
    train = [it["box"] for it in doc["items"] if it["split"] == "train"]
    test = [it["box"] for it in doc["items"] if it["split"] == "test"]
    assert len(train) == 6 and len(test) == 15
    for b in train:
        assert not ex.boxes_overlap(b, src["test_region"])
    for b in test:
        assert not ex.boxes_overlap(b, src["train_region"])
        assert not any(ex.boxes_overlap(b, t) for t in train)


def test_defects_are_deterministic_per_seed(tmp_path):
    kw = dict(n_train_good=2, n_test_good=1, n_test_defect=5, size=64, texture="gravel")
    ex.make_defects(tmp_path / "a", seed=3, **kw)
    ex.make_defects(tmp_path / "b", seed=3, **kw)
    ex.make_defects(tmp_path / "c", seed=4, **kw)
    fa, fb, fc = (_files(tmp_path / n) for n in "abc")
    assert fa == fb and len(fa) == 2 + 1 + 5 + 5 + 1
    assert all(fa[k] != fc[k] for k in fa if k.endswith(".png") and "_mask" not in k)


@pytest.mark.parametrize("texture", ex.DEFECT_TEXTURES)
def test_every_defect_type_on_every_texture(texture):
    plan = ex.defect_plan(texture)
    src, _ = ex._region(texture)
    rng = np.random.default_rng(0)
    box = ex._sample_box(rng, plan["test_region"], plan["max_window"])
    clean, _ = ex._render_crop(src, box, 96, rng, ex._DEFECT_AUG)
    for kind in ex.DEFECT_TYPES:
        for seed in range(2):
            bad, mask, params = ex.apply_defect(clean, kind, np.random.default_rng(seed), texture=texture)
            m = mask > 0
            assert bad.shape == clean.shape and bad.dtype == np.uint8 and mask.shape == clean.shape[:2]
            assert m.any() and (bad[~m] == clean[~m]).all() and (bad[m] != clean[m]).any()
            assert params["type"] == kind


# ----------------------------------------------------------------------------------- entry point
def test_make_example_names_and_options(tmp_path):
    with pytest.raises(ConfigError, match="defects, surfaces, tickets"):
        datasets.make_example("nope", tmp_path / "x")
    with pytest.raises(ConfigError, match="texture"):
        datasets.make_example("defects", tmp_path / "x", texture="marble")
    with pytest.raises(ConfigError, match="per_class"):
        datasets.make_example("surfaces", tmp_path / "x", bogus=1)
    with pytest.raises(ConfigError, match="per_class"):
        datasets.make_example("surfaces", tmp_path / "x", per_class=0)
    with pytest.raises(ConfigError, match="seed"):
        datasets.make_example("defects", tmp_path / "x", seed=-1)
    assert not (tmp_path / "x").exists()
    s = datasets.make_example("surfaces", tmp_path / "s", seed=2, per_class=1, val_per_class=1, size=32)
    assert s["name"] == "surfaces" and s["seed"] == 2 and len(list((tmp_path / "s").rglob("*.png"))) == 16
    assert set(datasets.EXAMPLES) == {"surfaces", "defects", "tickets"}
    t = datasets.make_example("tickets", tmp_path / "t", per_class=4, val_per_class=2)
    rows = (tmp_path / "t" / "tickets.csv").read_text().splitlines()
    assert rows[0] == "text,label,split" and len(rows) == 1 + 5 * (4 + 2) and t


def test_non_empty_out_dir_is_refused_unless_force_replaces_an_example(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty") as info:
        ex.make_surfaces(out, per_class=1, val_per_class=1, size=32)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="not an example"):  # force never deletes a foreign folder
        ex.make_surfaces(out, per_class=1, val_per_class=1, size=32, force=True)
    assert (out / "mine.txt").read_text() == "keep me"

    (out / "mine.txt").unlink()  # an empty folder is fine
    ex.make_surfaces(out, per_class=1, val_per_class=1, size=32)
    with pytest.raises(DataError, match="force"):
        ex.make_defects(out, n_train_good=1, n_test_good=1, n_test_defect=1, size=64)
    ex.make_defects(out, n_train_good=1, n_test_good=1, n_test_defect=1, size=64, force=True)
    assert _manifest(out)["name"] == "defects" and not (out / "val").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left behind

    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="file"):
        ex.make_surfaces(tmp_path / "afile", force=True)


def test_a_crash_leaves_no_half_dataset(tmp_path, monkeypatch):
    real, calls = ex._save_png, []

    def flaky(arr, path):
        calls.append(path)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        real(arr, path)

    monkeypatch.setattr(ex, "_save_png", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        ex.make_surfaces(tmp_path / "out", per_class=2, val_per_class=1, size=32)
    assert list(tmp_path.iterdir()) == []


def test_missing_scikit_image_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage.data", None)  # makes the import fail
    ex._load_image.cache_clear()
    try:
        with pytest.raises(MissingDependency, match=r"edgetl\[train\]"):
            ex.make_surfaces(tmp_path / "out", per_class=1, val_per_class=1, size=32)
    finally:
        ex._load_image.cache_clear()
    assert list(tmp_path.iterdir()) == []
