"""Attacks that held only half-way before: manifest values inside their types' ranges that are
ruinous in what they do, files swapped between their check and their load, signatures used beyond
their scope or replayed, a lock lost across ``fit --force``, and CLI inputs that gave tracebacks.

Small FP32 bundles (the session's ``small`` fixture) keep every case to seconds.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.conftest import run_cli
from tests.faults.conftest import write_policy
from tests.faults.test_faults import _copy, _edit


def _one_line_error(r, code: int, needle: str) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr


# ------------------------------------------------------------------ bounds from what a value does
@pytest.mark.parametrize("size", [300, 4096])
def test_an_input_size_the_model_does_not_take_is_refused_in_one_line(small, tmp_path, size):
    bundle, new, _ = small
    b = _copy(bundle, tmp_path)
    _edit(b, lambda m: m["backbone"]["preprocess"].__setitem__("input_size", size))
    image = sorted((new / "brick").glob("*.png"))[0]
    _one_line_error(run_cli("predict", b, image), 2, f"input_size = {size} but backbone.onnx takes")


def test_a_task_that_does_not_match_the_bundle_is_refused_in_one_line(small, tmp_path):
    bundle, new, _ = small
    b = _copy(bundle, tmp_path)
    _edit(b, lambda m: m.__setitem__("task", "anomaly"))
    image = sorted((new / "brick").glob("*.png"))[0]
    _one_line_error(run_cli("predict", b, image), 2, "task 'anomaly' needs an image-patch backbone")
    _edit(b, lambda m: (m.__setitem__("task", "classify"), m["head"]["versions"][0].__setitem__("kind", "padim")))
    _one_line_error(run_cli("predict", b, image), 2, "'padim' head")


# ------------------------------------------------------------------------ load what was verified
def test_a_model_or_head_swapped_after_the_check_is_never_run(small, tmp_path):
    from edgetl import tasks
    from edgetl.core.bundle import load_bundle
    from edgetl.errors import BundleError
    from edgetl.heads.classification import Head

    bundle, new, _ = small
    b = _copy(bundle, tmp_path)
    image = sorted((new / "brick").glob("*.png"))[0]
    loaded = load_bundle(b)  # every hash checked here ...
    # ... then another valid model is renamed into place before the runtime opens it
    evil = tmp_path / "evil.onnx"
    shutil.copy(b / "model.onnx", evil)
    os.replace(evil, b / "backbone.onnx")
    with pytest.raises(BundleError, match="sha256 does not match"):
        tasks.for_bundle(loaded).predictor(loaded)
    shutil.copy(bundle / "backbone.onnx", b / "backbone.onnx")
    honest = tasks.for_bundle(loaded).predictor(loaded).predict([image])
    # a valid head with other weights, swapped in after the check
    head = Head.load(b / "heads" / "v1.npz")
    evil_head = Head(kind=head.kind, labels=head.labels, arrays={k: -v for k, v in head.arrays.items()}, meta=head.meta)
    evil_head.save(tmp_path / "evil.npz")
    loaded = load_bundle(b)
    os.replace(tmp_path / "evil.npz", b / "heads" / "v1.npz")
    with pytest.raises(BundleError, match="sha256 does not match"):
        tasks.for_bundle(loaded).predictor(loaded)
    # a swap back before use is harmless: the runtime gets exactly the bytes that were checked
    shutil.copy(bundle / "heads" / "v1.npz", b / "heads" / "v1.npz")
    again = tasks.for_bundle(loaded).predictor(loaded).predict([image])
    assert again[0].label == honest[0].label
    # a writer fuses the backbone it checked, never one swapped in after (it would sign the result)
    from edgetl.core.versions import write_fused

    shutil.copy(b / "model.onnx", evil)
    os.replace(evil, b / "backbone.onnx")
    with pytest.raises(BundleError, match="sha256 does not match"):
        write_fused(loaded, 2, head, {})
    assert not list(b.glob("model-v2*")) and not list(b.glob(".staging-*"))


# ---------------------------------------------------------------- signatures: scopes, freshness
@pytest.fixture(scope="module")
def _signed(small, tmp_path_factory):
    """A signed bundle with a second version, a policy (factory: everything; thr: thresholds only)
    and a freshness record of this test's own."""
    _, new, data = small
    tmp_path = tmp_path_factory.mktemp("signed")
    keys = tmp_path / "keys"
    for name in ("factory", "thr"):
        assert run_cli("keygen", name, "--out", keys).returncode == 0
    policy = tmp_path / "trust.toml"
    write_policy(policy, keys, {"factory": ["release", "adapt", "rollback", "threshold"], "thr": ["threshold"]})
    env = {"EDGETL_FRESHNESS": str(tmp_path / "fit-machine.json")}
    b = tmp_path / "signed.bundle"
    r = run_cli(
        "fit",
        data,
        "--out",
        b,
        "--precision",
        "fp32",
        "--runtime",
        "onnxruntime",
        "--sign",
        keys / "factory.key",
        "-q",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    r = run_cli("--trust", policy, "adapt", b, new, "--sign", keys / "factory.key", "-q", env=env)
    assert r.returncode == 0, r.stderr
    return b, keys, ["--trust", str(policy)]


@pytest.fixture
def signed(_signed, tmp_path):
    """A copy of it, and a device record of this test's own."""
    b, keys, trust = _signed
    dst = tmp_path / "signed.bundle"
    shutil.copytree(b, dst)
    return dst, keys, trust, {"EDGETL_FRESHNESS": str(tmp_path / "device-state" / "freshness.json")}


def test_a_threshold_only_key_cannot_roll_back_or_replace_the_app_model(signed, tmp_path):
    b, keys, trust, env = signed
    assert run_cli(*trust, "info", b, env=env).returncode == 0
    r = run_cli(*trust, "rollback", b, "--sign", keys / "thr.key", env=env)
    _one_line_error(r, 5, "may only threshold")
    # the attack: edit what is current by hand, then let a writer without a policy re-sign it with
    # the threshold key (as a threshold change)
    for edit in (
        lambda m: m["head"].__setitem__("current", 1),
        lambda m: m["models"].__setitem__("fused", "evil.onnx"),
    ):
        t = tmp_path / f"attack{id(edit)}.bundle"
        shutil.copytree(b, t)
        if (t / "model-v2.onnx").exists():
            shutil.copy(t / "model-v2.onnx", t / "evil.onnx")  # any model, listed and hashed
        m = json.loads((t / "manifest.json").read_text())
        import hashlib

        blob = (t / "evil.onnx").read_bytes()
        m["files"]["evil.onnx"] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
        edit(m)
        (t / "manifest.json").write_text(json.dumps(m))
        r = run_cli("threshold", t, "0.2", "--sign", keys / "thr.key", env={**env, "EDGETL_TRUST": ""})
        assert r.returncode == 0, r.stderr  # a writer that checks nothing signs what it is given ...
        r = run_cli(*trust, "info", t, env=env)
        _one_line_error(r, 5, "which version and models are current")  # ... and the device refuses it
    # what the threshold key may do, it does
    r = run_cli(*trust, "threshold", b, "0.3", "--sign", keys / "thr.key", env=env)
    assert r.returncode == 0, r.stderr
    r = run_cli(*trust, "info", b, "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["signature"]["signers"]["thresholds"] == "thr"


def test_a_replayed_older_signed_state_is_refused_unless_the_owner_signs_a_rollback(signed, tmp_path):
    b, keys, trust, env = signed
    old = (b / "manifest.json").read_bytes()  # yesterday's signed state (v2 current, serial 2)
    r = run_cli(*trust, "threshold", b, "0.4", "--sign", keys / "factory.key", env=env)
    assert r.returncode == 0, r.stderr
    assert run_cli(*trust, "info", b, env=env).returncode == 0  # the device has seen serial 3
    (b / "manifest.json").write_bytes(old)
    r = run_cli(*trust, "info", b, env=env)
    _one_line_error(r, 5, "older than one this device already accepted")
    r = run_cli(*trust, "predict", b, b / "report.json", env=env)
    assert r.returncode == 5 and "Traceback" not in r.stderr
    # a device without the record (another device) still accepts it: freshness is per device
    owner = {"EDGETL_FRESHNESS": str(tmp_path / "owner-machine.json")}
    assert run_cli(*trust, "info", b, env=owner).returncode == 0
    # a deliberate rollback signed by the owner is a newer state (serial 3, selection 3): accepted
    r = run_cli(*trust, "rollback", b, "--sign", keys / "factory.key", env=owner)
    assert r.returncode == 0, r.stderr
    r = run_cli(*trust, "info", b, "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["head"]["current"] == 1, r.stderr


def test_a_replayed_older_release_is_refused(signed, tmp_path, small):
    b, keys, trust, env = signed
    older = tmp_path / "older.bundle"
    shutil.copytree(b, older)
    _, _, data = small
    r = run_cli(
        "fit",
        data,
        "--out",
        b,
        "--force",
        "--precision",
        "fp32",
        "--runtime",
        "onnxruntime",
        "--sign",
        keys / "factory.key",
        "-q",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert run_cli(*trust, "info", b, env=env).returncode == 0
    shutil.rmtree(b)
    shutil.copytree(older, b)
    _one_line_error(run_cli(*trust, "info", b, env=env), 5, "release is not newer")


# ------------------------------------------------------------------ the lock outlives fit --force
_REPLACER = """
import os, shutil, sys, time
from edgetl.core.lock import writer_lock
bundle, fresh, flag = sys.argv[1:4]
with writer_lock(bundle, operation="replace (test)"):
    open(flag, "w").close()
    time.sleep(3)  # a writer queues behind this lock meanwhile
    os.replace(bundle, bundle + ".aside")  # what fit --force does under the lock
    shutil.copytree(fresh, bundle)
"""


def test_a_writer_queued_across_a_replacement_and_a_new_writer_do_not_both_write(small, tmp_path):
    import subprocess
    import sys
    import time

    from tests.faults.test_faults import CLI, _env, _versions

    bundle, new, _ = small
    b = _copy(bundle, tmp_path)
    flag = tmp_path / "locked"
    replacer = subprocess.Popen([sys.executable, "-c", _REPLACER, str(b), str(bundle), str(flag)], env=_env())
    while not flag.exists():
        assert replacer.poll() is None
        time.sleep(0.05)
    adapt = [*CLI, "adapt", str(b), str(new), "--json", "-q", "--wait", "300"]
    queued = subprocess.Popen(adapt, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    assert replacer.wait(timeout=120) == 0
    arriving = subprocess.Popen(adapt, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in (queued, arriving)]
    assert all(rc == 0 for rc, _, _ in results), results
    assert sorted(json.loads(out)["version"] for _, out, _ in results) == [2, 3]
    assert _versions(b) == [1, 2, 3]  # no lost update
    assert run_cli("info", b).returncode == 0


def test_fit_force_on_a_fifo_manifest_does_not_hang(small, tmp_path):
    import subprocess
    import sys

    _, _, data = small
    b = tmp_path / "fifo.bundle"
    b.mkdir()
    os.mkfifo(b / "manifest.json")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgetl.cli",
            "fit",
            str(data),
            "--out",
            str(b),
            "--force",
            "--precision",
            "fp32",
            "--runtime",
            "onnxruntime",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    _one_line_error(r, 2, "not an edgetl bundle")
    assert (b / "manifest.json").exists()


@pytest.mark.parametrize("plant", ["symlink to a folder", "empty folder", "temp file in a user folder"])
def test_fit_force_never_removes_what_the_user_put_in_a_bundle(small, tmp_path, plant):
    bundle, _, data = small
    b = _copy(bundle, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    planted = {
        "symlink to a folder": b / "photos",
        "empty folder": b / "notes",
        "temp file in a user folder": b / "mine" / ".draft.tmp",
    }[plant]
    if plant == "symlink to a folder":
        planted.symlink_to(outside, target_is_directory=True)
    elif plant == "empty folder":
        planted.mkdir()
    else:
        planted.parent.mkdir()
        planted.write_text("draft")
    r = run_cli("fit", data, "--out", b, "--force", "--precision", "fp32", "--runtime", "onnxruntime", "-q")
    _one_line_error(r, 2, "holds files that are not part of the bundle")
    assert planted.exists() or planted.is_symlink()
    assert (outside / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------- CLI inputs: one line each
def test_odd_environment_and_policy_inputs_get_one_line_errors(small, tmp_path):
    bundle, new, _ = small
    image = sorted((new / "brick").glob("*.png"))[0]
    for name, value in (
        ("EDGETL_THREADS", "abc"),
        ("EDGETL_THREADS", "0"),
        ("EDGETL_MAX_MEGAPIXELS", "nan"),
        ("EDGETL_MAX_MEGAPIXELS", "inf"),
        ("EDGETL_MAX_MEGAPIXELS", "-1"),
    ):
        _one_line_error(run_cli("predict", bundle, image, env={name: value}), 2, name)
    policies = {
        "key = [1]": "key = [1]\n",
        "may not a list": '[[key]]\nname = "a"\npublic_key = "x"\nmay = "adapt"\n',
        "public_key a number": '[[key]]\nname = "a"\npublic_key = 5\nmay = ["adapt"]\n',
    }
    for case, text in policies.items():
        p = tmp_path / f"{len(case)}.toml"
        p.write_text(text)
        _one_line_error(run_cli("--trust", p, "info", bundle), 2, str(p))
    folder = tmp_path / "policy-folder"
    folder.mkdir()
    _one_line_error(run_cli("--trust", folder, "info", bundle), 2, "cannot read the trust policy")


def test_a_folder_where_adapt_writes_its_head_is_one_line_and_changes_nothing(small, tmp_path):
    bundle, new, _ = small
    b = _copy(bundle, tmp_path)
    (b / "heads" / "v2.npz").mkdir()
    before = (b / "manifest.json").read_bytes()
    r = run_cli("adapt", b, new, "-q")
    _one_line_error(r, 2, "v2.npz")
    assert (b / "manifest.json").read_bytes() == before


# ----------------------------------------------------------------------- gates on update paths
def test_defect_adapt_refuses_good_images_of_another_product(defect_bundle, small, tmp_path):
    bundle, data = defect_bundle
    b = _copy(bundle, tmp_path)
    before = (b / "manifest.json").read_bytes()
    _, new, _ = small
    other = tmp_path / "other" / "good"  # twelve images of another product, offered as good
    other.mkdir(parents=True)
    for p in sorted((new / "brick").glob("*.png"))[:6] + sorted((new / "wood").glob("*.png"))[:6]:
        shutil.copy(p, other / f"{p.parent.name}-{p.name}")
    r = run_cli("adapt", b, other.parent, "--json")
    _one_line_error(r, 3, "score as defects under the current model")
    assert (b / "manifest.json").read_bytes() == before
    r = run_cli("adapt", b, other.parent, "--force", "--json", "-q")  # the operator insists: learned
    assert r.returncode == 0 and json.loads(r.stdout)["gate"]["forced"], r.stderr
    # honest new good images of this product pass, and the labelled images kept beside them
    # (DATA/test: good and defective, never learned) show image AUROC not falling beyond noise
    (tmp_path / "honest").mkdir()
    b2 = _copy(bundle, tmp_path / "honest")
    update = tmp_path / "update"
    shutil.copytree(data / "train" / "good", update / "train" / "good")
    shutil.copytree(data / "test", update / "test")
    r = run_cli("adapt", b2, update, "--json", "-q")
    assert r.returncode == 0, r.stderr
    gate = json.loads(r.stdout)["gate"]
    assert gate["reasons"] == [] and gate["image_auroc"]["verdict"] in ("passed", "inconclusive"), gate
    assert gate["image_auroc"]["n"] == len(list((data / "test").rglob("*.png")))


def test_the_new_good_gate_acts_on_evidence_not_on_one_false_alarm():
    from edgetl.core.gate import new_good_gate

    names = [f"img{i}" for i in range(12)]
    assert new_good_gate([2.0] * 12, 1.0, names)["reasons"]  # all twelve score as defects
    assert not new_good_gate([0.5] * 10 + [1.5, 1.2], 1.0, names)["reasons"]  # two false alarms in twelve
    g = new_good_gate([0.5] * 7 + [1.5] * 5, 1.0, names)
    assert g["reasons"] and g["p_value"] < 0.01 and "img7" in g["reasons"][0]


def test_classifier_adapt_needs_evidence_for_a_new_class_and_warns_on_a_duplicate(small, tmp_path):
    bundle, new, _ = small
    b = _copy(bundle, tmp_path)
    one = tmp_path / "one"
    (one / "wood").mkdir(parents=True)
    shutil.copy(sorted((new / "wood").glob("*.png"))[0], one / "wood")
    shutil.copytree(new / "brick", one / "brick")
    r = run_cli("adapt", b, one)
    _one_line_error(r, 3, "new class 'wood' has 1 image(s)")
    dup = tmp_path / "dup"
    shutil.copytree(new / "brick", dup / "bricks")  # the same parts under a new name
    shutil.copytree(new / "grass", dup / "grass")
    r = run_cli("adapt", b, dup, "--json")  # refused (known-class accuracy falls), and the refusal says why
    _one_line_error(r, 3, "look like the known class 'brick'")
    r = run_cli("adapt", b, dup, "--json", "--force")
    assert r.returncode == 0, r.stderr
    assert "warning: new class 'bricks'" in r.stderr and "look like the known class 'brick'" in r.stderr, r.stderr
    assert json.loads(r.stdout)["gate"]["new_classes"]["bricks"]["looks_like"] == "brick"
