"""Image-level one-class heads (knn, gaussian) and the combined patch + image detector.

The scoring graphs are fused behind a small real ONNX feature model (a fixed linear map, so the
feature rows are known exactly) and run in ONNX Runtime and OpenVINO against float64 numpy
written out here, independently of the heads' own numpy scoring. Tolerances are relative to the
scores' spread and hold for float32 on AVX2 and AVX-512 kernels alike (differences there are
summation order, ~1e-6 relative). The bundle tests fit the real backbone (FP32, no conversion) on
a small defects example and go through adapt, history and rollback.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from edgetl.core.metrics import auroc
from edgetl.heads.defect import DefectConfig, DefectHead, fit_defect_head, load_any_head, update_defect_head
from edgetl.heads.oneclass import ImageConfig, fit_image_head, held_out_scores, update_image_head
from edgetl.tasks.anomaly.select import choose

SHAPE = (6, 8, 8)  # patch part of a feature row: (C, H, W)
D = 24  # pooled part
WIDTH = int(np.prod(SHAPE)) + D
SIZE = 32


def _rows(n: int, seed: int, *, patch_shift: float = 0.0, image_shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    F = rng.standard_normal((n, *SHAPE)).astype(np.float32)
    F[:, :, 2:4, 2:4] += patch_shift  # a local defect
    Z = (rng.standard_normal((n, D)) + image_shift).astype(np.float32)  # another part altogether
    return np.concatenate([F.reshape(n, -1), Z], axis=1)


def _feature_model(path, seed: int = 3):
    """A real ONNX model from (N, 4) inputs to (N, WIDTH) rows: x @ W + b."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    W = rng.standard_normal((4, WIDTH)).astype(np.float32)
    b = rng.standard_normal(WIDTH).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["input", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["features"])],
        "rows",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", WIDTH])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return W, b


def _reference(head: DefectHead, X: np.ndarray) -> np.ndarray:
    """Scores in float64, written independently of the heads' numpy code."""
    X = X.astype(np.float64)
    n = int(np.prod(SHAPE))
    Z = X[:, n:]
    if head.image.kind == "knn":
        M = head.image.arrays["memory"].astype(np.float64)
        d = np.sqrt(((Z[:, None, :] - M[None]) ** 2).sum(-1))
        si = np.sort(d, axis=1)[:, : head.image.config.k].mean(1)
    else:
        a = head.image.arrays
        cnt = int(a["count"])
        cov = a["m2"].astype(np.float64) / (cnt - 1)
        d_ = cov.shape[0]
        tr, tr2 = np.trace(cov), (cov * cov).sum()
        rho = min(1.0, (tr2 + tr**2) / ((cnt + 1) * (tr2 - tr**2 / d_)))
        cov = (1 - rho) * cov + rho * tr / d_ * np.eye(d_)
        Dz = Z - a["mean"].astype(np.float64)
        si = np.sqrt(np.einsum("nd,nd->n", Dz, np.linalg.solve(cov, Dz.T).T))
    if not head.has_map:
        return si
    F = X[:, :n].reshape(len(X), SHAPE[0], -1).transpose(0, 2, 1)  # (N, P, C)
    M = head.patch.arrays["memory"].astype(np.float64)
    S = np.sqrt(((F[:, :, None, :] - M[None, None]) ** 2).sum(-1)).min(-1).reshape(len(X), *SHAPE[1:])
    A = head.patch.operator.astype(np.float64)
    sp = (A @ S @ A.T).reshape(len(X), -1).max(1)
    if head.kind == "patch":
        return sp
    (mp, sdp), (mi, sdi) = head.norm["patch"], head.norm["image"]
    if head.rule == "mean":
        return 0.5 * (sp / sdp + si / sdi)
    # the soft maximum of the z-scores, shifted so that no term can go below zero
    return np.logaddexp((sp - mp) / sdp, (si - mi) / sdi) + max(mp / sdp, mi / sdi)


