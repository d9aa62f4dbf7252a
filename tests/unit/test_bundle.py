"""Bundle format: atomic writes, hash verification, and refusal of foreign or damaged bundles."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from edgetl.core.bundle import FORMAT_VERSION, BundleWriter, load_bundle
from edgetl.core.lock import lock_path
from edgetl.errors import BundleError
from tests.conftest import minimal_manifest


def _write(out, payload=b"weights", force=False):
    with BundleWriter(out, force=force) as w:
        (w.dir / "backbone.onnx").write_bytes(payload)
        (w.dir / "heads").mkdir()
        (w.dir / "heads" / "v1.npz").write_bytes(b"head")
        return w.commit(minimal_manifest())


def test_roundtrip_records_every_file(tmp_path):
    b = _write(tmp_path / "b")
    loaded = load_bundle(tmp_path / "b")
    assert set(loaded.manifest["files"]) == {"backbone.onnx", "heads/v1.npz"}
    assert loaded.manifest["format_version"] == FORMAT_VERSION and b.labels == ["a", "b"]
    # no staging left behind; the writer lock beside the bundle stays (it keeps one identity across replacements)
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] in ([], [lock_path(tmp_path / "b")])


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda d: (d / "backbone.onnx").write_bytes(b"weightz"), "sha256 does not match"),
        (lambda d: (d / "backbone.onnx").write_bytes(b"wei"), "truncated"),
        (lambda d: (d / "heads" / "v1.npz").unlink(), "missing"),
        (lambda d: (d / "manifest.json").write_text("{"), "unreadable manifest"),
        (lambda d: (d / "manifest.json").write_text(json.dumps({"format": "other"})), "not an edgetl bundle"),
    ],
)
def test_damaged_bundles_are_refused(tmp_path, damage, needle):
    _write(tmp_path / "b")
    damage(tmp_path / "b")
    with pytest.raises(BundleError, match=needle):
        load_bundle(tmp_path / "b")


def test_other_format_version_is_refused(tmp_path):
    _write(tmp_path / "b")
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    m["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format version"):
        load_bundle(tmp_path / "b")


def test_pickles_are_not_allowed(tmp_path):
    with pytest.raises(BundleError, match="pickle"):
        with BundleWriter(tmp_path / "b") as w:
            (w.dir / "head.pkl").write_bytes(b"x")
            w.commit(minimal_manifest())
    assert not (tmp_path / "b").exists()


def test_refuses_to_overwrite_without_force(tmp_path):
    _write(tmp_path / "b")
    with pytest.raises(BundleError, match="--force"):
        _write(tmp_path / "b", payload=b"new")
    _write(tmp_path / "b", payload=b"new", force=True)
    assert (tmp_path / "b" / "backbone.onnx").read_bytes() == b"new"


_SLOW_WRITER = """
import sys, time
from edgetl.core.bundle import BundleWriter
from tests.conftest import minimal_manifest
with BundleWriter(sys.argv[1], force=True) as w:
    (w.dir / "heads").mkdir()
    (w.dir / "heads" / "v1.npz").write_bytes(b"head")
    with open(w.dir / "backbone.onnx", "wb") as f:
        for _ in range(2000):
            f.write(b"x" * 65536); f.flush()
            print("writing", flush=True); time.sleep(0.01)
    w.commit(minimal_manifest())
"""


def test_killed_mid_write_leaves_old_bundle_intact(tmp_path):
    old = _write(tmp_path / "b", payload=b"old")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(tmp_path / "b")], stdout=subprocess.PIPE)
    proc.stdout.readline()  # it has started writing
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    again = load_bundle(tmp_path / "b")  # still the whole old bundle, verified
    assert (tmp_path / "b" / "backbone.onnx").read_bytes() == b"old"
    assert again.manifest["files"] == old.manifest["files"]
    fresh = tmp_path / "new"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(fresh)], stdout=subprocess.PIPE)
    proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not fresh.exists()  # never a half bundle at the destination


def _outlive_the_writer(started, seconds: float) -> None:
    started.set()  # the fork's handlers have run by now
    time.sleep(seconds)


def test_a_forked_child_does_not_keep_the_writer_lock(tmp_path):
    """A child forked while the lock is held (OpenVINO's telemetry sends from one, and waits on the
    network) must not hold the bundle after the writer lets go: the same process writes again at once."""
    import multiprocessing

    from edgetl.core.lock import writer_lock
    from edgetl.errors import BundleBusy

    bundle = tmp_path / "b.bundle"
    bundle.mkdir()
    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    with writer_lock(bundle, operation="adapt"):
        child = ctx.Process(target=_outlive_the_writer, args=(started, 30.0), daemon=True)
        child.start()
        assert started.wait(30)
    try:
        assert child.is_alive()
        with writer_lock(bundle, operation="rollback"):  # wait=0: refused at once if the child held it
            pass
    except BundleBusy as exc:
        pytest.fail(f"the forked child kept the lock: {exc}")
    finally:
        child.terminate()
        child.join()
