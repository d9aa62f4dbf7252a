"""On-device adaptation, run as the device runs it: a subprocess where torch cannot be imported."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from tests.conftest import permissions_enforced, run_cli

HELD_OUT_CLASS = "wood"


@pytest.fixture(scope="module")
def base(surfaces, cache_dir, tmp_path_factory):
    """A bundle fitted on every surface class except one, and a folder of new data for it."""
    root = tmp_path_factory.mktemp("adapt")
    fit_data = root / "fit"
    for split in ("train", "val"):
        for cdir in (surfaces / split).iterdir():
            if cdir.name != HELD_OUT_CLASS:
                shutil.copytree(cdir, fit_data / split / cdir.name)
    bundle = root / "base.bundle"
    r = run_cli("fit", fit_data, "--out", bundle, "--calibration-size", "64", "--allow-drop", "--json")
    assert r.returncode == 0, r.stderr
    new = root / "new"
    shutil.copytree(surfaces / "train" / HELD_OUT_CLASS, new / HELD_OUT_CLASS)
    for cdir in (surfaces / "train").iterdir():  # a few darker images of known classes (drift)
        if cdir.name != HELD_OUT_CLASS:
            for p in sorted(cdir.glob("*.png"))[:4]:
                (new / cdir.name).mkdir(parents=True, exist_ok=True)
                ImageEnhance.Brightness(Image.open(p)).enhance(0.6).save(new / cdir.name / p.name)
    return bundle, new, json.loads(r.stdout)


def _copy(bundle, tmp_path):
    dst = tmp_path / "b.bundle"
    shutil.copytree(bundle, dst)
    return dst


def _predict(bundle, paths, env):
    r = run_cli("predict", bundle, *paths, "--top-k", "3", "--json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["predictions"]


def test_adapt_adds_a_class_keeps_old_ones_and_rolls_back(base, surfaces, tmp_path, no_torch_env):
    bundle, new, fitted = base
    b = _copy(bundle, tmp_path)
    known_val = [p for c in fitted["labels"] for p in sorted((surfaces / "val" / c).glob("*.png"))]
    before = _predict(b, known_val, no_torch_env)
    acc_before = np.mean([p["label"] == os.path.basename(os.path.dirname(p["path"])) for p in before])

    r = run_cli("adapt", b, new, "--json", env=no_torch_env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["version"] == 2 and out["new_classes"] == [HELD_OUT_CLASS] and out["gate"]["passed"]

    new_val = sorted((surfaces / "val" / HELD_OUT_CLASS).glob("*.png"))
    got = _predict(b, new_val, no_torch_env)
    assert np.mean([p["label"] == HELD_OUT_CLASS for p in got]) >= 0.8
    after = _predict(b, known_val, no_torch_env)
    acc_after = np.mean([p["label"] == os.path.basename(os.path.dirname(p["path"])) for p in after])
    assert acc_after >= acc_before - 0.05  # replay keeps the old classes

    r = run_cli("rollback", b, env=no_torch_env)
    assert r.returncode == 0, r.stderr
    assert _predict(b, known_val, no_torch_env) == before  # bit-identical: same head file, same runtime
    hist = json.loads(run_cli("history", b, "--json", env=no_torch_env).stdout)["versions"]
    assert [(v["version"], v["current"]) for v in hist] == [(1, True), (2, False)]
    assert run_cli("rollback", b, "--to", "2", env=no_torch_env).returncode == 0
    assert run_cli("info", b, env=no_torch_env).returncode == 0  # every file still verifies


@pytest.mark.parametrize("point", ["before-switch", "after-switch"])
def test_crash_leaves_one_whole_version_current(base, tmp_path, no_torch_env, point):
    bundle, new, _ = base
    b = _copy(bundle, tmp_path)
    r = run_cli("adapt", b, new, env={**no_torch_env, "EDGETL_FAULT": point})
    assert r.returncode == 70  # the injected power cut
    info = run_cli("info", b, "--json", env=no_torch_env)
    assert info.returncode == 0, info.stderr  # the bundle verifies either way
    current = json.loads(info.stdout)["head"]["current"]
    assert current == (1 if point == "before-switch" else 2)


def test_gate_refuses_shuffled_labels(base, tmp_path, no_torch_env, surfaces):
    bundle, _, fitted = base
    b = _copy(bundle, tmp_path)
    before = (b / "manifest.json").read_bytes()
    poisoned = tmp_path / "poison"
    files = [p for c in fitted["labels"] for p in sorted((surfaces / "train" / c).glob("*.png"))]
    labels = [p.parent.name for p in files]
    rng = np.random.default_rng(0)
    for p, lbl in zip(files, rng.permutation(labels)):
        (poisoned / lbl).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, poisoned / lbl / f"{p.parent.name}-{p.name}")
    r = run_cli("adapt", b, poisoned, env=no_torch_env)
    assert r.returncode == 3 and "update refused" in r.stderr and "Traceback" not in r.stderr
    assert (b / "manifest.json").read_bytes() == before


def test_bad_inputs_leave_the_head_current(base, tmp_path, no_torch_env):
    bundle, new, _ = base
    b = _copy(bundle, tmp_path)
    before = (b / "manifest.json").read_bytes()
    empty = tmp_path / "empty" / "x"
    empty.mkdir(parents=True)
    (empty / "bad.jpg").write_bytes(b"not an image")
    r = run_cli("adapt", b, tmp_path / "empty", env=no_torch_env)
    assert r.returncode == 2 and "no usable" in r.stderr
    assert (b / "manifest.json").read_bytes() == before
    m = json.loads(before)
    m["format_version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    r = run_cli("adapt", b, new, env=no_torch_env)
    assert r.returncode == 2 and "format version" in r.stderr and "Traceback" not in r.stderr
    assert json.loads((b / "manifest.json").read_text()) == m  # a bundle from a newer edgetl is left alone


@pytest.mark.parametrize("read_only", ["bundle and its folder", "bundle"])
def test_a_read_only_bundle_is_refused_in_one_line(base, tmp_path, no_torch_env, read_only):
    """The writer lock lives beside the bundle, so a read-only folder holding it is refused before
    anything is read; a read-only bundle in a writable folder fails at its first write. Either way:
    one line, exit 2, nothing changed. The child runs without root's permission override, so this
    holds for root runners too."""
    bundle, new, _ = base
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    b = _copy(bundle, shelf)
    before = {p.relative_to(b): p.read_bytes() for p in b.rglob("*") if p.is_file()}
    locked = [b, shelf] if read_only == "bundle and its folder" else [b, b / "heads"]
    for d in locked:
        os.chmod(d, 0o555)
    try:
        r = run_cli("adapt", b, new, env=no_torch_env, preexec_fn=permissions_enforced)
    finally:
        for d in locked:
            os.chmod(d, 0o755)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    if read_only == "bundle and its folder":
        assert "not writable" in r.stderr, r.stderr
    assert {p.relative_to(b): p.read_bytes() for p in b.rglob("*") if p.is_file()} == before


def _limit_file_size():
    """In the child: files may not grow past 64 KB (writes then fail with EFBIG, as on a full disk)."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_full_disk_while_writing_keeps_the_old_head(base, tmp_path, no_torch_env):
    """The new head writes, then the fused model (MBs) cannot: one line, exit 2, v1 still current and
    whole. RLIMIT_FSIZE stands in for a full disk because it works for root too (chmod does not)."""
    import subprocess
    import sys

    from edgetl.core.bundle import load_bundle

    bundle, new, _ = base
    b = _copy(bundle, tmp_path)
    before = (b / "manifest.json").read_bytes()
    files = sorted(p.relative_to(b) for p in b.rglob("*"))
    r = subprocess.run(
        [sys.executable, "-m", "edgetl.cli", "adapt", str(b), str(new)],
        capture_output=True,
        text=True,
        env={**os.environ, **no_torch_env},
        preexec_fn=_limit_file_size,
        timeout=600,
    )
    assert r.returncode == 2, r.stderr
    assert "cannot write the new head" in r.stderr and "stays current" in r.stderr and "Traceback" not in r.stderr
    assert (b / "manifest.json").read_bytes() == before
    loaded = load_bundle(b)  # every file the manifest names is present and hashes right
    assert loaded.head_version == 1
    # nothing half-written is left behind (the writer lock's own file stays: it holds no data)
    assert sorted(p.relative_to(b) for p in b.rglob("*") if p.name != ".edgetl.lock") == files