@pytest.fixture(scope="module")
def train_rows():
    return _rows(24, 0)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
@pytest.mark.parametrize(
    "kind,image,rule",
    [
        ("combined", "knn", "softmax"),
        ("knn", "knn", "softmax"),
        ("gaussian", "gaussian", "softmax"),
        ("combined", "gaussian", "softmax"),
        ("patch", "knn", "softmax"),
        ("combined", "knn", "mean"),
    ],
)
def test_fused_graph_equals_numpy_reference(tmp_path, train_rows, runtime, kind, image, rule):
    from edgetl.core.fuse import fuse
    from edgetl.core.sessions import open_session

    cfg = DefectConfig.from_dict(
        {"kind": "combined" if kind == "patch" else kind, "image": {"kind": image}, "coreset_ratio": 0.25}
    )
    head = fit_defect_head(train_rows, cfg, patch_shape=SHAPE, size=SIZE).as_kind(
        kind
    )  # patch: what selection may pick
    head = dataclasses.replace(head, rule=rule)  # mean: a head saved before the softmax rule
    W, b = _feature_model(tmp_path / "rows.onnx")
    backbone = tmp_path / "rows.onnx"
    if runtime == "openvino":
        import openvino as ov

        ov.save_model(ov.convert_model(str(backbone)), str(tmp_path / "rows.xml"), compress_to_fp16=False)
        backbone = tmp_path / "rows.xml"
    fused = fuse(backbone, head, tmp_path / "fused", meta={"head": kind})
    x = np.random.default_rng(5).standard_normal((6, 4)).astype(np.float32)
    outs = open_session(fused, runtime=runtime).run(x)
    X = x @ W + b
    ref = _reference(head, X)
    maps, scores = head.maps(X)
    assert len(outs) == (2 if head.has_map else 1)
    fused_scores = outs[-1].reshape(-1)
    scale = float(np.ptp(ref)) + 1.0
    assert np.max(np.abs(fused_scores - ref)) <= 2e-3 * scale  # graph vs independent float64 reference
    assert np.max(np.abs(fused_scores - scores)) <= 1e-3 * scale  # graph vs the head's own numpy
    if head.has_map:
        assert outs[0].shape == (6, SIZE, SIZE)
        np.testing.assert_allclose(
            outs[0].reshape(6, -1).max(1) + (scores - maps.reshape(6, -1).max(1)), fused_scores, atol=1e-3 * scale
        )  # the map and the score agree across runtimes
        assert np.max(np.abs(outs[0] - maps)) <= 1e-3 * (float(np.ptp(maps)) + 1.0)


def test_both_kinds_of_anomaly_are_caught(train_rows):
    good = _rows(20, 7)
    local, wrong = _rows(20, 8, patch_shift=3.0), _rows(20, 9, image_shift=1.5)
    head = fit_defect_head(train_rows, DefectConfig(), patch_shape=SHAPE, size=SIZE)
    y = np.r_[np.zeros(20), np.ones(20)].astype(bool)
    for k, bad in (("local", local), ("wrong", wrong)):
        X = np.concatenate([good, bad])
        parts = {kind: head.as_kind(kind).maps(X)[1] for kind in ("combined", "patch", "knn")}
        assert auroc(y, parts["combined"]) >= 0.9, (k, {n: auroc(y, s) for n, s in parts.items()})
        assert np.all(parts["combined"] > 0)  # a positive score, so score / threshold means what it says
    # each part alone misses the other kind
    assert auroc(y, head.as_kind("patch").maps(np.concatenate([good, wrong]))[1]) < 0.8
    assert auroc(y, head.as_kind("knn").maps(np.concatenate([good, local]))[1]) < 0.8


