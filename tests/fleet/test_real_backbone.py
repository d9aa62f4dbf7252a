"""Fleet merges on features of edgetl's real backbone: non-IID digits, PatchCore on defects, and
the device gate with versions and rollback on a real bundle."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgetl.fleet import _edgetl as et
from edgetl.fleet.cli import split_dataset
from edgetl.fleet.device import Device
from edgetl.fleet.merger import Merger, run_local
from edgetl.fleet.server import FleetRound
from edgetl.fleet.summaries import LocalData
from tests.numerics import assert_same_decisions

NAMES = [f"d{i}" for i in range(10)]


def _split(labels, rest, seed=0):
    """(device pools: 8 devices x 2 of 10 classes, test rows), from the non-factory rows."""
    rng = np.random.default_rng(seed)
    test = np.concatenate(
        [rng.choice(rest[labels[rest] == c], int(0.3 * np.sum(labels[rest] == c)), replace=False) for c in range(10)]
    )
    pool = np.setdiff1d(rest, test)
    parts = split_dataset(
        [NAMES[c] for c in labels[pool]], 8, split="class", classes_per_device=2, alpha=0.5, seed=seed
    )
    return [pool[p] for p in parts], np.sort(test)


def fedavg_of_heads(heads, weights):
    """Plain FedAvg of edgetl linear heads: every array averaged, weighted by rows."""
    w = np.asarray(weights, float) / np.sum(weights)
    arrays = {k: sum(wi * h.arrays[k].astype(np.float64) for wi, h in zip(w, heads)) for k in heads[0].arrays}
    return et.head_from_arrays("linear", NAMES, arrays)


def test_non_iid_fleet_head_matches_central(digits_features, digits):
    X, labels, _ = digits_features
    _, _, _, rest = digits
    devices, test = _split(labels, rest)
    assert all(len(np.unique(labels[d])) <= 2 for d in devices)
    acc = lambda h: float(np.mean(h.predict(X[test]) == labels[test]))
    parts = {f"cam{i}": LocalData.classify(X[d], [NAMES[c] for c in labels[d]]) for i, d in enumerate(devices)}
    union = np.concatenate(devices)
    central = et.train_head(X[union], labels[union], NAMES, kind="linear")
    central_proto = et.train_head(X[union], labels[union], NAMES, kind="prototype")
    ridge = run_local(Merger("ridge", labels=NAMES), parts).head
    proto = run_local(Merger("prototype", labels=NAMES), parts).head
    linear = run_local(Merger("linear", labels=NAMES), parts).head  # FedNCM start + 30 FedAdam rounds
    alone = [et.train_head(X[d], labels[d], NAMES, kind="linear") for d in devices]
    fedavg = fedavg_of_heads(alone, [len(d) for d in devices])
    table = {
        "central linear": acc(central),
        "fleet linear": acc(linear),
        "fleet ridge": acc(ridge),
        "central prototype": acc(central_proto),
        "fleet prototype": acc(proto),
        "device alone (mean)": float(np.mean([acc(h) for h in alone])),
        "device alone (best)": max(acc(h) for h in alone),
        "plain FedAvg of device heads": acc(fedavg),
    }
    print("\n" + json.dumps({k: round(v, 4) for k, v in table.items()}, indent=1))
    assert table["fleet linear"] >= table["central linear"] - 0.02
    # ridge is exact (its central fit is itself, see test_summaries) but a weaker model than
    # logistic regression on these features: about 2.5 points below it, reported, not hidden
    assert table["fleet ridge"] >= table["central linear"] - 0.05
    assert abs(table["fleet prototype"] - table["central prototype"]) <= 0.01  # near-ties only (below)
    assert_same_decisions(proto.predict(X[test]), central_proto.logits(X[test]))
    assert table["device alone (best)"] < 0.35  # 2 of 10 classes each: far below
    assert table["plain FedAvg of device heads"] < table["fleet linear"] - 0.1


def test_patchcore_merged_bank_auroc_matches_central(defects):
    data, bundle = defects
    b = et.load_bundle(bundle)
    template = et.current_head(b)
    good = sorted((data / "train" / "good").glob("*.png"))
    test = sorted((data / "test").glob("*/*.png"))
    y = np.array([p.parent.name != "good" for p in test])
    F_train = et.patch_features(b, good)
    F_test = et.patch_features(b, test)
    central = et.fit_anomaly_head(F_train, template.config, size=template.size)
    parts = {f"cam{j}": LocalData.anomaly(F_train[j::8]) for j in range(8)}
    res = run_local(Merger("patchcore", anomaly_template=template), parts)
    a_central = et.auroc(y, central.maps(F_test)[1])
    a_merged = et.auroc(y, res.head.maps(F_test)[1])
    print(
        f"\npatchcore image AUROC central {a_central:.4f} merged {a_merged:.4f} "
        f"(bank {res.provenance['bank']} of a union of {res.provenance['union']})"
    )
    assert a_merged >= a_central - 0.01


@pytest.fixture()
def device_pair(digits_bundle, digits, tmp_path):
    """Two device bundles (copies of the factory release) with local images of digits 0-4 / 5-9."""
    from . import _digits

    images, labels, factory, rest = digits
    rng = np.random.default_rng(3)
    out = {}
    for j, classes in enumerate([range(5), range(5, 10)]):
        idx = np.concatenate([rng.choice(rest[labels[rest] == c], 24, replace=False) for c in classes])
        data = _digits.write_folder(tmp_path / f"cam{j}", images, labels, idx)
        shutil.copytree(digits_bundle, tmp_path / f"cam{j}.bundle")
        out[f"cam{j}"] = (tmp_path / f"cam{j}.bundle", data)
    shutil.copytree(digits_bundle, tmp_path / "server.bundle")
    return tmp_path / "server.bundle", out


def test_refused_global_head_leaves_device_head_current(device_pair):
    _, devs = device_pair
    bundle, data = devs["cam0"]
    dev = Device.open(bundle, data, name="cam0")
    before = (bundle / "manifest.json").read_bytes()
    cur = et.current_head(et.load_bundle(bundle))
    # a "global" head whose classes are rotated: consistent, well-formed, and wrong
    arrays = dict(cur.arrays)
    arrays["W"] = np.roll(cur.arrays["W"], 1, axis=1)
    arrays["b"] = np.roll(cur.arrays["b"], 1)
    with pytest.raises(et.GateError, match="stays current"):
        dev.consider("linear", cur.labels, arrays, {})
    assert (bundle / "manifest.json").read_bytes() == before
    assert [h["version"] for h in et.history(bundle)] == [1]
    assert not (bundle / "heads" / "v2.npz").exists()
    # a head that forgot a class is refused even if accuracy holds
    with pytest.raises(et.GateError, match="does not know classes"):
        dev.consider(
            "linear", cur.labels[:-1], {k: (v[..., :-1] if k in ("W", "b") else v) for k, v in cur.arrays.items()}, {}
        )
    # malformed arrays never reach the gate
    with pytest.raises(et.FleetError):
        dev.consider("linear", cur.labels, {**cur.arrays, "W": cur.arrays["W"][:5]}, {})
    assert (bundle / "manifest.json").read_bytes() == before


def test_fleet_round_in_process_versions_and_rollback(device_pair):
    from edgetl.fleet.server import run_round

    server, devs = device_pair
    devices = {n: Device.open(b, d, name=n) for n, (b, d) in devs.items()}
    report = run_round(FleetRound(server), devices)
    assert report["version"] == 2 and report["kind"] == "ridge" and report["devices"] == 2
    entry = et.load_bundle(server).head_entry()
    assert entry["source"] == "fleet" and entry["fleet"]["devices"] == 2
    assert entry["fleet"]["class_counts"]["d0"] > 0 and entry["fleet"]["steps"][0] == "moments"
    assert set(entry["fleet"]["device_detail"]) == {"cam0", "cam1"}
    for name, (bundle, _) in devs.items():
        d = report["deliveries"][name]
        assert d["accepted"], d
        b = et.load_bundle(bundle)
        assert b.head_version == 2 and b.head_entry()["source"] == "fleet"
        assert (bundle / b.head_entry()["exemplars"]).exists()
        et.rollback(bundle)
        assert et.load_bundle(bundle).head_version == 1


def test_anomaly_round_in_process_writes_versions(defects, tmp_path):
    """A PatchCore round: the server merges its own bank with two devices' coresets; each device
    gates the merged bank on false alarms among its held-out good images."""
    from edgetl.fleet.server import run_round

    data, bundle = defects
    good = sorted((data / "train" / "good").glob("*.png"))
    shutil.copytree(bundle, tmp_path / "server.bundle")
    devices = {}
    for j in range(2):
        folder = tmp_path / f"cam{j}" / "good"
        folder.mkdir(parents=True)
        for p in good[j::4]:
            shutil.copy(p, folder / p.name)
        shutil.copytree(bundle, tmp_path / f"cam{j}.bundle")
        devices[f"cam{j}"] = Device.open(tmp_path / f"cam{j}.bundle", tmp_path / f"cam{j}", name=f"cam{j}")
    report = run_round(FleetRound(tmp_path / "server.bundle"), devices)
    assert report["kind"] == "patchcore" and report["version"] == 2 and report["devices"] == 2
    b = et.load_bundle(tmp_path / "server.bundle")
    assert (
        b.head_entry()["source"] == "fleet"
        and b.head_entry()["threshold"] == et.load_bundle(bundle).head_entry()["threshold"]
    )
    for name, d in report["deliveries"].items():
        assert d["accepted"], d
        assert d["false_alarms_after"] <= d["false_alarms_before"] + 0.05
        assert et.load_bundle(tmp_path / f"{name}.bundle").head_version == 2


def test_a_bundle_without_a_reference_records_its_tasks_gate_metric(defects, digits_bundle):
    """FP32 in ONNX Runtime is its own reference: nothing is compared, and the gate still names the
    figure the task's gate compares (a defect detector's image AUROC, never accuracy)."""
    _, parts = defects
    for bundle, metric in ((parts, "image_auroc"), (digits_bundle, "accuracy")):
        gate = json.loads((bundle / "report.json").read_text())["gate"]
        assert gate["metric"] == metric and gate["verdict"] == "not applicable", gate
        assert gate["method"].startswith("no quantization"), gate
