"""Tiled scoring of frames larger than the backbone's input: the plan, the stitching, and a real
tiled bundle (real backbone, FP32) through predict, heat maps, eval, adapt and the error for a frame
of the wrong shape."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from edgetl.core.preprocess import PreprocessConfig
from edgetl.errors import DataError
from edgetl.tasks.anomaly.tiles import DEFAULT_DEFECT_SIZE, MIN_INPUT_PX, TilePlan, plan_tiles


def test_plan_covers_the_frame_with_the_fewest_tiles():
    assert plan_tiles((224, 224), 224, None) is None  # one view already
    assert plan_tiles((256, 200), 224, 3) is None
    assert plan_tiles((1024, 1024), 224, 40) is None  # a large defect survives the single view
    p = plan_tiles((1024, 768), 224, None)
    s = MIN_INPUT_PX / DEFAULT_DEFECT_SIZE
    assert p.work == (round(1024 * s), round(768 * s))
    for edges, length in ((p.xs, p.work[0]), (p.ys, p.work[1])):
        assert edges[0] == 0 and edges[-1] == length - 224
        assert len(edges) == -(-length // 224)  # ceil: no tile more than needed
        covered = np.zeros(length, bool)
        for e in edges:
            covered[e : e + 224] = True
        assert covered.all()
    assert p.count == len(p.xs) * len(p.ys) and len(p.boxes) == p.count
    assert TilePlan.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    # a smaller defect asks for more resolution, never more than the frame has
    fine = plan_tiles((1024, 768), 224, 1)
    assert fine.work == (1024, 768) and fine.count > p.count


def test_every_plan_fit_writes_reads_back_and_a_hostile_one_is_refused():
    # no false refusal: whatever plan fit makes, over frame shapes and defect sizes, reads back
    plans = 0
    for w in (300, 448, 640, 1024, 1280, 1920, 2592, 4000):
        for h in (260, 480, 768, 1024, 1944, 3000):
            for d in (1, 2, 3, 5, 8, 13):
                p = plan_tiles((w, h), 224, d, overview=d % 2 == 0)
                if p is not None:
                    assert TilePlan.from_dict(json.loads(json.dumps(p.to_dict()))) == p
                    plans += 1
    assert plans > 100
    # a plan fit could not have written: the device would allocate by it, so it is refused
    good = plan_tiles((1024, 768), 224, 3).to_dict()
    hostile = {
        "frame": [0, 0],
        "work": [10**6, 10**6],  # upscaled to a terapixel frame
        "tile": -5,
        "xs": list(range(0, 60)),  # thousands of tiles per frame
        "ys": [0, 10**5],  # past the frame's edge
        "defect_size": float("nan"),
        "overview": "yes",
    }
    for key, value in hostile.items():
        with pytest.raises(ValueError):
            TilePlan.from_dict({**good, key: value})
    missing = {k: v for k, v in good.items() if k != "work"}
    for broken in ("tiles", None, [], missing, {**good, "xs": ["a"]}, {**good, "tile": float("inf")}):
        with pytest.raises(ValueError):
            TilePlan.from_dict(broken)
    with pytest.raises(ValueError, match="pixel budget"):
        TilePlan.from_dict({**good, "frame": [10**5, 10**5]})


def test_frames_take_the_max_over_tiles_and_stitch_maps_in_place():
    p = TilePlan((300, 300), (300, 300), 224, (0, 76), (0, 76), 3.0)
    rng = np.random.default_rng(0)
    maps = rng.uniform(0, 1, (2 * p.count, 224, 224)).astype(np.float32)
    maps[5, 10, 20] = 9.0  # frame 1, tile 1 (x = 76, y = 0): frame pixel (row 10, col 96)
    scores = rng.uniform(0, 1, 2 * p.count).astype(np.float32)
    m, s = p.frames(maps, scores)
    assert m.shape == (2, 300, 300)
    np.testing.assert_array_equal(s, scores.reshape(2, -1).max(1))
    assert np.unravel_index(np.argmax(m[1]), m[1].shape) == (10, 96)
    # every frame pixel is the maximum of the tiles that cover it
    for y, x in ((0, 0), (150, 150), (299, 299), (100, 250)):
        cover = [
            maps[4 + i][y - ty, x - tx]
            for i, (tx, ty) in enumerate(p.boxes)
            if tx <= x < tx + 224 and ty <= y < ty + 224
        ]
        assert m[1, y, x] == max(cover)


def test_the_overview_joins_the_tiles_as_z_scores_in_score_and_map():
    from edgetl.heads.defect import softmax2
    from edgetl.tasks.anomaly.tiles import Overview

    p = TilePlan((300, 300), (300, 300), 224, (0, 76), (0, 76), 3.0, overview=True)
    rng = np.random.default_rng(0)
    # raw units differ per view (tiles ~ 20 +- 2, overview ~ 5 +- 0.5): only z-scores compare
    ov = Overview(None, {"tiles": (20.0, 2.0), "overview": (5.0, 0.5)})
    n = 6
    tile_maps = rng.normal(18, 1, (n * p.count, 224, 224)).astype(np.float32)
    tile_scores = tile_maps.reshape(n * p.count, -1).max(1)
    om = rng.normal(4.5, 0.2, (n, 224, 224)).astype(np.float32)
    om[2, 100:140, 150:190] = 7.5  # a large defect only the whole view sees: +5 sd there
    maps, scores = p.frames(tile_maps, tile_scores, (om, om.reshape(n, -1).max(1)), ov)
    z_t = (tile_scores.reshape(n, -1).max(1) - 20.0) / 2.0
    z_o = (om.reshape(n, -1).max(1) - 5.0) / 0.5
    c = max(20.0 / 2.0, 5.0 / 0.5)
    np.testing.assert_allclose(scores, softmax2(z_t + c, z_o + c), rtol=1e-5)
    assert scores[2] > np.delete(scores, 2).max() + 2  # caught, though its tiles look like the rest
    assert z_t[2] <= np.delete(z_t, 2).max()  # the tiles alone would not single it out
    # the map: both views in the score's units; the overview's peak lands where it is in the frame
    assert maps.shape == (n, 300, 300)
    row, col = np.unravel_index(np.argmax(maps[2]), maps[2].shape)
    assert 100 * 300 / 224 - 2 <= row <= 140 * 300 / 224 + 2 and 150 * 300 / 224 - 2 <= col <= 190 * 300 / 224 + 2
    tiles_only = p.frames(tile_maps, tile_scores)[0]
    np.testing.assert_allclose(maps[0] >= (tiles_only[0] - 20.0) / 2.0 + c - 1e-4, True)
    assert np.all(scores >= maps.reshape(n, -1).max(1) - 1e-4)  # a score never below its map


def test_tile_inputs_are_crops_of_the_scaled_frame(tmp_path):
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (480, 640, 3), np.uint8)
    Image.fromarray(frame).save(tmp_path / "f.png")
    p = plan_tiles((640, 480), 224, 3, overview=True)
    pre = PreprocessConfig(crop_pct=1.0)
    x = p.inputs(tmp_path / "f.png", pre)
    # the tiles, then one whole-frame view: one more row of the same batch, same input shape
    assert p.overview and p.rows == p.count + 1
    assert x.shape == (p.rows, 3, 224, 224)
    work_im = Image.fromarray(frame).resize(p.work, Image.Resampling.BICUBIC, reducing_gap=3.0)
    work = np.asarray(work_im, np.float32)
    x0, y0 = p.boxes[-1]
    np.testing.assert_allclose(
        x[p.count - 1].transpose(1, 2, 0), (work[y0 : y0 + 224, x0 : x0 + 224] / 255 - 0.5) / 0.5, atol=1e-6
    )
    whole = np.asarray(work_im.resize((224, 224), Image.Resampling.BICUBIC, reducing_gap=3.0), np.float32)
    np.testing.assert_allclose(x[-1].transpose(1, 2, 0), (whole / 255 - 0.5) / 0.5, atol=1e-6)
    tiles, views = p.split(np.concatenate([x, x]))  # two frames' rows -> their tiles, their overviews
    np.testing.assert_array_equal(tiles, np.concatenate([x[: p.count]] * 2))
    np.testing.assert_array_equal(views, np.stack([x[-1]] * 2))
    # a plan saved before the overview (no key) reads as tiles alone: same rows, same feature-cache key
    old = {k: v for k, v in p.to_dict().items() if k != "overview"}
    before = TilePlan.from_dict(old)
    assert not before.overview and before.rows == before.count
    assert before.inputs(tmp_path / "f.png", pre).shape == (p.count, 3, 224, 224)
    assert before.to_dict() == old and before.digest() != p.digest()
    Image.fromarray(frame[:, :400]).save(tmp_path / "narrow.png")
    with pytest.raises(DataError, match="narrow.png: a 400 x 480 frame; this bundle was fitted on 640 x 480"):
        p.inputs(tmp_path / "narrow.png", pre)


# ----- a real tiled bundle --------------------------------------------------------------------------
def _frames(root, n_train=8, n_good=3, n_bad=3, size=448):
    """Gravel frames of ``size`` px; defects: a dark 2 px scratch (mask written)."""
    from PIL import ImageDraw
    from skimage import data

    src = Image.fromarray(data.gravel()).convert("RGB").resize((size + 64, size + 64), Image.Resampling.BICUBIC)
    rng = np.random.default_rng(0)

    def frame():
        x, y = rng.integers(0, 64, 2)
        return src.crop((x, y, x + size, y + size))

    for i in range(n_train):
        (root / "train/good").mkdir(parents=True, exist_ok=True)
        frame().save(root / "train/good" / f"{i}.png")
    for i in range(n_good):
        (root / "test/good").mkdir(parents=True, exist_ok=True)
        frame().save(root / "test/good" / f"{i}.png")
    for i in range(n_bad):
        f, mask = frame(), Image.new("L", (size, size), 0)
        pts = [(100 + 40 * i, 120), (180 + 40 * i, 160), (230 + 40 * i, 150)]
        ImageDraw.Draw(f).line(pts, fill=(10, 10, 10), width=2)
        ImageDraw.Draw(mask).line(pts, fill=255, width=2)
        for sub in ("test/scratch", "ground_truth/scratch"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        f.save(root / "test/scratch" / f"{i}.png")
        mask.save(root / "ground_truth/scratch" / f"{i}_mask.png")
    return root


@pytest.fixture(scope="module")
def tiled(tmp_path_factory, cache_dir):
    from edgetl import FitOptions, fit
    from edgetl.tasks.anomaly.task import ANOMALY

    root = _frames(tmp_path_factory.mktemp("tiled") / "frames")
    out = root.parent / "tiled.bundle"
    r = fit(
        root,
        out,
        options=FitOptions(
            # the overview asked for: by default it is fitted only beside labelled anomalies that show it helps
            head=ANOMALY.head_config({"kind": "combined", "defect_size": 3, "overview": "on"}),
            target="cpu-x86",
            precision="fp32",
            cache_dir=str(cache_dir),
            reference=False,
            quiet=True,
        ),
    )
    return root, out, r


def _views(p, frames):
    """(tile frame maxima, overview scores) of frames under a predictor's two heads (numpy)."""
    from edgetl.tasks.anomaly.task import PatchExtractor, score_rows

    ext = PatchExtractor(p.session, p.preprocess, p.bundle.model_file("backbone"), p.shape)
    tiles, whole = p.plan.split(ext.tiles(frames, p.plan))
    return p.plan.frames(*score_rows(p.head, tiles))[1], score_rows(p.overview.head, whole)[1]


