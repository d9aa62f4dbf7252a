"""What a new user meets first: keys and their policy entries, hints on mistyped arguments,
messages that say what a number measures."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.conftest import run_cli

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _normalised(text: str) -> str:
    # the key bytes and key id differ on every run; everything else is what the user sees
    text = re.sub(r"edgetl-ed25519 \S+ ", "edgetl-ed25519 KEY ", text)
    return re.sub(r"key id [0-9a-f]{16}", "key id ID", text)


def test_keygen_device_key_is_trusted_for_device_operations_only(tmp_path):
    from edgetl.core.signing import DEVICE_OPERATIONS, load_trust

    r = run_cli("keygen", "line3", "--device", "--out", tmp_path, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["may"] == list(DEVICE_OPERATIONS)
    (tmp_path / "policy.toml").write_text(out["policy"] + "\n")
    (key,) = load_trust(tmp_path / "policy.toml").keys
    assert key.name == "line3" and key.may == frozenset(DEVICE_OPERATIONS) and key.key_id == out["key_id"]
    r = run_cli("keygen", "x", "--out", tmp_path, "--may", "adapt", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["may"] == ["adapt"]
    r = run_cli("keygen", "y", "--out", tmp_path, "--device", "--may", "adapt")
    assert r.returncode == 2 and "give one of them" in r.stderr


def test_security_doc_shows_exactly_what_keygen_prints(tmp_path):
    doc = (DOCS / "SECURITY.md").read_text()
    block = re.search(r"```console\n(\$ edgetl keygen factory\n.*?)```", doc, re.S).group(1)
    printed = []
    for args in (["factory"], ["line3", "--device"]):
        r = run_cli("keygen", *args, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        printed.append(f"$ edgetl keygen {' '.join(args)}\n{r.stdout}")
    assert _normalised("".join(printed)) == _normalised(block)


def test_fp32_openvino_bundle_gate_is_not_applicable_and_its_report_lists_model_bin(surfaces, cache_dir, tmp_path):
    out = tmp_path / "ov.bundle"
    r = run_cli("fit", surfaces, "--out", out, "-t", "openvino-cpu", "--precision", "fp32", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    # FP32 against the FP32 reference: no quantization, so no verdict about one
    gate = json.loads(r.stdout)["gate"]
    import numpy as np

    stack = json.loads((out / "report.json").read_text())["numerics"]["stack"]
    assert set(stack) == {"onnxruntime", "openvino", "nncf", "numpy", "torch", "timm"}
    assert stack["numpy"] == np.__version__
    assert gate["verdict"] == "not applicable" and gate["passed"] and "no quantization" in gate["method"]
    r = run_cli("report", out, "--out", tmp_path / "r.html", "--quiet")
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "r.html").read_text()
    assert "needs only <code>model.xml</code> + <code>model.bin</code>" in page
    assert 'data-key="gate">not applicable<' in page and "no quantization to check" in page


def test_rank_for_an_int8_target_judges_the_budget_on_the_int8_model(surfaces, cache_dir):
    r = run_cli("rank", surfaces, "--backbones", "efficientnet_lite0", "-t", "cpu-x86", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "INT8 onnxruntime (what cpu-x86 ships)" in out["latency"]
    assert out["budget_ms"] == 20.0 and "(latency: batch-1 INT8" in out["reason"]
    assert "rank:" not in r.stderr
    plain = run_cli("rank", surfaces, "--backbones", "efficientnet_lite0", "--json")
    assert json.loads(plain.stdout)["latency"] == "batch-1 FP32 onnxruntime on this machine"
    assert "rank:" not in plain.stderr  # --json is quiet on stderr too
    # for people: a line per candidate and one for the scoring, on stderr, as it goes
    shown = run_cli("rank", surfaces, "--backbones", "efficientnet_lite0")
    assert shown.returncode == 0 and "CV accuracy" in shown.stdout
    assert "rank: efficientnet_lite0 (1 of 1)" in shown.stderr and "rank: scoring 1 backbone(s)" in shown.stderr
    assert "rank:" not in run_cli("rank", surfaces, "--backbones", "efficientnet_lite0", "-q").stderr


def test_a_text_argument_that_names_a_file_gets_a_hint_to_use_file(tmp_path):
    import io
    import logging

    from edgetl.tasks.text.task import TextTask

    (tmp_path / "q.txt").write_text("the pump leaks\n")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("edgetl")
    log.addHandler(handler)
    try:
        got = TextTask().gather_inputs([str(tmp_path / "q.txt")], stdin=io.StringIO())
        plain = TextTask().gather_inputs(["the pump leaks"], stdin=io.StringIO())
    finally:
        log.removeHandler(handler)
    assert got == [str(tmp_path / "q.txt")] and plain == ["the pump leaks"]
    assert len(seen) == 1 and f"--file {tmp_path / 'q.txt'}" in seen[0]


def test_fleet_join_spells_the_writer_wait_as_wait_and_still_takes_lock_wait(tmp_path):
    h = run_cli("fleet", "join", "--help")
    assert h.returncode == 0 and "--wait" in h.stdout and "--lock-wait" not in h.stdout
    for spelling in ("--wait", "--lock-wait"):
        r = run_cli(
            "fleet", "join", tmp_path / "none", tmp_path, "--superlink", "127.0.0.1:1", "--insecure", spelling, "3"
        )
        assert r.returncode == 2 and "no such bundle" in r.stderr, r.stderr  # parsed: the bundle is the problem


def test_choice_lists_come_from_the_registries():
    from edgetl.core.targets import PRECISIONS, RUNTIMES
    from edgetl.datasets import EXAMPLES
    from edgetl.tasks import TASKS

    fit = run_cli("fit", "--help").stdout
    assert f"[{'|'.join(sorted(TASKS))}]" in fit
    assert f"[{'|'.join(PRECISIONS)}]" in fit and f"[{'|'.join(RUNTIMES)}]" in fit
    assert f"{{{'|'.join(EXAMPLES)}}}" in run_cli("example", "--help").stdout