def test_combined_score_is_never_below_its_better_part_and_old_heads_keep_their_rule(tmp_path, train_rows):
    from edgetl.heads.patch import HEADER_KEY

    head = fit_defect_head(train_rows, DefectConfig(), patch_shape=SHAPE, size=SIZE)
    good = _rows(40, 7)
    y = np.r_[np.zeros(40), np.ones(40)].astype(bool)
    drops = []
    for bad in (_rows(40, 8, patch_shift=2.0), _rows(40, 9, image_shift=1.0)):  # each seen by one part only
        X = np.concatenate([good, bad])
        a = {k: auroc(y, head.as_kind(k).maps(X)[1]) for k in ("combined", "patch", "knn")}
        mean = auroc(y, dataclasses.replace(head, rule="mean").maps(X)[1])
        drops.append(max(a["patch"], a["knn"]) - mean)
        # within noise of the better part (40 + 40 images: AUROC's sd ~ 0.03), where the mean falls below it
        assert a["combined"] >= max(a["patch"], a["knn"]) - 0.06, a
    # a head file without a recorded rule was written when the rule was the mean: read back as such
    head.save(tmp_path / "h.npz")
    with np.load(tmp_path / "h.npz") as z:
        arrays = dict(z)
    header = json.loads(bytes(arrays[HEADER_KEY]).decode())
    assert max(drops) > 0.06  # the old mean rule does fall below its better part here
    assert header["rule"] == "softmax"
    del header["rule"]
    arrays[HEADER_KEY] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(tmp_path / "old.npz", **arrays)
    old = load_any_head(tmp_path / "old.npz")
    assert old.rule == "mean"
    X = _rows(5, 3)
    np.testing.assert_allclose(old.maps(X)[1], _reference(old, X), rtol=1e-4)


def test_held_out_normalisation_matches_new_good_images(train_rows):
    head = fit_defect_head(_rows(60, 1), DefectConfig(), patch_shape=SHAPE, size=SIZE)
    fresh = head.part_scores(_rows(200, 2))
    for part in ("patch", "image"):
        mu, sd = head.norm[part]
        z = (fresh[part] - mu) / sd
        assert abs(float(np.mean(z))) < 1.0 and 0.3 < float(np.std(z)) < 3.0, (part, z.mean(), z.std())


def test_gaussian_update_equals_fitting_on_all_and_knn_stays_bounded():
    Z = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    g = update_image_head(fit_image_head(Z[:25], ImageConfig("gaussian")), Z[25:])
    full = fit_image_head(Z, ImageConfig("gaussian"))
    np.testing.assert_allclose(g.scores(Z), full.scores(Z), rtol=1e-4)
    k = update_image_head(fit_image_head(Z[:25], ImageConfig("knn", max_images=30)), Z[25:])
    assert k.memory_size == 30 and k.images == 40
    loo = held_out_scores(Z, ImageConfig("knn"))
    assert np.all(loo > 0)  # nobody is its own neighbour


def test_save_load_roundtrip_and_update(tmp_path, train_rows):
    head = fit_defect_head(train_rows, DefectConfig(), patch_shape=SHAPE, size=SIZE)
    head.save(tmp_path / "h.npz")
    back = load_any_head(tmp_path / "h.npz")
    X = _rows(5, 3)
    np.testing.assert_array_equal(back.maps(X)[1], head.maps(X)[1])
    new = update_defect_head(back, _rows(6, 4))
    assert new.meta["images"] == 30 and new.norm == head.norm
    assert new.patch.memory_size > head.patch.memory_size


def test_selection_keeps_the_default_on_noise_and_switches_on_evidence():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(30), np.ones(30)].astype(bool)
    base = rng.standard_normal(60) + 1.2 * y
    # a slightly different score, no better beyond noise: keep the default
    kept = choose(y, {"combined": base, "patch": base + 0.3 * rng.standard_normal(60), "knn": base[::-1].copy()})
    assert kept["chosen"] == "combined" and kept["candidates"]["patch"]["interval"][0] <= 0
    # a clearly better alternative on enough images: switch
    y2 = np.r_[np.zeros(200), np.ones(200)].astype(bool)
    weak, strong = rng.standard_normal(400) + 0.3 * y2, rng.standard_normal(400) + 3.0 * y2
    assert choose(y2, {"combined": weak, "patch": strong, "knn": weak})["chosen"] == "patch"
    assert choose(np.zeros(10, bool), {"combined": base[:10], "patch": base[:10]})["chosen"] == "combined"


