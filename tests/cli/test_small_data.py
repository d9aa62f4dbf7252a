"""The gate end to end: a genuinely broken conversion is refused (exit 3) with its interval, and
nothing is written; overrides of any profile compose."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import run_cli


def test_a_broken_conversion_is_refused_with_exit_3(surfaces, exported, cache_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import edgetl.tasks.classify.task as fitmod
    from edgetl.cli import main

    # A cache of its own (with the FP32 export copied in): the corrupted INT8 model must never be
    # served to another test under the honest model's key.
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir / "backbones", cache / "backbones")
    real = fitmod.calibration_inputs
    # Calibration on images scaled to 2 % of their contrast: every activation range is far too
    # narrow, so real images clip everywhere (what a wrong preprocessing or a blank calibration
    # set does to a user's model).
    monkeypatch.setattr(fitmod, "calibration_inputs", lambda plan, pre: real(plan, pre) * 0.02)
    r = CliRunner().invoke(
        main,
        ["fit", str(surfaces), "--out", str(tmp_path / "b"), "--target", "cpu-x86", "--cache", str(cache), "--quiet"],
    )
    assert r.exit_code == 3, r.output
    assert "loses" in r.stderr and "95% bounds [" in r.stderr and "--allow-drop" in r.stderr
    assert not (tmp_path / "b").exists()


def test_overrides_compose_on_the_default_profile(surfaces, cache_dir, tmp_path):
    r = run_cli("fit", surfaces, "--out", tmp_path / "b", "--precision", "fp32", "--runtime", "onnxruntime", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["precision"], out["runtime"]) == ("fp32", "onnxruntime")
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert any("accuracy_control" in note for note in report["target_adjusted"])


@pytest.mark.parametrize(
    "args, profile",
    [
        (("--target", "cpu-x86", "--runtime", "openvino"), "openvino-cpu"),
        (("--target", "jetson-orin", "--runtime", "openvino"), "openvino-cpu"),
    ],
)
def test_overrides_that_need_another_profile_say_which(surfaces, tmp_path, args, profile):
    r = run_cli("fit", surfaces, "--out", tmp_path / "b", *args)
    assert r.returncode == 2 and profile in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def near_copies(tmp_path_factory):
    from tests.conftest import make_grouped_crops

    return make_grouped_crops(tmp_path_factory.mktemp("frames") / "parts", groups=4, per_group=6)


def test_random_split_of_near_copies_is_flagged(near_copies, cache_dir, tmp_path):
    r = run_cli("fit", near_copies, "--out", tmp_path / "b", "--group-by", "none", "--target", "cpu-x86", "--json")
    assert r.returncode == 0, r.stderr
    assert "near-copy in training" in r.stderr and "--group-by" in r.stderr
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["split"]["method"] == "out-of-fold" and report["crossfit"]["method"] == "stratified 5-fold"
    assert report["leakage"]["warn"] and report["leakage"]["fraction"] >= 0.5 and report["leakage"]["folds"]


def test_grouped_folds_hold_out_whole_parts(near_copies, cache_dir, tmp_path):
    r = run_cli("fit", near_copies, "--out", tmp_path / "b", "--target", "cpu-x86", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["split"]["method"] == "out-of-fold" and report["crossfit"]["method"].startswith("grouped")
    assert report["leakage"]["fraction"] < 0.25  # whole parts held out of each fold: few near-copies left
    assert not report["leakage"]["warn"] and "near-copy" not in r.stderr
    # every frame is scored out of fold (its whole part held out with it), not a fifth of them
    summary = json.loads(r.stdout)
    assert summary["val"]["n"] == sum(c["train"] for c in summary["counts"].values())
    assert summary["val"]["estimate"] == "out-of-fold"


def test_quiet_means_quiet_even_while_converting(surfaces, exported, cache_dir, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(cache_dir / "backbones", cache / "backbones")  # the export cached, nothing else
    r = run_cli("fit", surfaces, "--out", tmp_path / "b", "--quiet", "--json", "--cache", cache)
    assert r.returncode == 0 and r.stderr == "", r.stderr  # no NNCF bars, no torch notice, no warning
    assert json.loads(r.stdout)["gate"]["verdict"] in ("passed", "inconclusive")
    shutil.copytree(cache_dir / "backbones", tmp_path / "cache2" / "backbones")
    loud = run_cli("fit", surfaces, "--out", tmp_path / "b2", "--cache", tmp_path / "cache2")
    assert loud.returncode == 0, loud.stderr
    assert "converting the backbone to int8 for openvino-cpu" in loud.stderr


def test_train_and_test_folders_fit_as_training_and_holdout(surfaces, cache_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(surfaces / "train", data / "train")
    shutil.copytree(surfaces / "val", data / "test")
    r = run_cli("fit", data, "--out", tmp_path / "b", "--target", "cpu-x86", "--precision", "fp32", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert "train" not in summary["labels"] and "test" not in summary["labels"]
    assert sorted(summary["labels"]) == sorted(p.name for p in (surfaces / "train").iterdir() if p.is_dir())
    assert summary["val"]["estimate"] == "holdout" and summary["val"]["oof"]["estimate"] == "out-of-fold"
    assert summary["val"]["n"] == sum(c["val"] for c in summary["counts"].values()) > 0


def test_one_image_a_class_fits_and_says_nothing_measures_it(surfaces, cache_dir, tmp_path):
    data = tmp_path / "one"
    for cls in sorted(p for p in (surfaces / "train").iterdir() if p.is_dir()):
        (data / cls.name).mkdir(parents=True)
        first = sorted(cls.iterdir())[0]
        shutil.copyfile(first, data / cls.name / first.name)
    r = run_cli("fit", data, "--out", tmp_path / "b", "--target", "cpu-x86", "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    assert "no item can be held out" in r.stdout and "nothing measures this head" in r.stdout
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["head"]["versions"][0]["kind"] == "prototype"  # a class mean is all one image gives
    r = run_cli("predict", tmp_path / "b", surfaces / "val", "--json")
    assert r.returncode == 0, r.stderr
