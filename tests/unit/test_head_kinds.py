"""Every registered head kind through its whole life, on small synthetic features (no backbone):
fit -> fused ONNX graph -> parity with the numpy head under ONNX Runtime -> save/load round trip ->
on-device update -> fleet summary and merge (where the kind has a fleet merge).

Parametrised over the registry, so a kind registered later is taken through the same steps; a
kind of a family this file does not know fails :func:`test_every_family_has_a_lifecycle`.
A new kind defined here as one class (a nearest-class-mean head that merges itself) goes the same
way with no edit to ``src/``.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgetl.errors import ConfigError
from edgetl.fleet import FleetError
from edgetl.fleet import _edgetl as et
from edgetl.fleet.merger import Merger, run_local
from edgetl.fleet.summaries import LocalData, Summary, _arr, _fail, _labels
from edgetl.heads import kinds, registry
from edgetl.heads.classification import Head, HeadConfig
from edgetl.heads.defect import DefectConfig, fit_defect_head, load_any_head, update_defect_head
from edgetl.heads.oneclass import ImageConfig
from edgetl.heads.patch import AnomalyConfig, AnomalyHead, fit_patch_head, update_patch_head
from edgetl.heads.training import train_head

ort = pytest.importorskip("onnxruntime")

# float32 graph vs float32 numpy on the same features: only summation order differs
RTOL = 1e-4
LABELS = ["a", "b", "c"]
SHAPE = (6, 8, 8)  # patch features (C, H, W)
D_POOLED = 12
SIZE = 32


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _classes(n: int, seed: int, d: int = 16):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((len(LABELS), d)) * 3
    y = rng.integers(0, len(LABELS), n)
    return (centres[y] + rng.standard_normal((n, d))).astype(np.float32), y.astype(np.int64)


def _patches(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    F = rng.standard_normal((n, *SHAPE)).astype(np.float32)
    F[:, 0] += np.linspace(0, 1, SHAPE[1])[None, :, None].astype(np.float32)
    return F


def _rows(n: int, seed: int) -> np.ndarray:
    Z = np.random.default_rng(seed + 1000).standard_normal((n, D_POOLED)).astype(np.float32)
    return np.concatenate([_patches(n, seed).reshape(n, -1), Z], axis=1)


def _merges_of(kind: str) -> list[str]:
    return [m for m in registry.fleet_merge_names() if registry.fleet_merge(m).head_kind == kind]


# ============================================================================ per family
def _classify_life(kind: str, tmp_path):
    X, y = _classes(90, 0)
    cfg = HeadConfig(kind=kind, l2=1e-2, hidden=8, epochs=30)
    head = train_head(X, y, LABELS, cfg=cfg)
    assert head.kind == kind and head.proba(X).shape == (90, 3)
    # fused graph == numpy head on the same features
    Xt, _ = _classes(20, 1)
    got = _session(head.graph(opset=17)).run(None, {"head/features": Xt})[0]
    np.testing.assert_allclose(got, head.proba(Xt), rtol=RTOL, atol=1e-6)
    # save / load: the same head
    head.save(tmp_path / "head.npz")
    back = Head.load(tmp_path / "head.npz")
    assert back.kind == kind and back.labels == LABELS
    np.testing.assert_array_equal(back.logits(Xt), head.logits(Xt))
    # on-device update on new rows: a head of the same kind and classes
    Xn, yn = _classes(40, 2)
    new = registry.get(kind).update(back, Xn, yn)
    assert new.kind == kind and new.labels == LABELS and np.isfinite(new.logits(Xt)).all()
    # fleet: every merge producing this kind, over three devices' data
    merges = _merges_of(kind)
    assert merges, f"{kind}: no fleet merge produces it"
    for name in merges:
        parts = {}
        for j in range(3):
            Xd, yd = _classes(30, 10 + j)
            parts[f"dev{j}"] = LocalData.classify(Xd, [LABELS[i] for i in yd])
        res = run_local(Merger(name, labels=LABELS, rounds=3), parts)
        assert res.head.kind == kind and res.head.labels == LABELS
        assert set(res.provenance["devices"]) == {"dev0", "dev1", "dev2"} and res.provenance["refused"] == []
        acc = float(np.mean(res.head.predict(X) == y))
        assert acc > 0.8, (name, acc)  # well-separated classes: any merge learns them


def _patch_life(kind: str, tmp_path):
    from edgetl.heads.patch_graph import scoring_graph

    cfg = AnomalyConfig(kind=kind, coreset_ratio=0.25, padim_dims=4)
    head = fit_patch_head(_patches(12, 0), cfg, size=SIZE)
    assert head.kind == kind
    Ft = _patches(4, 5)
    Ft[1, :, 2:4, 2:4] += 3
    sess = _session(scoring_graph(head, opset=17))
    maps, scores = sess.run(None, {sess.get_inputs()[0].name: Ft})
    ref_maps, ref_scores = head.maps(Ft)
    np.testing.assert_allclose(scores, ref_scores, rtol=RTOL)
    np.testing.assert_allclose(maps, ref_maps, rtol=RTOL, atol=RTOL * ref_scores.max())
    head.save(tmp_path / "head.npz")
    back = AnomalyHead.load(tmp_path / "head.npz")
    np.testing.assert_array_equal(back.maps(Ft)[1], ref_scores)
    new = update_patch_head(back, _patches(6, 7))
    assert new.kind == kind and np.isfinite(new.maps(Ft)[1]).all()
    assert _merges_of(kind) == [kind]
    parts = {f"dev{j}": LocalData.anomaly(_patches(5, 20 + j)) for j in range(3)}
    res = run_local(Merger(kind, anomaly_template=head), parts)
    assert res.head.kind == kind and res.provenance["refused"] == []
    assert np.isfinite(res.head.maps(Ft)[1]).all()


def _defect_life(kind: str, tmp_path):
    fitted_as = kind if registry.get(kind).family == "image" or registry.get(kind).fits else "combined"
    cfg = DefectConfig.from_dict({"kind": fitted_as, "patch_kind": "padim", "padim_dims": 4})
    head = fit_defect_head(_rows(12, 0), cfg, patch_shape=SHAPE, size=SIZE).as_kind(kind)
    assert head.kind == kind and head.parts == registry.get(kind).parts
    Xt = _rows(4, 5)
    sess = _session(head.graph(opset=17))
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: Xt})))
    ref_map, ref_scores = head.maps(Xt)
    np.testing.assert_allclose(out["score"], ref_scores, rtol=RTOL)
    assert ("anomaly_map" in out) == (ref_map is not None)
    path = tmp_path / "head.npz"
    head.save(path)
    back = load_any_head(path)
    np.testing.assert_allclose(back.maps(Xt)[1], ref_scores, rtol=1e-6)
    if isinstance(back, AnomalyHead):  # a defect head scoring by its patch part is saved as that part
        back = head
    new = update_defect_head(back, _rows(6, 7))
    assert new.kind == kind and np.isfinite(new.maps(Xt)[1]).all()
    # image-level parts have no fleet merge yet: the registry says so, with the merges there are
    assert _merges_of(kind) == []
    with pytest.raises(ConfigError, match="has no fleet merge; choose one of"):
        registry.fleet_merge(kind)


LIFE = {"classify": _classify_life, "patch": _patch_life, "image": _defect_life, "defect": _defect_life}


def test_every_family_has_a_lifecycle():
    assert set(registry.FAMILIES) == set(LIFE)


@pytest.mark.parametrize("kind", registry.names())
def test_kind_lifecycle(kind, tmp_path):
    LIFE[registry.get(kind).family](kind, tmp_path)


# ============================================================================ a new kind, one class
class NearestMean(kinds.ClassifyKind, registry.FleetMerge):
    """Euclidean nearest class mean (logits: minus half the squared distance), defined here and
    nowhere else: its arrays, numpy logits, ONNX nodes, fit and fleet merge (the on-device update
    is the inherited refit on the device's rows)."""

    name = "test-ncm"
    head_kind = "test-ncm"
    uses_l2 = False
    calibration_keys = ()
    spec = {"mean": ("d",), "centres": ("d", "k"), "sq": ("k",)}

    # ---- scoring: -0.5 * ||x - mean - c_j||^2 + 0.5 * ||x - mean||^2 = x'c_j - 0.5 ||c_j||^2
    def logits(self, a, X):
        return (X - a["mean"]) @ a["centres"] - a["sq"]

    def graph_logits(self, a, g, centred, d):
        return g.node("Sub", [g.node("MatMul", [centred, g.const("centres", a["centres"])]), g.const("sq", a["sq"])])

    def scale_logits(self, a, s):
        return {**a, "centres": a["centres"] * s, "sq": a["sq"] * s}

    # ---- training, from per-class sums (what the device keeps and the fleet sends)
    @staticmethod
    def arrays(counts, sums, total_sum, n) -> dict:
        mean = (total_sum / n).astype(np.float32)
        centres = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None] - mean, 0.0)
        sq = 0.5 * np.sum(centres * centres, axis=1) + np.where(counts > 0, 0.0, 1e6)
        return {"mean": mean, "centres": centres.T.astype(np.float32), "sq": sq.astype(np.float32)}

    def fit(self, X, y, labels, *, cfg, X_val=None, y_val=None, sample_weight=None):
        X, y, k = np.asarray(X, np.float64), np.asarray(y), len(labels)
        counts = np.bincount(y, minlength=k).astype(np.float64)
        sums = np.zeros((k, X.shape[1]))
        np.add.at(sums, y, X)
        meta = {"config": cfg.to_dict(), "counts": counts.tolist(), "sums": sums.tolist(), "n": len(X)}
        return Head(self.name, list(labels), self.arrays(counts, sums, X.sum(axis=0), len(X)), meta)

    @staticmethod
    def _sums(X, y, k):
        sums = np.zeros((k, np.asarray(X).shape[1]))
        np.add.at(sums, y, np.asarray(X, np.float64))
        return sums

    # ---- fleet: one step, per-class counts and sums; the merge is their sum
    def fleet_steps(self, m):
        return ["sums"]

    def fleet_broadcast(self, m, name, index):
        return {"labels": m.base_labels}, {}

    def fleet_expected_arrays(self, step):
        return {"count", "sum"}

    def fleet_respond(self, step, data, template):
        labels = step.config["labels"]
        y = data.indices(labels)
        counts = np.bincount(y, minlength=len(labels)).astype(np.int64)
        return Summary(self.name, step.name, {"count": counts, "sum": self._sums(data.X, y, len(labels))}, {})

    def fleet_check(self, s, step, who, ctx):
        k = len(step.config["labels"])
        counts = _arr(s, "count", who, shape=(k,), integer=True)
        if np.any(counts < 0) or counts.sum() > ctx["max_rows"]:
            _fail(who, "class counts are negative or implausibly large")
        _arr(s, "sum", who, ndim=2)
        _labels({"labels": step.config["labels"]}, who)
        return s

    def fleet_absorb(self, m, step, ok):
        m.state["counts"] = sum(np.asarray(s.arrays["count"], np.float64) for s in ok.values())
        m.state["sums"] = sum(np.asarray(s.arrays["sum"], np.float64) for s in ok.values())
        for who in ok:
            m.devices[str(who)] = {"completed": True}

    def fleet_result(self, m, prov):
        counts, sums = m.state["counts"], m.state["sums"]
        n = int(counts.sum())
        meta = {"counts": counts.tolist(), "sums": sums.tolist(), "n": n, "fleet": {"kind": self.name}}
        return et.head_from_arrays(self.name, m.base_labels, self.arrays(counts, sums, sums.sum(axis=0), n), meta)


