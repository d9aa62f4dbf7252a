"""Anomaly heads, metrics, map operator and scoring graph on small synthetic arrays (no backbone).

Reference implementations are independent ones: scikit-learn (AUROC, OAS), scipy.ndimage
(Gaussian smoothing), ONNX Runtime's own Resize op (bilinear upsampling) and OpenVINO.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from edgetl import tasks
from edgetl.core.metrics import auroc, best_f1_threshold
from edgetl.errors import BundleError, ConfigError, DataError
from edgetl.heads.patch import (
    AnomalyConfig,
    AnomalyHead,
    _blur_matrix,
    _interp_matrix,
    greedy_coreset,
    map_operator,
    maps_from_patches,
    oas_shrink,
    quantile_threshold,
)
from edgetl.heads.patch import fit_patch_head as fit_head
from edgetl.heads.patch import update_patch_head as update_head
from edgetl.tasks.anomaly.data import load_anomaly_data
from edgetl.tasks.anomaly.metrics import detection_metrics, dilate, peak_in_mask
from edgetl.tasks.anomaly.render import overlay, save_overlay

# Fused graph vs numpy, both float32 on the same features: only summation order differs.
GRAPH_RTOL = 1e-4


def _features(n: int, seed: int, *, c: int = 6, grid: int = 8, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    F = rng.standard_normal((n, c, grid, grid)).astype(np.float32)
    F[:, 0] += np.linspace(0, 1, grid)[None, :, None].astype(np.float32)  # a position-dependent mean
    return F + shift


# ------------------------------------------------------------------------------------ metrics
def test_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.standard_normal(500) + y, 1)  # rounding makes many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auroc(np.zeros(3), np.arange(3)) is None
    assert auroc([0, 1], [0.2, 0.9]) == 1.0 and auroc([1, 0], [0.2, 0.9]) == 0.0


def test_best_f1_threshold_is_the_best_cut():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60).astype(bool)
    s = rng.standard_normal(60) + 1.5 * y
    t, f1 = best_f1_threshold(y, s)

    def f1_at(c):
        p = s >= c
        tp = np.sum(p & y)
        return 2 * tp / (p.sum() + y.sum())

    assert f1 == pytest.approx(max(f1_at(c) for c in s))
    assert f1_at(t) == pytest.approx(f1)


def test_quantile_threshold_and_detection_metrics():
    cfg = AnomalyConfig(quantile=1.0, margin=1.1)
    assert quantile_threshold(np.array([1.0, 2.0, 3.0]), cfg) == pytest.approx(3.3)
    y = np.array([0, 0, 1, 1])
    m = detection_metrics(y, np.array([0.1, 0.6, 0.7, 0.9]), 0.5)
    assert m["image_auroc"] == 1.0 and m["confusion"] == {"tp": 2, "fp": 1, "fn": 0, "tn": 1}
    assert m["pixel_auroc"] is None


def test_peak_in_mask_uses_dilation():
    maps = np.zeros((2, 20, 20), np.float32)
    maps[0, 5, 5] = 1  # inside
    maps[1, 5, 9] = 1  # 2 px right of the mask
    mask = np.zeros((20, 20), bool)
    mask[4:7, 4:8] = True
    assert peak_in_mask(maps, [mask, mask], radius=0) == 0.5
    assert peak_in_mask(maps, [mask, mask], radius=2) == 1.0
    assert dilate(mask, 1).sum() == 5 * 6


# ------------------------------------------------------------------------------ map operator
def test_interp_matrix_equals_onnx_resize():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = np.random.default_rng(0).standard_normal((1, 1, 7, 7)).astype(np.float32)
    node = helper.make_node(
        "Resize", ["x", "", "", "sizes"], ["y"], mode="linear", coordinate_transformation_mode="half_pixel"
    )
    g = helper.make_graph(
        [node],
        "r",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 7, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.array([1, 1, 32, 32], np.int64), "sizes")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0][0, 0]
    R = _interp_matrix(7, 32)
    np.testing.assert_allclose(R @ x[0, 0] @ R.T, y, atol=1e-5)


def test_blur_matrix_equals_scipy_gaussian_filter():
    from scipy.ndimage import gaussian_filter

    img = np.random.default_rng(0).standard_normal((40, 40))
    G = _blur_matrix(40, 4.0)
    np.testing.assert_allclose(G @ img @ G.T, gaussian_filter(img, 4.0, mode="reflect", truncate=4.0), atol=1e-10)
    np.testing.assert_allclose(G.sum(axis=1), 1.0)


def test_map_operator_upsamples_and_keeps_constants():
    A = map_operator(8, 64, 4.0)
    S = np.full((1, 8, 8), 3.0, np.float32)
    maps, scores = maps_from_patches(S, A)
    assert maps.shape == (1, 64, 64)
    np.testing.assert_allclose(maps, 3.0, rtol=1e-5)
    assert scores[0] == pytest.approx(3.0, rel=1e-5)


# ------------------------------------------------------------------------------------ heads
def test_oas_matches_sklearn():
    from sklearn.covariance import OAS

    X = np.random.default_rng(0).standard_normal((30, 12)) @ np.random.default_rng(1).standard_normal((12, 12))
    Z = X - X.mean(0)
    shrunk, rho = oas_shrink(Z.T @ Z / len(X), len(X))
    est = OAS().fit(X)
    # one formula by two routes (our traces, scikit-learn's): rounding of about eps * n * |S| per entry,
    # amplified ~2x by the cancellation in tr(S^2) - tr(S)^2 / d for this data; an entry near zero
    # is compared on the matrix's scale, not its own
    assert float(rho) == pytest.approx(est.shrinkage_, rel=1e-9)
    np.testing.assert_allclose(shrunk, est.covariance_, rtol=1e-9, atol=1e-12 * np.abs(est.covariance_).max())


def test_greedy_coreset_covers_clusters_and_continues_from_centres():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]], np.float32)
    X = np.concatenate([c + 0.1 * rng.standard_normal((50, 2)) for c in centres]).astype(np.float32)
    idx = greedy_coreset(X, 3, seed=0)
    assert sorted(i // 50 for i in idx) == [0, 1, 2]
    # Continuing from a bank that covers clusters 0 and 1 picks cluster 2 first.
    more = greedy_coreset(X, 1, seed=0, centres=X[[0, 50]])
    assert more[0] // 50 == 2
    assert len(greedy_coreset(X, 150)) == 150 and len(greedy_coreset(X, 999)) == 150


@pytest.mark.parametrize(
    "kind,extra",
    [
        ("patchcore", {}),
        ("padim", {}),
        ("padim", {"covariance": "shared"}),
        ("padim", {"padim_dims": 4, "neighbourhood": 0}),
    ],
)
def test_heads_score_shifted_patches_higher(kind, extra):
    cfg = AnomalyConfig(kind=kind, coreset_ratio=0.25, **extra)
    good = _features(20, 0)
    head = fit_head(good, cfg, size=32)
    test = _features(4, 1)
    test[2:, :, 2:4, 5:7] += 4.0  # a local defect in images 2 and 3
    maps, scores = head.maps(test)
    assert maps.shape == (4, 32, 32)
    assert scores[2:].min() > scores[:2].max()
    for m in maps[2:]:  # peak over the defect (patches 2-3 x 5-6 of 8 -> pixels 8-15 x 20-27)
        i, j = np.unravel_index(np.argmax(m), m.shape)
        assert 6 <= i <= 17 and 18 <= j <= 29
    if kind == "padim" and extra.get("padim_dims") == 4:
        assert len(head.arrays["channels"]) == 4


def test_padim_update_equals_fitting_on_all_images():
    cfg = AnomalyConfig(kind="padim")
    a, b = _features(12, 0), _features(7, 1, shift=0.3)
    updated = update_head(fit_head(a, cfg, size=32), b)
    full = fit_head(np.concatenate([a, b]), cfg, size=32)
    for k in ("mean", "m2"):
        np.testing.assert_allclose(updated.arrays[k], full.arrays[k], rtol=1e-4, atol=1e-4)
    assert int(updated.arrays["count"]) == 19
    probe = _features(3, 2)
    np.testing.assert_allclose(updated.maps(probe)[1], full.maps(probe)[1], rtol=1e-4)


def test_patchcore_update_is_bounded_and_learns_new_goods():
    cfg = AnomalyConfig(kind="patchcore", coreset_ratio=0.1, max_memory=200)
    head = fit_head(_features(20, 0), cfg, size=32)
    assert head.memory_size == int(np.ceil(0.1 * 20 * 64))
    new = _features(10, 5, shift=2.0)  # a new kind of good surface
    before = head.maps(new)[1]
    head2 = update_head(head, new)
    assert head.memory_size < head2.memory_size <= 200
    assert head2.maps(new)[1].max() < before.min()
    head3 = update_head(head2, _features(30, 6, shift=-2.0))  # past max_memory: re-selected at the cap
    assert head3.memory_size == 200


def test_head_save_load_roundtrip_and_refusals(tmp_path):
    for kind in ("patchcore", "padim"):
        head = fit_head(_features(10, 0), AnomalyConfig(kind=kind), size=32)
        head.save(tmp_path / f"{kind}.npz")
        back = AnomalyHead.load(tmp_path / f"{kind}.npz")
        assert back.kind == kind and back.grid == (8, 8) and back.config == head.config
        probe = _features(2, 3)
        np.testing.assert_array_equal(back.maps(probe)[1], head.maps(probe)[1])
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BundleError):
        AnomalyHead.load(tmp_path / "obj.npy")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(BundleError, match="not an edgetl anomaly head"):
        AnomalyHead.load(tmp_path / "other.npz")
    with pytest.raises(DataError, match="expects patch features"):
        head.maps(np.zeros((1, 3, 8, 8), np.float32))


def test_config_validation():
    with pytest.raises(ConfigError, match="not one of"):
        AnomalyConfig(kind="knn")
    with pytest.raises(ConfigError, match="coreset_ratio"):
        AnomalyConfig(coreset_ratio=0)
    cfg = AnomalyConfig(kind="padim", reductions=(8, 16))
    assert AnomalyConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ----------------------------------------------------------------------------- scoring graph
@pytest.mark.parametrize(
    "kind,extra", [("patchcore", {}), ("padim", {}), ("padim", {"covariance": "shared"}), ("padim", {"padim_dims": 4})]
)
@pytest.mark.parametrize("opset", [17, 18])
def test_scoring_graph_equals_numpy(kind, extra, opset):
    import onnxruntime as ort

    from edgetl.heads.patch_graph import scoring_graph

    head = fit_head(_features(16, 0), AnomalyConfig(kind=kind, **extra), size=48)
    model = scoring_graph(head, opset=opset)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    F = _features(5, 9)
    F[3, :, 1:3, 1:3] += 3
    maps, scores = sess.run(None, {sess.get_inputs()[0].name: F})
    ref_maps, ref_scores = head.maps(F)
    np.testing.assert_allclose(scores, ref_scores, rtol=GRAPH_RTOL)
    np.testing.assert_allclose(maps, ref_maps, rtol=GRAPH_RTOL, atol=GRAPH_RTOL * ref_scores.max())


def test_scoring_graph_runs_in_openvino(tmp_path):
    pytest.importorskip("openvino")
    import onnx

    from edgetl.core.sessions import open_session
    from edgetl.heads.patch_graph import scoring_graph

    for kind in ("patchcore", "padim"):
        head = fit_head(_features(16, 0), AnomalyConfig(kind=kind), size=48)
        onnx.save(scoring_graph(head), str(tmp_path / f"{kind}.onnx"))
        # edgetl's own session: f32 pinned, as on the device (OpenVINO alone would run bf16 on a
        # CPU with native bf16 and miss this tolerance by 40x)
        session = open_session(tmp_path / f"{kind}.onnx", runtime="openvino")
        assert session.float_precision == "f32"
        F = _features(3, 4)
        _, scores = session.run(F)
        ref_maps, ref_scores = head.maps(F)
        np.testing.assert_allclose(scores, ref_scores, rtol=GRAPH_RTOL)


# -------------------------------------------------------------------------------------- data
def _img(path, seed=0, size=16):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def test_anomaly_layouts(tmp_path):
    mv = tmp_path / "mvtec"
    for i in range(4):
        _img(mv / "train" / "good" / f"{i}.png", i)
    _img(mv / "test" / "good" / "g.png")
    _img(mv / "test" / "crack" / "000.png")
    _img(mv / "ground_truth" / "crack" / "000_mask.png")
    (mv / "train" / "good" / "notes.txt").write_text("not an image")
    d = load_anomaly_data(mv)
    assert d.layout == "mvtec" and len(d.train) == 4 and not d.val
    assert [s.label for s in d.test] == ["crack", "good"]
    assert d.masks[str(mv / "test" / "crack" / "000.png")].name == "000_mask.png"
    assert tasks.for_data(mv).name == "anomaly"

    good = tmp_path / "g"
    for i in range(5):
        _img(good / "good" / f"{i}.png", i)
    d = load_anomaly_data(good, val_split=0.2)
    assert d.layout == "good" and len(d.train) == 4 and len(d.val) == 1 and d.eval_set == d.val
    d = load_anomaly_data(good)  # by default none held out: fit scores every good image out of fold
    assert len(d.train) == 5 and not d.val and not d.eval_set

    flat = tmp_path / "flat"
    _img(flat / "a.png")
    with pytest.raises(DataError, match="need >= 2"):
        load_anomaly_data(flat, val_split=0.2)
    _img(flat / "b.png", 1)
    with pytest.raises(DataError, match="need >= 3"):
        load_anomaly_data(flat)
    with pytest.raises(DataError, match="no good training images"):
        load_anomaly_data(tmp_path / "mvtec" / "ground_truth")


def test_task_detection_rules(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert tasks.for_data(tmp_path).name == "classify"
    assert tasks.for_data(tmp_path, task="anomaly").name == "anomaly"
    assert tasks.for_data(tmp_path, head="padim").name == "anomaly"
    with pytest.raises(ConfigError, match="--head mlp is for --task classify"):
        tasks.for_data(tmp_path, task="anomaly", head="mlp")
    with pytest.raises(ConfigError, match="--head patchcore is for --task anomaly"):
        tasks.for_data(tmp_path, task="classify", head="patchcore")


def test_overlay_colours():
    im = Image.new("RGB", (10, 10), (128, 128, 128))
    m = np.zeros((10, 10), np.float32)
    m[:, 5:] = 2.0
    out = np.asarray(overlay(im, m)).astype(int)
    assert out[0, 9, 0] > out[0, 9, 2] + 50 and out[0, 9].sum() > 3 * 128  # bright yellow above threshold
    assert out[0, 0].sum() < 3 * 128  # darkened (inferno's low end) where low


def test_one_colouring_for_predict_serve_and_report():
    pytest.importorskip("matplotlib")
    from edgetl.core.heatmap import blend, colormap
    from edgetl.report.figures import overlay as report_overlay

    ramp = colormap(np.linspace(0, 1, 5))
    assert ramp[0].sum() < 20 and ramp[-1].min() > 150 and np.all(np.diff(ramp.astype(int).sum(axis=1)) > 0)
    rgb = np.full((8, 8, 3), 100, np.uint8)
    m = np.linspace(0, 2, 64, dtype=np.float32).reshape(8, 8)
    ours = np.asarray(overlay(Image.fromarray(rgb), m)).astype(int)
    assert np.array_equal(ours, np.round(blend(rgb, m)).astype(int))
    assert report_overlay(rgb, m, None, size=8).startswith("data:image/jpeg;base64,")


def test_heatmap_names_unique_within_a_run_and_overwritten_across_runs(tmp_path):
    from edgetl.core.preprocess import PreprocessConfig

    pre = PreprocessConfig(input_size=32, crop_pct=1.0)
    srcs = []
    for folder in ("a", "b"):  # the same file name in two folders
        (tmp_path / folder).mkdir()
        Image.fromarray(np.full((40, 40, 3), 100, np.uint8)).save(tmp_path / folder / "000.png")
        srcs.append(tmp_path / folder / "000.png")
    out = tmp_path / "maps"
    for _ in range(2):  # a second run overwrites instead of piling up numbered copies
        taken: set = set()
        names = [save_overlay(p, np.ones((32, 32), np.float32), out, pre, taken).name for p in srcs]
        assert names == ["000_heatmap.png", "000_1_heatmap.png"]
    assert sorted(p.name for p in out.iterdir()) == ["000_1_heatmap.png", "000_heatmap.png"]


def test_regions_match_scipy_labelling():
    from scipy import ndimage

    from edgetl.tasks.anomaly.metrics import regions

    rng = np.random.default_rng(3)
    mask = rng.uniform(size=(60, 70)) > 0.8
    ours = regions(mask)
    lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
    assert len(ours) == n
    theirs = sorted(tuple(sorted(zip(*np.nonzero(lab == k)))) for k in range(1, n + 1))
    assert sorted(tuple(sorted(zip(r.tolist(), c.tolist()))) for r, c in ours) == theirs


def test_small_missed_defects_show_in_region_and_kind_rates():
    # two defect images: a large region the map covers, and a 2 x 2 one it misses
    maps = np.zeros((3, 40, 40), np.float32)
    masks = [None, np.zeros((40, 40), bool), np.zeros((40, 40), bool)]
    masks[1][5:25, 5:25] = True
    maps[1][5:25, 5:15] = 2.0  # half the big region above the cut
    masks[2][30:32, 30:32] = True
    masks[2][2:4, 2:4] = True  # a second region on the same image, also missed
    m = detection_metrics(
        np.array([0, 1, 1]),
        np.array([0.1, 2.0, 0.5]),
        1.0,
        maps=maps,
        masks=masks,
        kinds=["good", "stain", "crack"],
        map_threshold=1.5,
    )
    assert m["regions"] == {"n": 3, "recall": round(1 / 3, 4), "overlap": round(0.5 / 3, 4)}
    assert m["regions_per_kind"]["crack"]["recall"] == 0.0 and m["regions_per_kind"]["stain"]["recall"] == 1.0
    assert m["recall_per_kind"] == {"crack": 0.0, "stain": 1.0}
