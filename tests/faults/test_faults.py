"""Trying to break a bundle, by accident and on purpose: concurrent writers, readers during switches,
kill -9 at random points, hostile manifests, symlinks, full disks, read-only bundles, a fit that
would replace the user's data, a bomb of an image, and tampering under a trust policy.

Small FP32 bundles (ONNX Runtime, no quantization) keep every case to seconds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO, permissions_enforced, run_cli
from tests.faults.conftest import write_policy

CLI = [sys.executable, "-m", "edgetl.cli"]


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


def _copy(bundle: Path, where: Path) -> Path:
    dst = where / "b.bundle"
    shutil.copytree(bundle, dst)
    return dst


def _versions(b: Path) -> list[int]:
    return [e["version"] for e in json.loads((b / "manifest.json").read_text())["head"]["versions"]]


# --------------------------------------------------------------------------------- concurrency
def test_eight_concurrent_adapts_without_wait_give_one_version_and_seven_clear_refusals(small, tmp_path):
    bundle, new, _ = small
    b = _copy(bundle, tmp_path)
    procs = [
        subprocess.Popen(
            [*CLI, "adapt", str(b), str(new), "--json", "-q"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for _ in range(8)
    ]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    accepted = [json.loads(out)["version"] for rc, out, _ in results if rc == 0]
    refused = [err for rc, _, err in results if rc == 4]
    assert len(accepted) + len(refused) == 8, results
    assert len(accepted) >= 1 and all("is writing this bundle" in e and "--wait" in e for e in refused), codes
    # no lost update: every accepted version is in the manifest, with its own files, verified
    run = run_cli("info", b, "--json")
    assert run.returncode == 0, run.stderr
    assert sorted(_versions(b))[1:] == sorted(accepted)


def test_eight_concurrent_adapts_with_wait_give_eight_versions(small, tmp_path):
    bundle, new, _ = small
    b = _copy(bundle, tmp_path)
    procs = [
        subprocess.Popen(
            [*CLI, "adapt", str(b), str(new), "--json", "-q", "--wait", "600"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for _ in range(8)
    ]
    results = [(p.wait(timeout=900), p.stdout.read(), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), [err for _, _, err in results]
    versions = sorted(json.loads(out)["version"] for _, out, _ in results)
    assert versions == list(range(2, 10)) and _versions(b) == list(range(1, 10))
    from edgetl.core.bundle import load_bundle

    loaded = load_bundle(b)
    assert loaded.head_version in versions
    # each version loads as its own run's head (its labels, not another version's)
    from edgetl.device.predict import load_predictor

    for v in (2, 9):
        p = load_predictor(b, head_version=v)
        assert p.head.labels == loaded.head_entry(v)["labels"]


_READER = """
import sys, time
from edgetl.errors import EdgetlError
from edgetl.device.predict import load_predictor
bundle, image, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
failures = 0
for i in range(n):
    try:
        load_predictor(bundle).predict([image])
    except EdgetlError as exc:
        failures += 1
        print("FAIL", exc, file=sys.stderr)
