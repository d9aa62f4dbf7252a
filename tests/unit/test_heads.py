"""Tests of edgetl.heads: learning, persistence, ONNX export, determinism and options."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from edgetl.errors import BundleError, ConfigError, DataError
from edgetl.heads.classification import HEAD_KINDS, Head, HeadConfig, softmax
from edgetl.heads.training import L2_GRID, MLP_L2_GRID, train_head


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread():
    """Run this module's BLAS single-threaded when threadpoolctl is at hand.

    On a small machine shared with other jobs, multi-threaded OpenBLAS spins waiting for busy
    cores on these small products and runs several times slower than one thread.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# Small MLPs keep the whole file fast; the defaults (hidden 256, 300 steps) are exercised on digits.
FAST = {
    "linear": HeadConfig(kind="linear", l2=1e-2),
    "mlp": HeadConfig(kind="mlp", l2=1e-3, hidden=32, epochs=150, lr=0.02),
    "prototype": HeadConfig(kind="prototype"),
}


def blobs(n_per_class: int, *, k: int = 4, d: int = 64, spread: float = 1.0, seed: int = 0):
    """Gaussian blobs with centres 6 apart along random directions: separable by a wide margin."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).standard_normal((k, d))
    centres *= 6.0 / np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.repeat(np.arange(k), n_per_class)
    X = centres[y] + spread * rng.standard_normal((y.size, d)) / np.sqrt(d) * 3
    return X.astype(np.float32), y.astype(np.int64)


LABELS4 = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def toy():
    X, y = blobs(40, seed=0)
    Xt, yt = blobs(50, seed=1)
    return X, y, Xt, yt


@pytest.fixture(scope="module")
def toy_heads(toy):
    X, y, _, _ = toy
    return {kind: train_head(X, y, LABELS4, cfg=FAST[kind]) for kind in HEAD_KINDS}


@pytest.fixture(scope="module")
def digits():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    data = sklearn_datasets.load_digits()
    X, y = data.data.astype(np.float32), data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(y.size)
    X, y = X[order], y[order]
    cut = 1200
    return X[:cut], y[:cut], X[cut:], y[cut:], [str(i) for i in range(10)]


# ------------------------------------------------------------------------------- learning


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_each_kind_learns_separable_blobs(toy, toy_heads, kind):
    _, _, Xt, yt = toy
    head = toy_heads[kind]
    assert head.kind == kind and head.labels == LABELS4 and head.n_features == 64
    assert np.mean(head.predict(Xt) == yt) >= 0.95
    assert head.meta["train_accuracy"] >= 0.95


@pytest.mark.parametrize(
    "kind,cfg,floor",
    [
        ("linear", HeadConfig(kind="linear"), 0.92),  # automatic l2 (3-fold)
        ("mlp", HeadConfig(kind="mlp", l2=1e-3, hidden=128, epochs=200), 0.92),
        ("prototype", HeadConfig(kind="prototype"), 0.80),  # chance is 0.10
    ],
)
def test_each_kind_far_above_chance_on_digits(digits, kind, cfg, floor):
    X, y, Xt, yt, labels = digits
    head = train_head(X, y, labels, cfg=cfg)
    acc = float(np.mean(head.predict(Xt) == yt))
    assert acc >= floor, f"{kind}: held-out accuracy {acc:.3f}"


def test_outputs_have_the_documented_types(toy, toy_heads):
    _, _, Xt, _ = toy
    for head in toy_heads.values():
        logits, proba, pred = head.logits(Xt), head.proba(Xt), head.predict(Xt)
        assert logits.dtype == np.float32 and logits.shape == (Xt.shape[0], 4)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
        assert pred.dtype == np.int64
        np.testing.assert_array_equal(pred, np.argmax(proba, axis=1))
        assert all(arr.dtype == np.float32 for arr in head.arrays.values())


def test_logits_reject_features_of_another_width(toy_heads):
    with pytest.raises(DataError, match=r"\(n, 64\)"):
        toy_heads["linear"].logits(np.zeros((3, 65), dtype=np.float32))


def test_softmax_is_stable_and_normalised():
    z = np.array([[1000.0, 999.0, -1000.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    p = softmax(z)
    assert p.dtype == np.float32 and np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(p[0, 0] / p[0, 1], np.e, rtol=1e-5)
    np.testing.assert_allclose(p[1], 1 / 3, atol=1e-7)


def test_linear_matches_a_reference_logistic_regression(toy):
    """The optimum is the penalised multinomial MLE: sklearn with C = 1 / (l2 * n) agrees."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    X, y, _, _ = toy
    X, y = X[::2], y[::2]  # 80 rows, 64 features: not separable with an unpenalised model alone
    l2 = 0.05
    head = train_head(X, y, LABELS4, cfg=HeadConfig(l2=l2, balance=False))
    Xs = (X - head.arrays["mean"]) / head.arrays["scale"]
    ref = linear_model.LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-10, max_iter=10_000).fit(Xs, y)
    W_ref = ref.coef_.T - ref.coef_.T.mean(axis=1, keepdims=True)  # softmax is shift-invariant
    W = head.arrays["W"] - head.arrays["W"].mean(axis=1, keepdims=True)
    assert np.abs(W - W_ref).max() <= 1e-3 * np.abs(W_ref).max()