def test_tiled_bundle_scores_a_whole_frame_overview_beside_the_tiles(tiled, tmp_path):
    import shutil

    from edgetl import load_predictor
    from edgetl.core.bundle import load_bundle
    from edgetl.errors import BundleError
    from edgetl.tasks.anomaly.task import ANOMALY, AnomalyPredictor

    root, out, r = tiled
    copy = tmp_path / "b"
    shutil.copytree(out, copy)  # the module's bundle is adapted by the test after this one
    manifest = json.loads((copy / "manifest.json").read_text())
    entry = manifest["head"]["versions"][0]
    # its own memory, in a file of its own, hashed in the manifest like the head
    assert manifest["anomaly"]["tiles"]["overview"] is True
    assert entry["overview"] == "overview.npz" and entry["overview"] in manifest["files"]
    assert set(entry["overview_norm"]) == {"tiles", "overview"}
    assert r.report["tiling"]["overview_memory"] > 0
    assert any("whole frame in one view" in line for line in ANOMALY.fit_lines(r))
    p = load_predictor(copy)
    assert p.overview.head.memory_size == r.report["tiling"]["overview_memory"] != p.head.memory_size
    frames = sorted((root / "test").rglob("*.png"))
    maps, scores = p.maps(frames)
    # the frame's score is the soft maximum of the two views' z-scores (numpy, backbone + heads)
    numpy_path = AnomalyPredictor(p.bundle, fused=False)
    st, so = _views(numpy_path, frames)
    np.testing.assert_allclose(scores, p.overview.combine(st, so), rtol=1e-4)
    assert np.all(scores >= np.maximum(p.overview.term("tiles", st), p.overview.term("overview", so)) - 1e-4)
    # the frame map holds both views in those units: never below the overview's map upsampled
    om = numpy_path.maps(frames)[0]
    np.testing.assert_allclose(om, maps, rtol=1e-4, atol=1e-4)
    # a changed overview file is refused, naming it
    raw = bytearray((copy / "overview.npz").read_bytes())
    raw[-10] ^= 0xFF
    (copy / "overview.npz").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="overview.npz"):
        load_predictor(load_bundle(copy)).maps(frames[:1])


