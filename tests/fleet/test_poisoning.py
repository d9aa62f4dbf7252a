"""A fleet round against devices that lie plausibly or overflow: wrong labels with consistent
statistics (left out by the leave-one-device-out label check, the merge as good as the honest
devices' alone), counts that wrap int64, a finite but enormous Gram matrix, and metadata nested
past Python's recursion limit. Engine-free, synthetic backbone-like features (seconds)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from edgetl.fleet.merger import Merger, run_local
from edgetl.fleet.summaries import FleetError, LocalData, Summary, check_summary, respond
from tests.fleet.test_summaries import NAMES, _data, _two_class_devices


def _split(seed: int):
    """Train rows for the fleet and unseen rows of the same classes for scoring the merge."""
    X, y = _data(seed=seed, n=1800)
    return (X[:900], y[:900]), (X[900:], y[900:])


def _poisoned(parts: dict, who: str) -> dict:
    """``who``'s images with its classes relabelled one to the next (a plausible lie: every
    statistic is computed from real rows)."""
    bad = dict(parts)
    X, labels = parts[who].X, parts[who].labels
    names = sorted(set(labels))
    relabel = {a: b for a, b in zip(names, names[1:] + names[:1])}
    bad[who] = LocalData.classify(X, [relabel[l] for l in labels])
    return bad


def _accuracy(head, X, y) -> float:
    return float(np.mean(head.predict(X) == y)) * 100


@pytest.mark.parametrize("kind", ["ridge", "prototype"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_device_with_wrong_labels_is_left_out_and_the_merge_matches_the_honest_one(kind, seed, monkeypatch):
    (X, y), (Xt, yt) = _split(seed)
    parts, _ = _two_class_devices(X, y, devices=8, seed=seed)
    liar = sorted(parts)[seed + 3]
    honest = {k: v for k, v in parts.items() if k != liar}
    res = run_local(Merger(kind, labels=NAMES), _poisoned(parts, liar))
    ref = run_local(Merger(kind, labels=NAMES), honest)
    refused = {r["device"] for r in res.provenance["refused"]}
    assert refused == {liar}, res.provenance["refused"]
    assert (
        liar in res.provenance["refused"][0]["reason"]
        and "leave-one-device-out" in res.provenance["refused"][0]["reason"]
    )
    acc, acc_ref = _accuracy(res.head, Xt, yt), _accuracy(ref.head, Xt, yt)
    assert abs(acc - acc_ref) <= 1.0, (acc, acc_ref)
    assert min(res.provenance["label_agreement"].values()) >= 0.5
    # without the check the lie costs accuracy: the merge of all eight is measurably worse
    import edgetl.fleet.merger as merger

    monkeypatch.setattr(merger, "MIN_AGREEMENT", -1.0)
    unchecked = run_local(Merger(kind, labels=NAMES), _poisoned(parts, liar))
    assert unchecked.provenance["refused"] == []
    assert _accuracy(unchecked.head, Xt, yt) < acc_ref - 1.0


def test_honest_non_iid_devices_are_never_left_out():
    for seed in range(3):
        (X, y), _ = _split(seed)
        parts, _ = _two_class_devices(X, y, devices=8, seed=seed)
        res = run_local(Merger("ridge", labels=NAMES), parts)
        assert res.provenance["refused"] == [] and len(res.provenance["label_agreement"]) == 8


def _moments(parts):
    m = Merger("ridge", labels=NAMES)
    step = m.step(0)
    return step, {k: respond(step, v) for k, v in parts.items()}


def test_counts_that_wrap_int64_and_a_huge_gram_are_refused_and_the_rest_merge():
    (X, y), _ = _split(5)
    parts, _ = _two_class_devices(X, y, devices=8, seed=5)
    step, replies = _moments(parts)
    s = replies["dev1"]
    wrapped = copy.deepcopy(s)
    c = np.asarray(wrapped.arrays["count"], np.int64).copy()
    nz = np.flatnonzero(c)
    c[nz[0]] += 2**62
    c[nz[1]] += 2**62
    c[np.flatnonzero(c == 0)[:2]] = 2**62  # four times 2**62 wraps the int64 sum back to n
    wrapped.arrays["count"] = c
    with pytest.raises(FleetError, match="dev1: summary refused: class counts"):
        check_summary(wrapped, step, who="dev1", d=X.shape[1])
    huge = copy.deepcopy(s)
    huge.arrays["gram"] = huge.arrays["gram"] * 1e300
    with pytest.raises(FleetError, match="not a backbone's features"):
        check_summary(huge, step, who="dev1", d=X.shape[1])
    # in a round: both liars left out with their reasons, the others merge
    m = Merger("ridge", labels=NAMES)
    for i in range(m.n_steps):
        st = m.step(i)
        rep = {k: respond(st, v) for k, v in parts.items()}
        if i == 0:
            rep["dev1"], rep["dev2"] = wrapped, copy.deepcopy(rep["dev2"])
            rep["dev2"].arrays["gram"] = rep["dev2"].arrays["gram"] * 1e300
        m.absorb(st, rep)
    res = m.result()
    assert {r["device"] for r in res.provenance["refused"]} == {"dev1", "dev2"}
    assert np.all(np.isfinite(res.head.arrays["W"]))


def test_metadata_nested_past_the_recursion_limit_is_one_line():
    with pytest.raises(FleetError, match="cam3: summary metadata is not usable JSON"):
        Summary.from_wire({}, '{"labels": ' + "[" * 100_000 + "]" * 100_000 + "}", who="cam3")


def test_simulate_and_serve_share_one_default_base_and_refusals_print_whole():
    import inspect

    from edgetl.core.console import clip
    from edgetl.fleet import cli, deploy, flower
    from edgetl.fleet.server import FleetRound
    from edgetl.fleet.summaries import DEFAULT_BASE

    assert DEFAULT_BASE == "current"  # the bundle's own data takes part: classes no device has are kept
    defaults = {
        name: next(p.default for p in cmd.params if p.name == "base")
        for name, cmd in (("serve", cli.serve), ("simulate", cli.simulate))
    }
    defaults.update(
        {
            f.__qualname__: inspect.signature(f).parameters["base"].default
            for f in (flower.simulate, flower.run_server, deploy.serve, FleetRound.__init__)
        }
    )
    assert set(defaults.values()) == {DEFAULT_BASE}, defaults
    reason = "it does not know classes this device's head knows: ['digit-seven', 'digit-eight']"
    for limit in range(10, len(reason) + 5):
        out = clip(reason, limit)
        assert len(out) <= max(limit, 1) and (out == reason or (out.endswith("…") and reason.startswith(out[:-1])))
        if out != reason and len(out) > limit // 2 + 1:
            assert reason[len(out) - 1] in " ,;:'[", (limit, out)  # cut where a word ends


def test_a_merged_head_is_accepted_under_a_trust_policy_only_when_the_fleet_server_signed_it(tmp_path):
    from edgetl.core.signing import generate_key, load_signing_key, load_trust, sign_delivery, verify_delivery
    from edgetl.errors import TrustError

    (X, y), _ = _split(3)
    parts, _ = _two_class_devices(X, y, devices=8, seed=3)
    res = run_local(Merger("ridge", labels=NAMES), parts)
    arrays = {k: np.asarray(v) for k, v in res.head.arrays.items()}
    doc = {"kind": res.head.kind, "labels": list(res.head.labels), "meta": {}, "provenance": {"devices": 8}}
    for name in ("server", "device"):
        generate_key(name, tmp_path)
    policy_file = tmp_path / "trust.toml"
    policy_file.write_text(f'''
[[key]]
name = "server"
public_key = "{(tmp_path / "server.pub").read_text().strip()}"
may = ["fleet"]
[[key]]
name = "device"
public_key = "{(tmp_path / "device.pub").read_text().strip()}"
may = ["adapt", "threshold"]
''')
    policy = load_trust(policy_file)
    with pytest.raises(TrustError, match="not signed"):
        verify_delivery(policy, doc, arrays, "cam1")
    signed = {**doc, "signature": sign_delivery(load_signing_key(tmp_path / "server.key"), doc, arrays)}
    assert verify_delivery(policy, signed, arrays, "cam1") == "server"
    tampered = {**arrays, "W": arrays["W"] * -1}
    with pytest.raises(TrustError, match="does not match"):
        verify_delivery(policy, signed, tampered, "cam1")
    with pytest.raises(TrustError, match="does not match"):
        verify_delivery(policy, {**signed, "labels": list(reversed(signed["labels"]))}, arrays, "cam1")
    by_device = {**doc, "signature": sign_delivery(load_signing_key(tmp_path / "device.key"), doc, arrays)}
    with pytest.raises(TrustError, match="may only"):
        verify_delivery(policy, by_device, arrays, "cam1")