@pytest.fixture
def ncm():
    registry.register(NearestMean)
    yield registry.get(NearestMean.name)
    registry.unregister(NearestMean.name)


def test_a_new_kind_is_one_class(ncm, tmp_path):
    X, y = _classes(90, 0)
    head = train_head(X, y, LABELS, cfg=HeadConfig(kind=ncm.name))
    assert head.kind == ncm.name and np.mean(head.predict(X) == y) > 0.9
    # export: the generic fused graph, parity under ONNX Runtime
    Xt, yt = _classes(20, 1)
    got = _session(head.graph(opset=17)).run(None, {"head/features": Xt})[0]
    np.testing.assert_allclose(got, head.proba(Xt), rtol=RTOL, atol=1e-6)
    head.save(tmp_path / "ncm.npz")
    back = Head.load(tmp_path / "ncm.npz")
    np.testing.assert_array_equal(back.logits(Xt), head.logits(Xt))
    # adapt: the inherited on-device retrain, on replay rows plus a new class "d" the device adds
    Xn, _ = _classes(20, 2)
    Xn += 8.0
    labels = [*LABELS, "d"]
    X_dev, y_dev = np.concatenate([X, Xn]), np.concatenate([y, np.full(20, 3)])
    adapted = ncm.update(back, X_dev, y_dev, labels=labels)
    assert adapted.kind == ncm.name and adapted.labels == labels
    assert np.mean(adapted.predict(Xn) == 3) > 0.9 and np.mean(adapted.predict(X) == y) > 0.9
    # fleet: the kind is its own merge; three devices merge to the central fit
    assert ncm.name in registry.fleet_merge_names()
    parts, Xs, ys = {}, [], []
    for j in range(3):
        Xd, yd = _classes(30, 10 + j)
        parts[f"dev{j}"] = LocalData.classify(Xd, [LABELS[i] for i in yd])
        Xs.append(Xd)
        ys.append(yd)
    res = run_local(Merger(ncm.name, labels=LABELS), parts)
    central = train_head(np.concatenate(Xs), np.concatenate(ys), LABELS, cfg=HeadConfig(kind=ncm.name))
    assert res.head.kind == ncm.name and res.provenance["refused"] == []
    np.testing.assert_allclose(res.head.logits(Xt), central.logits(Xt), rtol=1e-4, atol=1e-3)
    # a device answering with a wrong shape is refused by the kind's own check
    bad = {**parts, "liar": Summary(ncm.name, "sums", {"count": np.zeros(2, np.int64), "sum": np.zeros((2, 16))}, {})}
    m = Merger(ncm.name, labels=LABELS)
    step = m.step(0)
    replies = {w: (p if isinstance(p, Summary) else et_respond(step, p)) for w, p in bad.items()}
    m.absorb(step, replies)
    assert [r.device for r in m.refused] == ["liar"]


def et_respond(step, data):
    from edgetl.fleet.summaries import respond

    return respond(step, data)


def test_unregistered_kinds_fail_with_the_valid_list():
    with pytest.raises(ConfigError, match="valid kinds: linear, mlp, prototype"):
        HeadConfig(kind="test-ncm")
    with pytest.raises(FleetError, match="choose one of ridge, prototype, linear, mlp, padim, patchcore"):
        Merger("test-ncm")
    with pytest.raises(ConfigError, match="is not one of knn, gaussian"):
        ImageConfig(kind="nope")
