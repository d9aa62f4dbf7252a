"""Writing a signed bundle without a key is allowed where no policy is in force, but the writer is
told at once that trusting devices will refuse the result."""

from __future__ import annotations

from tests.conftest import run_cli


def test_adapting_a_signed_bundle_without_a_key_warns_in_one_line(small, tmp_path):
    _, new, data = small
    keys = tmp_path / "keys"
    assert run_cli("keygen", "factory", "--out", keys).returncode == 0
    b = tmp_path / "signed.bundle"
    r = run_cli(
        "fit", data, "--out", b, "--precision", "fp32", "--runtime", "onnxruntime", "--sign", keys / "factory.key", "-q"
    )
    assert r.returncode == 0, r.stderr
    r = run_cli("adapt", b, new)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "without a key" in line]
    assert len(lines) == 1 and "trust policy will refuse it" in lines[0] and "--sign KEY" in lines[0]
