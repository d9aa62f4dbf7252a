"""The CLI end to end, in subprocesses, as a user types it."""

from __future__ import annotations

import json

import pytest

from tests.conftest import make_folder, run_cli

COMMANDS = [
    "fit",
    "eval",
    "predict",
    "export",
    "targets",
    "example",
    "info",
    "adapt",
    "rollback",
    "history",
    "bench",
    "threshold",
    "rank",
    "drift",
    "keygen",
    "fleet",
    "report",
    "serve",
]


def test_every_help_runs():
    r = run_cli("--help")
    assert r.returncode == 0 and "Usage" in r.stdout
    listed = r.stdout.split("Commands:")[1]
    for cmd in COMMANDS:
        assert cmd in listed, f"{cmd} missing from edgetl --help"
        h = run_cli(cmd, "--help")
        assert h.returncode == 0 and "Usage" in h.stdout, h.stderr


@pytest.fixture(scope="module")
def fp32_bundle(surfaces, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "fp32.bundle"
    r = run_cli("fit", surfaces, "--out", out, "-t", "cpu-x86", "--precision", "fp32", "--json")
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


def test_fit_json_is_one_object_and_learns(fp32_bundle, surfaces):
    out, summary = fp32_bundle
    assert (out / "manifest.json").is_file()
    n_classes = len(summary["labels"])
    assert summary["val"]["accuracy"] > 3 / n_classes  # far above chance (1/n)
    assert set(summary["val"]["per_class_recall"]) == set(summary["labels"])
    assert len(summary["val"]["confusion_matrix"]) == n_classes


def test_second_fit_with_new_head_runs_no_backbone(fp32_bundle, surfaces, tmp_path):
    r = run_cli(
        "fit",
        surfaces,
        "--out",
        tmp_path / "mlp.bundle",
        "-t",
        "cpu-x86",
        "--precision",
        "fp32",
        "--head",
        "mlp",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["timings_s"]["backbone_images"] == 0


def test_fit_refuses_to_overwrite(fp32_bundle, surfaces):
    out, _ = fp32_bundle
    before = (out / "manifest.json").read_bytes()
    r = run_cli("fit", surfaces, "--out", out, "-t", "cpu-x86", "--precision", "fp32")
    assert r.returncode == 2 and "--force" in r.stderr and "Traceback" not in r.stderr
    assert (out / "manifest.json").read_bytes() == before


def test_eval_and_predict(fp32_bundle, surfaces):
    out, summary = fp32_bundle
    r = run_cli("eval", out, surfaces / "val", "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["accuracy"] == pytest.approx(summary["val"]["accuracy"], abs=1e-4)
    r = run_cli("predict", out, surfaces / "val", "--top-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    preds = json.loads(r.stdout)["predictions"]
    assert len(preds) == m["n"] and all(len(p["top_k"]) == 2 for p in preds)
    assert all(p["label"] in summary["labels"] for p in preds)
    text = run_cli("eval", out, surfaces / "val")
    assert "confusion matrix" in text.stdout and "recall" in text.stdout


def test_threshold_turns_low_confidence_into_unknown(fp32_bundle, surfaces, tmp_path):
    import shutil

    b = tmp_path / "t.bundle"
    shutil.copytree(fp32_bundle[0], b)
    assert run_cli("threshold", b, "1.0").returncode == 0
    preds = json.loads(run_cli("predict", b, surfaces / "val", "--json").stdout)["predictions"]
    assert preds and all(p["label"] == "unknown" and p["unknown"] for p in preds)
    assert run_cli("threshold", b, "0").returncode == 0
    preds = json.loads(run_cli("predict", b, surfaces / "val", "--json").stdout)["predictions"]
    assert not any(p["unknown"] for p in preds)
    assert run_cli("threshold", b, "1.5").returncode == 2  # out of range: a usage error


def test_info_verifies(fp32_bundle):
    out, _ = fp32_bundle
    r = run_cli("info", out, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["verified"] is True


@pytest.mark.parametrize(
    "args, needle",
    [
        (["fit", "/nonexistent/data", "--out", "{tmp}/b"], "no such file or folder"),
        (["fit", "{single}", "--out", "{tmp}/b"], "at least 2"),
        (["fit", "{single}", "--out", "{tmp}/b", "--target", "cpu-x68"], "unknown target"),
        (["fit", "{single}", "--out", "{tmp}/b", "--backbone", "resnet5O"], "did you mean"),
        (["fit", "{tmp}", "--out", "{tmp}/b"], "inside the training data"),
        (["fit", "{single}", "--out", "{single}", "--force"], "inside the training data"),
        (["predict", "{tmp}/nothing.bundle", "x.jpg"], "no such bundle"),
        (["eval", "{tmp}", "{tmp}"], "not an edgetl bundle"),
    ],
)
def test_user_mistakes_get_one_line_errors(tmp_path, args, needle):
    make_folder(tmp_path / "single", classes=("only",))
    args = [a.format(tmp=tmp_path, single=tmp_path / "single") for a in args]
    r = run_cli(*args)
    assert r.returncode != 0
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "b").exists()


def test_targets_lists_every_profile():
    r = run_cli("targets", "--json")
    names = {t["name"] for t in json.loads(r.stdout)["targets"]}
    assert {"cpu-x86", "cpu-arm64", "jetson-orin", "intel-npu"} <= names
