"""Small tiled defect frames for the tests that need a tiled bundle (the service, fleet rounds):
gravel frames of 448 x 336 px (not square, so a 224 px crop or a squashed map shows), and a
defect size that makes the plan cut them into 2 x 2 tiles at full resolution. Deterministic, so
two fits in one session share the feature cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

W, H = 448, 336
DEFECT_SIZE = 2  # px: scale 1, the 448 x 336 frame itself is tiled (2 x 2 tiles of 224)
# Where the defects sit: a dark 2 px scratch in the right-hand third, lower half, of the frame.
SCRATCH = [(330, 230), (370, 262), (400, 250)]


def _source(seed: int) -> tuple[Image.Image, np.random.Generator]:
    from skimage import data

    src = Image.fromarray(data.gravel()).convert("RGB").resize((W + 96, H + 96), Image.Resampling.BICUBIC)
    return src, np.random.default_rng(seed)


def good_frames(folder: Path, n: int, *, seed: int) -> list[Path]:
    """``n`` good frames (crops of the gravel texture at random offsets) in ``folder``."""
    src, rng = _source(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        x, y = (int(v) for v in rng.integers(0, 96, 2))
        out.append(folder / f"s{seed}_{i}.png")
        src.crop((x, y, x + W, y + H)).save(out[-1])
    return out


def defect_frame(path: Path, *, seed: int, shift: int = 0, mask: Path | None = None) -> Path:
    """A good frame with the dark scratch of :data:`SCRATCH` (moved ``shift`` px left)."""
    good = good_frames(path.parent / f".tmp{seed}", 1, seed=seed)[0]
    im = Image.open(good).convert("RGB")
    good.unlink()
    good.parent.rmdir()
    pts = [(x - shift, y) for x, y in SCRATCH]
    ImageDraw.Draw(im).line(pts, fill=(10, 10, 10), width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    if mask is not None:
        m = Image.new("L", (W, H), 0)
        ImageDraw.Draw(m).line(pts, fill=255, width=2)
        mask.parent.mkdir(parents=True, exist_ok=True)
        m.save(mask)
    return path


def make_frames(root: Path, *, n_train: int = 8, n_good: int = 3, n_bad: int = 3) -> Path:
    """An MVTec-layout set of tiled frames under ``root``."""
    good_frames(root / "train" / "good", n_train, seed=0)
    good_frames(root / "test" / "good", n_good, seed=1)
    for i in range(n_bad):
        defect_frame(
            root / "test" / "scratch" / f"{i}.png",
            seed=10 + i,
            shift=20 * i,
            mask=root / "ground_truth" / "scratch" / f"{i}_mask.png",
        )
    return root


def fit_tiled(root: Path, out: Path) -> Path:
    """The CLI's ``fit`` of the frames (FP32: no calibration run, quick), as a user runs it."""
    from tests.conftest import run_cli

    r = run_cli(
        "fit", root, "--out", out, "--defect-size", str(DEFECT_SIZE), "--precision", "fp32", "--json", "--quiet"
    )
    assert r.returncode == 0, r.stderr
    return out
