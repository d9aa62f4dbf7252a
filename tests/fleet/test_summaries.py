"""Engine-free fleet core: exact merges equal the central fit, hostile summaries are refused.

No Flower, no backbone: synthetic features shaped like a frozen backbone's (a class signal under
a shared offset, per-feature scales far from 1, so standardisation matters)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from edgetl.fleet import _edgetl as et
from edgetl.fleet import ridge as R
from edgetl.fleet.merger import Merger, run_local
from edgetl.fleet.summaries import FleetError, LocalData, check_summary, respond
from tests.numerics import assert_same_decisions

K, D = 10, 48
NAMES = [f"c{i}" for i in range(K)]


def _data(seed=0, n=900, noise=1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(K, D)) * 0.6
    y = rng.integers(0, K, n)
    scale = rng.uniform(0.2, 5.0, D)
    X = ((centres[y] + noise * rng.normal(size=(n, D))) * scale + rng.uniform(-3, 8, D)).astype(np.float32)
    return X, y


def _two_class_devices(X, y, devices=8, seed=0):
    """Each device holds 2 of the 10 classes (classes shared between two devices are divided)."""
    rng = np.random.default_rng(seed)
    owner = np.empty(len(y), int)
    for i in range(len(y)):
        c = y[i]
        owner[i] = rng.choice([c % devices, (c + 2) % devices]) if c < devices else (c - devices) * 3 % devices
    parts = {}
    for j in range(devices):
        m = owner == j
        if m.any():
            parts[f"dev{j}"] = LocalData.classify(X[m], [NAMES[c] for c in y[m]])
    return parts, owner


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ---------------------------------------------------------------------------------- exactness
def test_prototype_merge_equals_central_fit():
    X, y = _data()
    parts, _ = _two_class_devices(X, y)
    assert len(parts) == 8
    merged = run_local(Merger("prototype", labels=NAMES), parts).head
    central = et.train_head(X, y, NAMES, kind="prototype")
    for name in ("mean", "prototypes", "logit_scale", "b"):
        assert _rel(merged.arrays[name], central.arrays[name]) < 1e-5, name
    assert 1.0 < float(central.arrays["logit_scale"]) < 30.0  # an interior optimum, not a bound
    assert_same_decisions(merged.predict(X), central.logits(X))


def _direct_ridge(X, y, l2):
    """Central ridge the plain way: standardise the union, centre, solve."""
    X64 = X.astype(np.float64)
    mean = X64.mean(0)
    std = X64.std(0)
    m32, s32 = mean.astype(np.float32), std.astype(np.float32)
    Xs = ((X - m32) / s32).astype(np.float64)
    Y = np.eye(K)[y]
    xm, ym = Xs.mean(0), Y.mean(0)
    A = (Xs - xm).T @ (Xs - xm)
    W = np.linalg.solve(A + len(y) * l2 * np.eye(D), (Xs - xm).T @ (Y - ym))
    return m32, s32, W, ym - xm @ W


def test_ridge_merge_equals_central_solution_with_standardisation():
    X, y = _data(seed=1)
    parts, _ = _two_class_devices(X, y, seed=1)
    res = run_local(Merger("ridge", labels=NAMES), parts)
    head, T, l2 = res.head, res.provenance["temperature"], res.provenance["l2"]
    assert head.kind == "linear" and set(head.arrays) == {"mean", "scale", "W", "b"}
    m32, s32, W, b = _direct_ridge(X, y, l2)
    assert _rel(head.arrays["mean"], m32) < 1e-6
    assert _rel(head.arrays["scale"], s32) < 1e-5
    assert _rel(head.arrays["W"], W * T) < 1e-5
    assert _rel(head.arrays["b"], b * T) < 1e-5
    # the same protocol with one participant holding the union: same penalty, same temperature
    single = run_local(Merger("ridge", labels=NAMES), {"all": LocalData.classify(X, [NAMES[c] for c in y])})
    assert single.provenance["l2"] == l2
    assert abs(single.provenance["temperature"] - T) / T < 1e-6
    assert_same_decisions(head.predict(X), single.head.logits(X))
    Xs = ((X - m32) / s32).astype(np.float64)
    assert_same_decisions(head.predict(X), Xs @ W + b)


def test_ridge_temperature_is_the_loo_cross_entropy_minimum():
    X, y = _data(seed=2, n=500, noise=1.6)
    arrays, info = R.fit_ridge_head_arrays(X, y, K)
    X64 = X.astype(np.float64)
    counts = np.bincount(y, minlength=K).astype(float)
    sums = np.zeros((K, D))
    np.add.at(sums, y, X64)
    fit = R.ridge_from_moments(len(X), X64.sum(0), X64.T @ X64, counts, sums, l2=info["l2"])
    Z = R.ridge_loo_logits(X, y, fit)

    def loss(s):
        e = s * Z
        e = e - e.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(e).sum(1)) - e[np.arange(len(y)), y]))

    T = info["temperature"]
    assert R.RIDGE_T_BOUNDS[0] < T < R.RIDGE_T_BOUNDS[1]
    assert loss(T) <= min(loss(T * 0.999), loss(T * 1.001)) + 1e-12


def test_padim_merge_equals_central_fit():
    rng = np.random.default_rng(3)
    F = (rng.normal(size=(40, 12, 6, 6)) * rng.uniform(0.5, 3, (1, 12, 1, 1)) + 2).astype(np.float32)
    cfg = et.anomaly_config(kind="padim", padim_dims=8, seed=0)
    central = et.fit_anomaly_head(F, cfg, size=48)
    template = et.fit_anomaly_head(F[:2], cfg, size=48)  # the server bundle's head: settings only
    parts = {f"dev{j}": LocalData.anomaly(F[j * 5 : (j + 1) * 5]) for j in range(8)}
    merged = run_local(Merger("padim", anomaly_template=template), parts).head
    assert int(merged.arrays["count"]) == 40
    assert np.array_equal(merged.arrays["channels"], central.arrays["channels"])
    for name in ("mean", "m2"):
        assert _rel(merged.arrays[name], central.arrays[name]) < 1e-5, name
    _, s_merged = merged.maps(F)
    _, s_central = central.maps(F)
    assert _rel(s_merged, s_central) < 1e-5


def test_patchcore_coreset_of_coresets_covers_the_union():
    rng = np.random.default_rng(4)
    F = rng.normal(size=(32, 16, 4, 4)).astype(np.float32)
    cfg = et.anomaly_config(kind="patchcore", coreset_ratio=0.25, seed=0)
    template = et.fit_anomaly_head(F[:1], cfg, size=32)
    parts = {f"dev{j}": LocalData.anomaly(F[j * 4 : (j + 1) * 4]) for j in range(8)}
    res = run_local(Merger("patchcore", anomaly_template=template), parts)
    central = et.fit_anomaly_head(F, cfg, size=32)
    bank = res.head.arrays["memory"]
    assert len(bank) == len(central.arrays["memory"]) == res.provenance["bank"]
    X = et.patch_rows(F)

    def radius(mem):
        d2 = (X * X).sum(1)[:, None] - 2 * X @ mem.T + (mem * mem).sum(1)[None]
        return float(np.sqrt(np.maximum(d2.min(1), 0).max()))

    # each device's coreset radius over its own patches bounds the extra radius of the merge
    dev_r = max(
        radius(
            et.patch_rows(F[j * 4 : (j + 1) * 4])[
                et.greedy_coreset(et.patch_rows(F[j * 4 : (j + 1) * 4]), et.coreset_size(64, cfg), seed=0)
            ]
        )
        for j in range(8)
    )
    assert radius(bank) <= 2 * radius(central.arrays["memory"]) + dev_r


def test_fedavg_kinds_run_and_learn():
    X, y = _data(seed=5, n=600)
    parts, _ = _two_class_devices(X, y, seed=5)
    for kind in ("linear", "mlp"):
        res = run_local(Merger(kind, labels=NAMES, rounds=15, hidden=32), parts)
        assert res.head.kind == kind
        assert np.mean(res.head.predict(X) == y) > 0.5, kind


# ---------------------------------------------------------------------------------- hostile input
def _moments_step_and_summary(kind="ridge"):
    X, y = _data(seed=6, n=120)
    m = Merger(kind, labels=NAMES)
    step = m.step(0)
    s = respond(step, LocalData.classify(X, [NAMES[c] for c in y]))
    return m, step, s


def _mutations():
    def arr(name, f):
        def mutate(s):
            s.arrays[name] = f(np.array(s.arrays[name]))

        return mutate

    def meta(key, value):
        def mutate(s):
            s.meta[key] = value

        return mutate

    return {
        "nan in sums": (arr("sum", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 3, np.nan, a)), "NaN"),
        "inf in gram": (arr("gram", lambda a: np.where(np.eye(len(a)) > 0, np.inf, a)), "NaN or infinity"),
        "wrong width": (arr("sum", lambda a: a[:, :-1]), "shape"),
        "negative count": (arr("count", lambda a: np.where(np.arange(len(a)) == 0, -a[0], a)), "negative"),
        "fractional count": (arr("count", lambda a: a.astype(np.float64) + 0.5), "whole counts"),
        "huge count": (meta("n", 10**12), "outside"),
        "counts do not add up": (meta("n", 7), "add up"),
        # claiming fewer rows than the sums came from (to weigh a poisoned mean more) breaks
        # sum(x^2) >= sum(x)^2 / n; claiming more rows cannot be told from real data: max_rows caps it
        "deflated n": (
            lambda s: (
                s.arrays.__setitem__("count", np.maximum(s.arrays["count"] // 20, 1)),
                s.meta.__setitem__("n", int(np.maximum(s.arrays["count"], 1).sum())),
            ),
            "sums of squares",
        ),
        "duplicate labels": (meta("labels", ["c0"] * 10), "twice"),
        "label of another set": (meta("labels", [f"x{i}" for i in range(10)]), "not in the round's label set"),
        "missing array": (lambda s: s.arrays.pop("gram"), "expected"),
        "extra array": (lambda s: s.arrays.__setitem__("code", np.zeros(3)), "expected"),
        "object dtype": (lambda s: s.arrays.__setitem__("count", np.array(["1"] * 10, dtype=object)), "dtype"),
        "asymmetric gram": (arr("gram", lambda a: a + np.triu(np.ones_like(a), 1)), "symmetric"),
        "wrong step": (lambda s: setattr(s, "step", "temperature-a"), "answers step"),
        "not a label list": (meta("labels", "c0"), "labels must be"),
    }


@pytest.mark.parametrize("case", sorted(_mutations()))
def test_hostile_summary_refused_with_one_line(case):
    m, step, good = _moments_step_and_summary()
    mutate, words = _mutations()[case]
    bad = copy.deepcopy(good)
    mutate(bad)
    labels = NAMES if case == "label of another set" else None
    with pytest.raises(FleetError) as e:
        check_summary(bad, step, who="cam7", d=D, labels=labels)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cam7: summary refused") and words in msg, msg
    check_summary(good, step, who="cam7", d=D, labels=NAMES)  # the untouched summary passes


def test_a_hostile_device_is_left_out_and_the_rest_merge_exactly():
    X, y = _data(seed=7)
    parts, owner = _two_class_devices(X, y, seed=7)
    m = Merger("ridge", labels=NAMES, allow_new_classes=False)
    honest = {k: v for k, v in parts.items() if k != "dev3"}
    for i in range(m.n_steps):
        step = m.step(i)
        replies = {k: respond(step, v) for k, v in parts.items()}
        if i == 0:
            replies["dev3"].arrays["sum"] = replies["dev3"].arrays["sum"] * np.nan
        m.absorb(step, replies)
    res = m.result()
    assert [r["device"] for r in res.provenance["refused"]] == ["dev3", "dev3", "dev3"]
    assert "NaN" in res.provenance["refused"][0]["reason"]
    ref = run_local(Merger("ridge", labels=NAMES), honest)
    assert _rel(res.head.arrays["W"], ref.head.arrays["W"]) < 1e-6


def test_new_classes_refused_when_not_allowed_and_round_needs_devices():
    X, y = _data(seed=8, n=200)
    m = Merger("prototype", labels=NAMES[:5], allow_new_classes=False, min_devices=1)
    step = m.step(0)
    s = respond(step, LocalData.classify(X, [NAMES[c] for c in y]))
    with pytest.raises(FleetError, match="valid device summaries"):
        m.absorb(step, {"cam1": s})
    assert "not in the round's label set" in m.refused[0].reason


def test_device_never_acts_on_unknown_steps():
    X, y = _data(seed=9, n=50)
    m = Merger("ridge", labels=NAMES)
    step = m.step(0)
    step.name = "exec"
    with pytest.raises(FleetError):
        respond(step, LocalData.classify(X, [NAMES[c] for c in y]))


def test_wire_round_trip_refuses_non_numeric_arrays():
    pytest.importorskip("flwr")
    from flwr.app import Array, ArrayRecord

    from edgetl.fleet import flower

    rec = flower.to_array_record({"a": np.arange(4.0), "b": np.eye(2, dtype=np.float32)})
    back = flower.from_array_record(rec)
    assert np.array_equal(back["a"], np.arange(4.0)) and back["b"].dtype == np.float32
    evil = ArrayRecord({"x": Array(dtype="object", shape=(1,), stype="pickle", data=b"cos\nsystem\n")})
    with pytest.raises(FleetError, match="serialisation"):
        flower.from_array_record(evil, who="cam1")
    evil = ArrayRecord({"x": Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=b"\x93NUMPY")})
    with pytest.raises(FleetError, match="only numbers"):
        flower.from_array_record(evil, who="cam1")