# ----- a real bundle: the fused model on the device path, adapt, rollback -------------------------
@pytest.fixture(scope="module")
def small_defects(tmp_path_factory):
    from edgetl.datasets.images import make_defects

    out = tmp_path_factory.mktemp("image-heads") / "defects"
    make_defects(out, seed=1, n_train_good=16, n_test_good=6, n_test_defect=10, texture="gravel")
    return out


@pytest.mark.parametrize("kind", ["combined", "knn"])
def test_bundle_predict_adapt_and_rollback(small_defects, cache_dir, tmp_path, kind, no_torch_env):
    from edgetl import FitOptions, fit, history, load_predictor, rollback
    from edgetl.core.sessions import bundle_session
    from edgetl.tasks.anomaly.task import ANOMALY
    from tests.conftest import run_cli

    out = tmp_path / f"{kind}.bundle"
    fit(
        small_defects,
        out,
        options=FitOptions(
            head=ANOMALY.head_config(kind),
            target="cpu-x86",
            precision="fp32",
            cache_dir=str(cache_dir),
            reference=False,
            quiet=True,
        ),
    )
    files = sorted((small_defects / "test" / "good").glob("*.png"))
    p1 = load_predictor(out)
    first = [r.score for r in p1.predict(files)]
    # the fused model against backbone + numpy head, on the real backbone
    numpy_path = ANOMALY.predictor(p1.bundle)
    numpy_path.fused, numpy_path.session = False, bundle_session(p1.bundle, p1.bundle.model_file("backbone"))
    np.testing.assert_allclose([r.score for r in numpy_path.predict(files)], first, rtol=1e-4)
    entry = p1.bundle.head_entry()
    assert entry["heat_map"] is (kind == "combined")
    if kind == "combined":  # overlays: 1.0 where the patch part alone would reach the threshold
        maps, _ = p1.maps(files)
        cut = p1.head.map_cut(p1.threshold)
        assert 0 < cut < p1.threshold
        assert np.median(maps.reshape(len(maps), -1).max(axis=1)) < cut  # good images stay below it
        from edgetl.errors import EdgetlError
        from edgetl.fleet.server import FleetRound

        with pytest.raises(EdgetlError, match="cannot be merged by a fleet round yet.*--head patchcore"):
            FleetRound(out)
    if kind == "knn":
        from edgetl.errors import ConfigError

        with pytest.raises(ConfigError, match="no heat map"):
            p1.predict(files[:1], heatmaps=tmp_path / "maps")
    new_good = tmp_path / "new"
    new_good.mkdir()
    for f in sorted((small_defects / "train" / "good").glob("*.png"))[:4]:
        (new_good / f.name).write_bytes(f.read_bytes())
    r = run_cli("adapt", out, new_good, "--json", env=no_torch_env)  # the device side, where torch cannot load
    assert r.returncode == 0, r.stderr
    assert [e["version"] for e in history(out)] == [1, 2] and load_predictor(out).version == 2
    after = [s.score for s in load_predictor(out).predict(files)]
    assert after != first
    rollback(out, to=1)
    np.testing.assert_allclose([s.score for s in load_predictor(out).predict(files)], first, rtol=1e-5)
    if kind == "knn":  # the report of a head without a map: the images alone, and it says why
        pytest.importorskip("matplotlib")
        page = tmp_path / "knn-report.html"
        r = run_cli("report", out, small_defects / "test", "--out", page, env=no_torch_env)
        assert r.returncode == 0, r.stderr
        assert "No heat map: this head scores the whole image" in page.read_text()