def test_wide_features_train_in_the_row_space_and_keep_the_optimum():
    """d > n: the fit runs in an n-dimensional basis, yet the weights are the full-space optimum."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    X, y = blobs(12, d=300, spread=3.0, seed=10)  # 48 rows, 300 features
    Xt, yt = blobs(50, d=300, spread=3.0, seed=11)
    l2 = 0.05
    head = train_head(X, y, LABELS4, cfg=HeadConfig(l2=l2, balance=False))
    assert head.meta["basis_rank"] <= 48
    assert np.mean(head.predict(Xt) == yt) >= 0.9
    Xs = (X - head.arrays["mean"]) / head.arrays["scale"]
    ref = linear_model.LogisticRegression(C=1.0 / (l2 * len(y)), tol=1e-10, max_iter=10_000).fit(Xs, y)
    W_ref = ref.coef_.T - ref.coef_.T.mean(axis=1, keepdims=True)
    W = head.arrays["W"] - head.arrays["W"].mean(axis=1, keepdims=True)
    assert np.abs(W - W_ref).max() <= 1e-3 * np.abs(W_ref).max()
    for kind in ("mlp", "prototype"):
        wide = train_head(X, y, LABELS4, cfg=FAST[kind])
        assert np.mean(wide.predict(Xt) == yt) >= 0.9, kind


def test_constant_and_duplicated_features_are_harmless(toy):
    X, y, Xt, yt = toy
    pad = lambda A: np.concatenate([A, np.full((len(A), 3), 7.0, np.float32), A[:, :5]], axis=1)  # noqa: E731
    for kind in HEAD_KINDS:
        head = train_head(pad(X), y, LABELS4, cfg=FAST[kind])
        logits = head.logits(pad(Xt))
        assert np.all(np.isfinite(logits)), kind
        assert np.mean(np.argmax(logits, axis=1) == yt) >= 0.95, kind


def test_class_without_rows_is_never_predicted():
    X, y = blobs(30, k=3, seed=3)
    labels = ["a", "b", "c", "unseen"]
    rng = np.random.default_rng(5)
    probe = np.concatenate([X, rng.standard_normal((20, 64)).astype(np.float32) * 3])
    for kind in HEAD_KINDS:
        head = train_head(X, y, labels, cfg=FAST[kind])
        assert head.meta["absent_classes"] == ["unseen"]
        logits = head.logits(probe)
        assert np.all(logits[:, 3] < logits[:, :3].max(axis=1) - 10), kind
        assert np.all(head.proba(probe)[:, 3] < 1e-4), kind


def test_a_single_present_class_gives_a_constant_prediction():
    X, _ = blobs(10, k=1, seed=4)
    head = train_head(X, np.zeros(10, dtype=np.int64), ["only", "other"])
    assert np.all(head.predict(X) == 0)


# ------------------------------------------------------------------------------- balancing


def imbalanced(seed=0, n0=400, n1=20):
    """Two overlapping classes in 4-d, the minority shifted by 2 along the first axis."""
    rng = np.random.default_rng(seed)
    X0 = rng.standard_normal((n0, 4))
    X1 = rng.standard_normal((n1, 4))
    X1[:, 0] += 2.0
    X = np.concatenate([X0, X1]).astype(np.float32)
    y = np.concatenate([np.zeros(n0), np.ones(n1)]).astype(np.int64)
    return X, y


MIDPOINT = np.array([[1.0, 0.0, 0.0, 0.0]], dtype=np.float32)  # half-way between the class means


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_class_balancing_favours_the_minority_class(kind):
    X, y = imbalanced(seed=0)
    Xt, yt = imbalanced(seed=1, n0=200, n1=200)
    base = FAST[kind].to_dict()
    plain = train_head(X, y, ["many", "few"], cfg=HeadConfig(**{**base, "balance": False}))
    fair = train_head(X, y, ["many", "few"], cfg=HeadConfig(**{**base, "balance": True}))
    recall = {name: np.mean(h.predict(Xt[yt == 1]) == 1) for name, h in (("plain", plain), ("fair", fair))}
    assert recall["fair"] > recall["plain"] + 0.1, recall
    assert fair.proba(MIDPOINT)[0, 1] > plain.proba(MIDPOINT)[0, 1]
    if kind == "linear":
        # Unweighted, the 20:1 prior wins half-way; balanced, it is close to a coin flip there.
        assert plain.proba(MIDPOINT)[0, 1] < 0.15
        assert 0.3 < fair.proba(MIDPOINT)[0, 1] < 0.7


def test_sample_weight_moves_the_decision_towards_upweighted_rows():
    X, y = imbalanced(seed=2)
    cfg = HeadConfig(l2=1e-2, balance=False)
    plain = train_head(X, y, ["many", "few"], cfg=cfg)
    heavy = train_head(X, y, ["many", "few"], cfg=cfg, sample_weight=np.where(y == 1, 20.0, 1.0))
    # Weighting the 20 minority rows by 20 evens the classes out, much like balancing does.
    assert plain.proba(MIDPOINT)[0, 1] < 0.15
    assert heavy.proba(MIDPOINT)[0, 1] > 0.3


# ------------------------------------------------------------------------------- automatic l2


def test_auto_l2_by_cross_validation_is_recorded(toy):
    X, y, _, _ = toy
    head = train_head(X, y, LABELS4, cfg=HeadConfig(kind="linear"))
    search = head.meta["l2_search"]
    assert search["method"] == "3-fold"
    assert search["grid"] == list(L2_GRID)
    assert len(search["scores"]) == len(L2_GRID)
    assert head.meta["l2"] == search["chosen"] and head.meta["l2"] in L2_GRID
    # the winner has the best score, and among equals the largest penalty (simplest model)
    best = max(search["scores"])
    winners = [l2 for l2, s in zip(L2_GRID, search["scores"]) if s == best]
    assert head.meta["l2"] == max(winners)
    json.dumps(head.meta)


def test_auto_l2_ties_go_to_the_strongest_penalty():
    # Far-apart blobs: every candidate classifies the validation rows perfectly.
    X, y = blobs(20, spread=0.2, seed=6)
    Xv, yv = blobs(20, spread=0.2, seed=7)
    head = train_head(X, y, LABELS4, cfg=HeadConfig(), X_val=Xv, y_val=yv)
    search = head.meta["l2_search"]
    assert search["method"] == "validation"
    assert search["scores"] == [1.0] * len(L2_GRID)
    assert head.meta["l2"] == max(L2_GRID)
    assert head.meta["val_accuracy"] == 1.0


def test_auto_l2_prefers_weak_penalty_when_it_pays():
    # Thin class structure in 64-d that a heavily penalised model washes out.
    rng = np.random.default_rng(8)

    def make(n):
        X = rng.standard_normal((n, 64)).astype(np.float32)
        y = (X[:, :3] @ np.array([1.0, -1.0, 0.5]) > 0).astype(np.int64) + 2 * (X[:, 3] > 0)
        return X, y

    X, y = make(300)
    Xv, yv = make(300)
    head = train_head(X, y, LABELS4, cfg=HeadConfig(), X_val=Xv, y_val=yv)
    scores = dict(zip(L2_GRID, head.meta["l2_search"]["scores"]))
    assert head.meta["l2"] < 1.0
    assert scores[head.meta["l2"]] > scores[10.0] + 0.05


def test_mlp_auto_l2_uses_its_own_grid(toy):
    X, y, _, _ = toy
    cfg = HeadConfig(kind="mlp", hidden=16, epochs=60, lr=0.02)
    head = train_head(X, y, LABELS4, cfg=cfg)
    assert head.meta["l2_search"]["grid"] == list(MLP_L2_GRID)
    assert head.meta["l2"] in MLP_L2_GRID


def test_prototype_has_no_l2_and_a_bounded_temperature(toy_heads):
    head = toy_heads["prototype"]
    assert head.meta["l2"] is None
    assert 1.0 <= head.meta["logit_scale"] <= 30.0
    assert float(head.arrays["logit_scale"]) == pytest.approx(head.meta["logit_scale"], rel=1e-6)


def test_too_few_rows_falls_back_to_a_default_l2():
    X, y = blobs(2, k=2, seed=9)
    head = train_head(X, y, ["a", "b"])
    assert head.meta["l2_search"]["method"] == "default"
    assert head.meta["l2"] > 0


# ------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_same_inputs_and_seed_give_bit_identical_arrays(toy, kind):
    X, y, _, _ = toy
    cfg = HeadConfig(**{**FAST[kind].to_dict(), "l2": None}) if kind == "linear" else FAST[kind]
    a = train_head(X, y, LABELS4, cfg=cfg)
    b = train_head(X, y, LABELS4, cfg=cfg)
    assert a.arrays.keys() == b.arrays.keys()
    for name in a.arrays:
        assert a.arrays[name].tobytes() == b.arrays[name].tobytes(), name
    assert a.meta == b.meta


def test_mlp_seed_changes_the_initialisation(toy):
    X, y, _, _ = toy
    a = train_head(X, y, LABELS4, cfg=FAST["mlp"])
    b = train_head(X, y, LABELS4, cfg=HeadConfig(**{**FAST["mlp"].to_dict(), "seed": 1}))
    assert not np.array_equal(a.arrays["W1"], b.arrays["W1"])


# ------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_save_load_round_trip(tmp_path, toy, toy_heads, kind):
    _, _, Xt, _ = toy
    head = toy_heads[kind]
    path = tmp_path / "head"  # no suffix: must be written exactly here, not to head.npz
    head.save(path)
    assert path.is_file() and not (tmp_path / "head.npz").exists()
    back = Head.load(path)
    assert back.kind == head.kind and back.labels == head.labels
    assert back.meta == json.loads(json.dumps(head.meta))
    np.testing.assert_array_equal(back.logits(Xt), head.logits(Xt))
    with np.load(path, allow_pickle=False) as z:
        assert all(z[name].dtype != object for name in z.files)


def test_load_rejects_corrupt_and_foreign_files(tmp_path, toy_heads):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(np.random.default_rng(0).bytes(2000))
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, W=np.ones((3, 3)), b=np.zeros(3))
    bare = tmp_path / "bare.npy"
    np.save(bare, np.ones(4))
    good = tmp_path / "good.npz"
    toy_heads["linear"].save(good)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, _header=np.array([{"format": "edgetl-head"}], dtype=object))
    for path in (garbage, foreign, bare, truncated, pickled, tmp_path / "missing.npz"):
        with pytest.raises(BundleError) as info:
            Head.load(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_load_rejects_tampered_arrays_and_newer_versions(tmp_path, toy_heads):
    good = tmp_path / "good.npz"
    toy_heads["linear"].save(good)
    with np.load(good, allow_pickle=False) as z:
        arrays = {name: z[name] for name in z.files}
    header = json.loads(arrays["_header"].tobytes())

    def write(name, **changes):
        path = tmp_path / name
        np.savez(path, **{**arrays, **changes})
        return path

    wrong_shape = write("shape.npz", b=np.zeros(5, dtype=np.float32))
    newer_header = json.dumps({**header, "version": 99}).encode()
    newer = write("newer.npz", _header=np.frombuffer(newer_header, np.uint8))
    missing = dict(arrays)
    del missing["W"]
    no_w = tmp_path / "no_w.npz"
    np.savez(no_w, **missing)
    with pytest.raises(BundleError, match="shape"):
        Head.load(wrong_shape)
    with pytest.raises(BundleError, match="version"):
        Head.load(newer)
    with pytest.raises(BundleError, match="missing"):
        Head.load(no_w)
    assert zipfile.is_zipfile(good)


# ------------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("opset", [13, 18])  # 13: the oldest it supports; 18: what the fused bundle model uses
@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_onnx_graph_computes_the_probabilities(toy, toy_heads, kind, opset):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    _, _, Xt, _ = toy
    head = toy_heads[kind]
    model = head.graph(opset)
    onnx.checker.check_model(model)
    assert model.opset_import[0].version == opset
    assert [op.op_type for op in model.graph.node].count("Softmax") == 1
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == 64
    assert [o.name for o in model.graph.output] == ["probabilities"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (Xt[:1], Xt[3:10]):
        (out,) = session.run(None, {"head/features": batch})
        assert out.shape == (batch.shape[0], 4) and out.dtype == np.float32
        np.testing.assert_allclose(out, head.proba(batch), atol=1e-5, rtol=0)


def test_onnx_graph_of_a_zero_row_and_bad_opsets(toy_heads):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    head = toy_heads["prototype"]
    session = ort.InferenceSession(head.graph(13).SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.zeros((2, 64), dtype=np.float32) + head.arrays["mean"]  # centred to exactly zero
    (out,) = session.run(None, {"head/features": x})
    np.testing.assert_allclose(out, head.proba(x), atol=1e-5, rtol=0)
    assert np.all(np.isfinite(out))
    for bad in (7, 10_000, True):
        with pytest.raises(ConfigError, match="opset"):
            head.graph(bad)


# ------------------------------------------------------------------------------- config & input checks


@pytest.mark.parametrize(
    "bad",
    [
        {"kind": "svm"},
        {"hidden": 0},
        {"hidden": -3},
        {"l2": -1.0},
        {"l2": float("nan")},
        {"epochs": 0},
        {"lr": 0.0},
        {"seed": -1},
    ],
)
def test_bad_config_raises_config_error(bad):
    with pytest.raises(ConfigError) as info:
        HeadConfig(**bad)
    assert "\n" not in str(info.value)


def test_unknown_kind_message_lists_the_valid_kinds():
    with pytest.raises(ConfigError) as info:
        HeadConfig(kind="svm")
    for kind in HEAD_KINDS:
        assert kind in str(info.value)


def test_config_dict_round_trip():
    cfg = HeadConfig(kind="mlp", l2=0.1, hidden=64, epochs=10, lr=0.05, seed=3, balance=False)
    assert HeadConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert HeadConfig.from_dict({"kind": "prototype"}) == HeadConfig(kind="prototype")
    with pytest.raises(ConfigError, match="hiden"):
        HeadConfig.from_dict({"hiden": 3})


def test_bad_training_inputs_raise_data_error(toy):
    X, y, _, _ = toy
    with pytest.raises(DataError):
        train_head(X, y[:-1], LABELS4)
    with pytest.raises(DataError):
        train_head(X, y + 4, LABELS4)
    with pytest.raises(DataError):
        train_head(X, y, ["a", "a", "b", "c"])
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(DataError):
        train_head(bad, y, LABELS4)
    with pytest.raises(DataError):
        train_head(X, y, LABELS4, sample_weight=-np.ones(len(y)))
    with pytest.raises(DataError):
        train_head(X, y, LABELS4, X_val=X)