print(failures)
"""


def test_readers_never_fail_while_writers_switch_versions(small, tmp_path):
    bundle, new, _ = small
    b = _copy(bundle, tmp_path)
    image = sorted((new / "brick").glob("*.png"))[0]
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, str(b), str(image), "200"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    writes = 0
    while reader.poll() is None and writes < 12:
        for cmd in (
            ["adapt", str(b), str(new), "-q", "--wait", "60"],
            ["rollback", str(b), "--wait", "60"],
            ["threshold", str(b), "0.3", "--wait", "60"],
        ):
            r = subprocess.run([*CLI, *cmd], capture_output=True, text=True, env=_env())
            assert r.returncode == 0, r.stderr
            writes += 1
    out, err = reader.communicate(timeout=600)
    assert writes >= 3 and out.strip() == "0", err


# ------------------------------------------------------------------------------- kill -9
def _leftovers(b: Path) -> list[str]:
    m = json.loads((b / "manifest.json").read_text())
    listed = set(m["files"]) | {"manifest.json", ".edgetl.lock"}
    return sorted(
        p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file() and p.relative_to(b).as_posix() not in listed
    )


def test_kill_9_at_random_points_of_adapt_leaves_one_whole_version_and_no_leftovers(small, tmp_path):
    bundle, new, _ = small
    b = _copy(bundle, tmp_path)
    rng = random.Random(0)
    from edgetl.core.bundle import load_bundle

    for _trial in range(6):
        before = _versions(b)
        current_before = load_bundle(b).head_version
        p = subprocess.Popen(
            [*CLI, "adapt", str(b), str(new), "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env()
        )
        time.sleep(rng.uniform(0.3, 4.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        loaded = load_bundle(b)  # old or new version current, every file verified
        after = _versions(b)
        assert after in (before, before + [max(before) + 1])
        # the version list and the current pointer switch together, in one manifest rename: a new
        # version in the list is the current one, and without one the current version is unchanged
        expected = max(after) if after != before else current_before
        assert loaded.head_version == expected, (before, after, current_before, loaded.head_version)
        assert json.loads((b / "manifest.json").read_text())["head"]["current"] == expected
    # the next writer clears what the killed ones left (staging files, unlisted version files)
    r = run_cli("adapt", b, new, "-q")
    assert r.returncode == 0, r.stderr
    assert _leftovers(b) == []


def test_kill_9_of_fit_force_keeps_the_old_bundle_and_the_next_fit_clears_the_debris(small, tmp_path):
    bundle, _, data = small
    b = _copy(bundle, tmp_path)
    old = json.loads((b / "manifest.json").read_text())["files"]
    for delay in (0.5, 1.5, 3.0):
        p = subprocess.Popen(
            [
                *CLI,
                "fit",
                str(data),
                "--out",
                str(b),
                "--force",
                "--precision",
                "fp32",
                "--runtime",
                "onnxruntime",
                "--seed",
                "1",
                "-q",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=_env(),
        )
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        run = run_cli("info", b, "--json")
        assert run.returncode == 0, run.stderr  # a whole bundle is there: the old or the new one
    # the writer lock lives beside the bundle (it must outlive the replacement): not debris
    debris = [q for q in tmp_path.iterdir() if q.name.startswith(".b.bundle.") and q.name != ".b.bundle.edgetl.lock"]
    r = run_cli("fit", data, "--out", b, "--force", "--precision", "fp32", "--runtime", "onnxruntime", "-q")
    assert r.returncode == 0, r.stderr
    assert not [
        q for q in tmp_path.iterdir() if q.name.startswith(".b.bundle.") and q.name != ".b.bundle.edgetl.lock"
    ], debris
    assert json.loads((b / "manifest.json").read_text())["files"].keys() == old.keys()


# --------------------------------------------------------------------------- hostile manifests
def _edit(b: Path, fn) -> None:
    m = json.loads((b / "manifest.json").read_text())
    fn(m)
    (b / "manifest.json").write_text(json.dumps(m))


def _rehash(b: Path, rel: str) -> None:
    """What an attacker does after swapping a file: fix its hash in the manifest."""
    import hashlib

    blob = (b / rel).read_bytes()  # through a symlink too
    _edit(b, lambda m: m["files"].__setitem__(rel, {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}))


HOSTILE = {
    "absolute head path": (lambda m: m["head"]["versions"][0].__setitem__("file", "/etc/passwd"), "outside the bundle"),
    "dotdot head path": (
        lambda m: m["head"]["versions"][0].__setitem__("file", "../../outside.npz"),
        "outside the bundle",
    ),
    "backbone not hashed": (
        lambda m: m["models"].__setitem__("backbone", "report2.json"),
        "not among the hashed files",
    ),
    "files entry not an object": (lambda m: m["files"].__setitem__("report.json", "x"), "should be an object"),
    "missing sha256": (lambda m: m["files"]["report.json"].pop("sha256"), "sha256 is missing"),
    "missing labels": (lambda m: m.pop("labels"), "labels is missing"),
    "crop_pct 0": (lambda m: m["backbone"]["preprocess"].__setitem__("crop_pct", 0), "crop_pct"),
    "input_size 100000": (lambda m: m["backbone"]["preprocess"].__setitem__("input_size", 100000), "input_size"),
    "std 0": (lambda m: m["backbone"]["preprocess"].__setitem__("std", [0.0, 0.5, 0.5]), "std"),
    # inside the old type-level ranges, but ruinous in what they do: a 224,000-pixel resize, NaN answers
    "crop_pct 0.001": (lambda m: m["backbone"]["preprocess"].__setitem__("crop_pct", 0.001), "times the model input"),
    "mean 1e308": (lambda m: m["backbone"]["preprocess"].__setitem__("mean", [1e308, 0.5, 0.5]), "pixel statistic"),
    "std 1e-5": (lambda m: m["backbone"]["preprocess"].__setitem__("std", [1e-5, 0.5, 0.5]), "pixel statistic"),
    "current not a version": (lambda m: m["head"].__setitem__("current", 7), "not one of the listed versions"),
    "threshold 7": (lambda m: m["head"]["versions"][0].__setitem__("unknown_threshold", 7), "unknown_threshold"),
    "bytes negative": (lambda m: m["files"]["report.json"].__setitem__("bytes", -1), "bytes"),
    "labels not strings": (lambda m: m.__setitem__("labels", [1, 2]), "labels"),
    "nan threshold": (lambda m: m["thresholds"].__setitem__("unknown", float("nan")), "thresholds.unknown"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_manifest_fields_get_one_line_errors(small, tmp_path, case):
    bundle, _, _ = small
    b = _copy(bundle, tmp_path)
    edit, needle = HOSTILE[case]
    _edit(b, edit)
    for cmd in (["info", str(b)], ["predict", str(b), str(b / "report.json")]):
        r = run_cli(*cmd)
        assert r.returncode == 2, (case, r.stdout)
        assert needle in r.stderr and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_deeply_nested_and_huge_manifests_are_refused(small, tmp_path):
    bundle, _, _ = small
    b = _copy(bundle, tmp_path)
    (b / "manifest.json").write_text('{"format": "edgetl-bundle", "x": ' + "[" * 100000 + "]" * 100000 + "}")
    r = run_cli("info", b)
    assert r.returncode == 2 and "nests deeper" in r.stderr and "Traceback" not in r.stderr
    with open(b / "manifest.json", "w") as f:
        f.write('{"format": "edgetl-bundle", "pad": "' + "x" * (9 << 20) + '"}')
    r = run_cli("info", b)
    assert r.returncode == 2 and "limit" in r.stderr and "Traceback" not in r.stderr


def test_symlinks_inside_a_bundle_are_refused(small, tmp_path):
    bundle, _, _ = small
    b = _copy(bundle, tmp_path)
    outside = tmp_path / "outside"
    shutil.move(b / "heads", outside)
    (b / "heads").symlink_to(outside)  # heads/ as a link to a folder outside the bundle
    r = run_cli("info", b)
    assert r.returncode == 2 and "symlink" in r.stderr
    r = run_cli("adapt", b, small[1], "-q")
    assert r.returncode == 2 and "symlink" in r.stderr
    b2 = tmp_path / "b2"
    shutil.copytree(bundle, b2)
    (b2 / "report.json").unlink()
    (b2 / "report.json").symlink_to("/etc/passwd")
    _rehash(b2, "report.json")  # even with its hash "fixed"
    r = run_cli("info", b2)
    assert r.returncode == 2 and "symlink" in r.stderr


def test_orphans_are_never_adopted_by_a_later_writer(small, tmp_path):
    bundle, _, _ = small
    b = _copy(bundle, tmp_path)
    (b / "heads" / "v7.npz").write_bytes(b"left by a killed adapt")
    r = run_cli("threshold", b, "0.4")
    assert r.returncode == 0, r.stderr
    m = json.loads((b / "manifest.json").read_text())
    assert "heads/v7.npz" not in m["files"] and not (b / "heads" / "v7.npz").exists()


# ----------------------------------------------------------------------- fit --force and data
def test_fit_force_never_replaces_the_data_or_a_folder_that_is_not_a_bundle(small, tmp_path):
    _, _, data = small
    mine = tmp_path / "data"
    shutil.copytree(data, mine)
    (mine / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(mine) for p in mine.rglob("*"))
    for out in (mine, tmp_path):  # the data itself, and a folder that holds it
        r = run_cli("fit", mine, "--out", out, "--force", "--precision", "fp32", "--runtime", "onnxruntime")
        assert r.returncode == 2 and "training data" in r.stderr, r.stderr
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"not mine to delete")
    r = run_cli("fit", mine, "--out", other, "--force", "--precision", "fp32", "--runtime", "onnxruntime")
    assert r.returncode == 2 and "not an edgetl bundle" in r.stderr and (other / "holiday.jpg").exists()
    assert sorted(p.relative_to(mine) for p in mine.rglob("*")) == before


def test_fit_force_keeps_a_user_file_found_inside_a_bundle(small, tmp_path):
    bundle, _, data = small
    b = _copy(bundle, tmp_path)
    (b / "notes.txt").write_text("my notes")
    r = run_cli("fit", data, "--out", b, "--force", "--precision", "fp32", "--runtime", "onnxruntime")
    assert r.returncode == 2 and "notes.txt" in r.stderr and (b / "notes.txt").read_text() == "my notes"


def test_read_only_bundle_and_full_disk_give_one_line(small, tmp_path):
    bundle, new, _ = small
    # A full disk: RLIMIT_FSIZE makes writes fail with EFBIG, for root and everyone else alike.
    b = _copy(bundle, tmp_path)
    before = (b / "manifest.json").read_bytes()

    def limit():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024))

    r = subprocess.run([*CLI, "adapt", str(b), str(new)], capture_output=True, text=True, env=_env(), preexec_fn=limit)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert (b / "manifest.json").read_bytes() == before
    out = tmp_path / "fresh"
    r = subprocess.run(
        [*CLI, "fit", str(small[2]), "--out", str(out), "--precision", "fp32", "--runtime", "onnxruntime", "-q"],
        capture_output=True,
        text=True,
        env=_env(),
        preexec_fn=limit,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert not out.exists() and not [q for q in tmp_path.iterdir() if q.name.startswith(".fresh.")]
    # A read-only bundle in a read-only folder (where its writer lock would go); the child obeys
    # permissions even under root (see permissions_enforced).
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    ro = _copy(bundle, shelf)
    for d in (ro, shelf):
        os.chmod(d, 0o555)
    try:
        r = subprocess.run(
            [*CLI, "adapt", str(ro), str(new)],
            capture_output=True,
            text=True,
            env=_env(),
            preexec_fn=permissions_enforced,
        )
    finally:
        for d in (ro, shelf):
            os.chmod(d, 0o755)
    assert r.returncode == 2 and "not writable" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert (ro / "manifest.json").read_bytes() == before


# ------------------------------------------------------------------------------------ images
def test_a_decompression_bomb_is_refused_before_it_is_decoded(small, tmp_path):
    bundle, _, _ = small
    bomb = tmp_path / "bomb.png"
    Image.new("L", (12000, 12000)).save(bomb)  # 144 megapixels in a small file
    assert bomb.stat().st_size < 1 << 20
    ok = sorted((small[1] / "brick").glob("*.png"))[0]
    r = run_cli("predict", bundle, bomb, ok, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [Path(p["path"]).name for p in out["predictions"]] == [ok.name]
    assert "pixel budget" in out["skipped"][0]["reason"] and "DecompressionBomb" not in r.stderr
    r = run_cli("predict", bundle, bomb, "--strict")
    assert r.returncode == 2 and "pixel budget" in r.stderr and r.stderr.count("\n") == 1


def test_a_newline_in_a_file_name_cannot_forge_an_output_line(small, tmp_path):
    bundle, new, _ = small
    odd = tmp_path / "a\nforged\tline.png"
    shutil.copy(sorted((new / "brick").glob("*.png"))[0], odd)
    r = run_cli("predict", bundle, odd)
    assert r.returncode == 0 and r.stdout.strip().count("\n") == 0 and "\\n" in r.stdout


def test_out_of_range_options_are_refused(small, tmp_path):
    bundle, new, _ = small
    for args, needle in (
        (["adapt", bundle, new, "--tolerance", "nan"], "--tolerance"),
        (["predict", bundle, new, "--threshold", "7"], "between 0 and 1"),
        (["threshold", bundle, "7"], "between 0 and 1"),
    ):
        r = run_cli(*args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


# ----------------------------------------------------------------------------------- signing
def test_a_tampered_rehashed_bundle_is_refused_by_a_device_that_trusts_a_key(small, tmp_path):
    _, new, data = small
    keys = tmp_path / "keys"
    for name in ("factory", "line3"):
        assert run_cli("keygen", name, "--out", keys).returncode == 0
    assert oct((keys / "factory.key").stat().st_mode & 0o777) == "0o600"
    b = tmp_path / "signed.bundle"
    r = run_cli(
        "fit", data, "--out", b, "--precision", "fp32", "--runtime", "onnxruntime", "--sign", keys / "factory.key", "-q"
    )
    assert r.returncode == 0, r.stderr
    policy = tmp_path / "trust.toml"
    write_policy(
        policy,
        keys,
        {"factory": ["release", "adapt", "rollback", "threshold"], "line3": ["adapt", "rollback", "threshold"]},
    )
    trust = ["--trust", str(policy)]
    ok = run_cli(*trust, "info", b, "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["signature"]["signers"]["release"] == "factory"
    # the device adapts with its own key: accepted, and signed by it
    r = run_cli(*trust, "adapt", b, new, "--sign", keys / "line3.key", "--json", "-q")
    assert r.returncode == 0, r.stderr
    info = json.loads(run_cli(*trust, "info", b, "--json").stdout)["signature"]["signers"]
    assert info["versions"] == {"2": "line3"} or info["versions"] == {2: "line3"}
    # without a key a trusting device refuses to change the bundle (nothing written)
    r = run_cli(*trust, "threshold", b, "0.5")
    assert r.returncode == 5 and "needs a key" in r.stderr
    # tampering: a swapped report with its hash fixed in the manifest
    t = tmp_path / "tampered.bundle"
    shutil.copytree(b, t)
    (t / "report.json").write_text("{}")
    _rehash(t, "report.json")
    assert run_cli("info", t).returncode == 0  # integrity alone cannot tell
    r = run_cli(*trust, "info", t)
    assert r.returncode == 5 and "not the file the release signed" in r.stderr, r.stderr
    # a head version swapped and re-hashed, and a state edited by hand: refused too
    for rel, edit, needle in (
        ("heads/v2.npz", None, "head version 2's signature"),
        # thresholds are their own signed statement (a threshold key may sign them)
        (None, lambda m: m["thresholds"].__setitem__("unknown", 0.99), "thresholds statement"),
    ):
        t = tmp_path / f"tampered-{needle[:4]}.bundle"
        shutil.copytree(b, t)
        if rel:
            shutil.copy(t / "heads" / "v1.npz", t / rel)
            _rehash(t, rel)
        else:
            _edit(t, edit)
        r = run_cli(*trust, "info", t)
        assert r.returncode == 5 and needle in r.stderr, r.stderr
    # a device key may not release a bundle
    d = tmp_path / "device-made.bundle"
    assert (
        run_cli(
            "fit",
            data,
            "--out",
            d,
            "--precision",
            "fp32",
            "--runtime",
            "onnxruntime",
            "--sign",
            keys / "line3.key",
            "-q",
        ).returncode
        == 0
    )
    r = run_cli(*trust, "predict", d, sorted((new / "brick").glob("*.png"))[0])
    assert r.returncode == 5 and "may only" in r.stderr
    # an unsigned bundle is refused by a trusting device, accepted by others
    u = tmp_path / "unsigned.bundle"
    assert run_cli("fit", data, "--out", u, "--precision", "fp32", "--runtime", "onnxruntime", "-q").returncode == 0
    r = run_cli(*trust, "info", u)
    assert r.returncode == 5 and "not signed" in r.stderr
    r = run_cli("info", u, env={"EDGETL_TRUST": ""})
    assert r.returncode == 0


# ------------------------------------------------------------------------------- adapt's gate
def test_the_adapt_gate_refuses_consistently_swapped_labels(small, tmp_path):
    bundle, _, _ = small
    b = _copy(bundle, tmp_path)
    swapped = tmp_path / "swapped"
    src = small[1]
    shutil.copytree(src / "brick", swapped / "grass")  # brick images labelled grass
    shutil.copytree(src / "grass", swapped / "brick")  # and the other way round
    r = run_cli("adapt", b, swapped, "--json")
    assert r.returncode == 3 and "look like 'brick'" in r.stderr and "swapped" in r.stderr, r.stderr
    assert _versions(b) == [1]
    # honest new data of the same classes passes
    honest = tmp_path / "honest"
    shutil.copytree(src / "brick", honest / "brick")
    shutil.copytree(src / "grass", honest / "grass")
    assert run_cli("adapt", b, honest, "-q").returncode == 0