def test_a_bundle_with_a_damaged_tile_plan_is_refused_in_one_line(tiled, tmp_path, no_torch_env):
    import shutil

    from edgetl import load_predictor
    from edgetl.errors import BundleError
    from tests.conftest import run_cli

    root, out, _ = tiled
    frame = sorted((root / "test").rglob("*.png"))[0]
    for i, edit in enumerate(
        (
            lambda t: t.update(xs=list(range(0, 76)), ys=list(range(0, 76))),  # 5,776 tiles a frame
            lambda t: t.update(work=[448 * 1000, 448 * 1000]),  # a 448 px frame upscaled 1000x
            lambda t: t.update(tile=112),  # not the model's input
            lambda t: t.pop("frame"),
        )
    ):
        b = tmp_path / f"b{i}"
        shutil.copytree(out, b)
        m = json.loads((b / "manifest.json").read_text())
        edit(m["anomaly"]["tiles"])
        (b / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(BundleError, match=r"manifest.json: the tile plan \(anomaly.tiles\) is damaged"):
            load_predictor(b)
    res = run_cli("predict", tmp_path / "b0", frame, env=no_torch_env)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "fit the bundle again" in res.stderr


def test_a_tiled_bundle_made_before_the_overview_scores_its_tiles_alone(tiled, tmp_path):
    import shutil

    from edgetl import load_predictor
    from edgetl.tasks.anomaly.task import AnomalyPredictor, PatchExtractor, score_rows

    root, out, _ = tiled
    old = tmp_path / "old"
    shutil.copytree(out, old)
    # the manifest as tiled bundles were written before: no overview in the plan or the version
    m = json.loads((old / "manifest.json").read_text())
    del m["anomaly"]["tiles"]["overview"]
    for e in m["head"]["versions"]:
        e.pop("overview"), e.pop("overview_norm")
    m["files"].pop("overview.npz")
    (old / "overview.npz").unlink()
    (old / "manifest.json").write_text(json.dumps(m))
    p = load_predictor(old)
    assert p.plan.rows == p.plan.count and p.overview is None
    frames = sorted((root / "test").rglob("*.png"))
    maps, scores = p.maps(frames)
    assert maps.shape == (len(frames), *p.plan.work[::-1])
    new = AnomalyPredictor(load_predictor(out).bundle, fused=False)
    st = _views(new, frames)[0]  # the tile head alone, on the same tiles
    np.testing.assert_allclose(scores, st, rtol=1e-4)
    numpy_path = AnomalyPredictor(p.bundle, fused=False)
    ext = PatchExtractor(numpy_path.session, p.preprocess, p.bundle.model_file("backbone"), p.shape)
    F = ext.tiles(frames, p.plan)
    assert len(F) == len(frames) * p.plan.count  # no overview row in its batch
    np.testing.assert_allclose(score_rows(numpy_path.head, F, p.plan)[1], scores, rtol=1e-4)


def test_tiled_bundle_predicts_per_frame_with_frame_sized_heat_maps(tiled, tmp_path, no_torch_env):
    from edgetl import load_predictor
    from edgetl.core.sessions import bundle_session
    from edgetl.tasks.anomaly.task import ANOMALY, AnomalyPredictor
    from tests.conftest import run_cli

    root, out, r = tiled
    plan = plan_tiles((448, 448), 224, 3, overview=True)
    assert json.loads((out / "manifest.json").read_text())["anomaly"]["tiles"] == plan.to_dict()
    assert r.report["tiling"]["count"] == plan.count == 4
    assert any(line.startswith("tiles ") and "ms of model a frame" in line for line in ANOMALY.fit_lines(r))
    p = load_predictor(out)
    frames = sorted((root / "test").rglob("*.png"))
    maps, scores = p.maps(frames)
    assert maps.shape == (len(frames), *plan.work[::-1])
    # the fused tile model against backbone + numpy head, frame by frame
    numpy_path = ANOMALY.predictor(p.bundle)
    # the fit held out a frame's tiles together and normalised on its 8 training frames
    assert numpy_path.head.meta == {"images": 8 * plan.count, "frames": 8}
    numpy_path.fused, numpy_path.session = False, bundle_session(p.bundle, p.bundle.model_file("backbone"))
    np.testing.assert_allclose(numpy_path.maps(frames)[1], scores, rtol=1e-4)
    # a scratch 2 px wide on a 448 px frame is found, and the map's peak sits on it
    m = p.evaluate(root)
    assert m["image_auroc"] == 1.0 and m["peak_in_mask"] == 1.0
    # heat maps at frame resolution, through the device CLI (no torch)
    res = run_cli("predict", out, root / "test" / "scratch", "--heatmaps", tmp_path / "hm", "--json", env=no_torch_env)
    assert res.returncode == 0, res.stderr
    with Image.open(tmp_path / "hm" / "0_heatmap.png") as im:
        assert im.size == (448, 448)
    # a frame of another shape: one line naming the file and what the bundle wants
    Image.open(frames[0]).crop((0, 0, 300, 448)).save(tmp_path / "cut.png")
    res = run_cli("predict", out, tmp_path / "cut.png", env=no_torch_env)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "cut.png: a 300 x 448 frame; this bundle was fitted on 448 x 448 frames" in res.stderr
    # the report draws the frame-sized maps over the frames
    if __import__("importlib").util.find_spec("matplotlib"):
        res = run_cli("report", out, root / "test", "--out", tmp_path / "r.html", env=no_torch_env)
        assert res.returncode == 0, res.stderr
        assert "regions" in json.loads((out / "report.json").read_text())["metrics"]
    # adapt on the device learns tiles of new good frames
    new = tmp_path / "new"
    new.mkdir()
    for f in sorted((root / "test" / "good").glob("*.png")):
        (new / f.name).write_bytes(f.read_bytes())
    before_ov = p.overview.head
    res = run_cli("adapt", out, new, "--json", env=no_torch_env)
    assert res.returncode == 0, res.stderr
    q = load_predictor(out)
    after = q.maps(sorted((root / "test" / "good").glob("*.png")))[1]
    assert np.all(after <= scores[: len(after)] * (1 + 1e-5))  # their own tiles are now in memory
    # both memories learned the new frames: the tiles' and the overview's (a file of the new
    # version, hashed); the normalisation carries over
    entry = q.bundle.head_entry()
    assert entry["overview"] == "overview/v2.npz" and entry["overview"] in q.bundle.manifest["files"]
    assert entry["overview_norm"] == p.bundle.head_entry(1)["overview_norm"]
    assert q.head.memory_size > p.head.memory_size
    assert q.overview.head.memory_size > before_ov.memory_size
    views = _views(AnomalyPredictor(q.bundle, fused=False), sorted(new.glob("*.png")))
    old_views = _views(AnomalyPredictor(p.bundle, fused=False, head_version=1), sorted(new.glob("*.png")))
    # their whole views are now in the overview's memory: none scores higher, and they score lower
    assert np.all(views[1] <= old_views[1] * (1 + 1e-5)) and views[1].mean() < old_views[1].mean()


def test_a_tiled_fit_on_good_frames_alone_checks_its_fused_model_on_tiles(tmp_path, cache_dir, no_torch_env):
    """Good frames only (no test folder), as a line often starts: the fused model's check must
    compare it with the numpy head on the same tile rows, not on whole frames shrunk to one view
    (which read as a 15-19 % disagreement and stopped the fit)."""
    from tests import tiled
    from tests.conftest import run_cli

    frames = tiled.good_frames(tmp_path / "line" / "good", 4, seed=5)
    out = tmp_path / "line.bundle"
    r = run_cli(
        "fit",
        tmp_path / "line",
        "--out",
        out,
        "--head",
        "patchcore",
        "--defect-size",
        str(tiled.DEFECT_SIZE),
        "--precision",
        "fp32",
        "--runtime",
        "onnxruntime",
        "--json",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["tiling"]["count"] == 4
    par = report["fused_parity"]
    assert par["passed"] and par["images"] == 4 and par["max_rel_score_diff"] < 1e-3, par
    res = run_cli("predict", out, frames[0], "--json", env=no_torch_env)
    assert res.returncode == 0, res.stderr
