"""Shared fixtures. Expensive things (the backbone export, example datasets, fitted bundles) are
session-scoped and share one cache directory, the way a user's second run shares ~/.cache/edgetl."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """The quick tier (``make check``: ``-m "not slow"``) is every test that never runs the real
    backbone. Whatever exports a backbone, extracts its features or fits a bundle shares the
    session's ``cache_dir`` (see below), so a test that needs ``cache_dir``, directly or through
    another fixture, is ``slow``; tests that start browsers, Flower/Ray, emulated CPUs or extra
    Python interpreters carry the marker themselves."""
    slow = pytest.mark.slow
    for item in items:
        if "cache_dir" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("slow"):
            item.add_marker(slow)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("edgetl-cache")
    os.environ["EDGETL_CACHE"] = str(d)  # CLI subprocesses share it
    return d


@pytest.fixture(scope="session")
def exported(cache_dir):
    from edgetl.export import export_backbone

    return export_backbone("efficientnet_lite0", cache_dir=cache_dir)


@pytest.fixture(scope="session")
def surfaces(tmp_path_factory) -> Path:
    """The built-in classification example, small enough for tests."""
    from edgetl.datasets.images import make_surfaces

    out = tmp_path_factory.mktemp("data") / "surfaces"
    make_surfaces(out, seed=0, per_class=16, val_per_class=8)
    return out


@pytest.fixture(scope="session")
def target_fit(surfaces, cache_dir, tmp_path_factory):
    """``target_fit(name)``: the :class:`edgetl.pipeline.fit.FitResult` of the example's INT8 bundle
    for the shipped profile ``name``, with the profile's own settings (what a user gets), fitted on
    first use and then shared: the profile checks (tests/parity), the emulated CPUs and the device
    tests read the same bundles instead of each fitting its own. Tests that change one work on a copy."""
    from edgetl.pipeline.fit import FitOptions, fit

    root = tmp_path_factory.mktemp("targets")
    done: dict = {}

    def get(name: str):
        if name not in done:
            opts = FitOptions(target=name, cache_dir=str(cache_dir), quiet=True, allow_drop=True)
            done[name] = fit(surfaces, root / f"{name}.bundle", options=opts)
        return done[name]

    return get


@pytest.fixture(scope="session")
def int8_bundle(target_fit) -> Path:
    """The example's INT8 bundle for the default target (openvino-cpu, as `edgetl fit` makes it);
    tests that change it work on a copy."""
    from edgetl import tasks

    return target_fit(tasks.get("classify").default_target).bundle.path


def write_image(path: Path, *, mode: str = "RGB", size=(64, 48), seed: int = 0) -> Path:
    """A small random-texture image of the given Pillow mode."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        arr = rng.integers(0, 65535, size=(size[1], size[0]), dtype=np.uint16)
        Image.fromarray(arr).save(path)
        return path
    arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").convert(mode).save(path)
    return path


def make_folder(root: Path, classes=("a", "b"), per_class: int = 4, suffix: str = ".png") -> Path:
    for ci, c in enumerate(classes):
        for i in range(per_class):
            write_image(root / c / f"{c}{i}{suffix}", seed=ci * 100 + i)
    return root


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, preexec_fn=None):
    """Run the real `edgetl` entry point in a subprocess (as a user would)."""
    import subprocess

    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "edgetl.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=900,
        preexec_fn=preexec_fn,
    )


def permissions_enforced() -> None:
    """``preexec_fn`` for a child that must obey file permissions even when the tests run as root
    (CI containers do): root's permission override is the capabilities CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH, and dropping them from the bounding set before ``exec`` leaves the new
    program without them (root's inheritable set is empty, so ``exec`` grants only what the bounding
    set still holds). Its uid stays 0, so files it owns stay readable; a 0o555 folder is then
    read-only to it as to anyone. Raises in the child (and so in ``subprocess.run``) where the
    capabilities cannot be dropped, rather than letting a permission test pass unchecked."""
    if os.geteuid() != 0:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2
    for cap in (cap_dac_override, cap_dac_read_search):
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot drop capability {cap} for a permission test: {os.strerror(err)}")


_BLOCKER = '''
import sys

class _NoTorch:
    """Make torch (and what drags it in) unimportable, as on a device that never installed it."""
    blocked = ("torch", "torchvision", "timm", "nncf")

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.blocked:
            raise ImportError(f"{name} is blocked: this is the device path")
        return None

sys.meta_path.insert(0, _NoTorch())
'''


@pytest.fixture(scope="session")
def no_torch_env(tmp_path_factory) -> dict:
    """Environment for a subprocess in which `import torch` fails (via sitecustomize)."""
    d = tmp_path_factory.mktemp("no-torch")
    (d / "sitecustomize.py").write_text(_BLOCKER)
    return {"PYTHONPATH": str(d) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def make_grouped_crops(
    root: Path,
    *,
    classes=("brick", "grass", "gravel", "moon", "camera"),
    groups: int = 4,
    per_group: int = 6,
    size: int = 96,
    folders: bool = True,
) -> Path:
    """Data with many near-copies per source, as factory data has: each class is one scikit-image
    photograph, each group one quadrant of it, and each image of a group a crop shifted a few
    pixels inside that quadrant (consecutive frames of one part). With ``folders`` the layout is
    ``DATA/<class>/<group>/``; without, a flat ``DATA/<class>/`` with the group in the file name."""
    from skimage import data as skdata

    rng = np.random.default_rng(0)
    for c in classes:
        img = np.asarray(getattr(skdata, c)())
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
        H, W = img.shape[:2]
        for g in range(groups):
            y0, x0 = (g // 2) * (H // 2), (g % 2) * (W // 2)
            cy, cx = y0 + (H // 2 - size) // 2, x0 + (W // 2 - size) // 2
            for i in range(per_group):
                dy, dx = rng.integers(-6, 7, 2)
                crop = img[cy + dy : cy + dy + size, cx + dx : cx + dx + size]
                out = root / c / f"part{g}" / f"frame{i}.png" if folders else root / c / f"part{g}_frame{i}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.ascontiguousarray(crop)).save(out)
    return root


def minimal_manifest(labels=("a", "b"), **extra) -> dict:
    """The smallest manifest the schema accepts, for bundle-format tests that write files by hand
    (backbone.onnx and heads/v1.npz)."""
    return {
        "task": "classify",
        "labels": list(labels),
        "precision": "fp32",
        "runtime": "onnxruntime",
        "backbone": {
            "name": "test",
            "num_features": 4,
            "preprocess": {
                "input_size": 32,
                "crop_pct": 1.0,
                "interpolation": "bilinear",
                "mean": [0.5, 0.5, 0.5],
                "std": [0.5, 0.5, 0.5],
            },
        },
        "target": {"name": "cpu-x86"},
        "models": {"backbone": "backbone.onnx"},
        "head": {"current": 1, "versions": [{"version": 1, "file": "heads/v1.npz", "labels": list(labels)}]},
        **extra,
    }
