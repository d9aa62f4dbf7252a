"""A fleet round on a tiled defect bundle (frames larger than the backbone's view): devices
summarise the tiles of their frames, the merge keeps the tile plan and scores frames like one
bundle adapted on every device's frames, and a device whose bundle tiles frames differently is
refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgetl.fleet import _edgetl as et
from edgetl.fleet.device import Device
from edgetl.fleet.server import FleetRound, run_round
from tests import tiled

from .conftest import FIT_FP32, run_edgetl


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, cache_dir):
    """A tiled PatchCore bundle (2 x 2 tiles of 448 x 336 frames) and one fitted on the same
    frames from a camera of 400 x 300 px: another working size, another plan."""
    from PIL import Image

    root = tiled.make_frames(tmp_path_factory.mktemp("fleet-tiled") / "frames", n_train=8, n_good=2, n_bad=2)
    args = ("--defect-size", tiled.DEFECT_SIZE, "--head", "patchcore", *FIT_FP32)
    run_edgetl("fit", root, "--out", root.parent / "tiled.bundle", *args)
    small = root.parent / "small" / "train" / "good"
    small.mkdir(parents=True)
    for f in sorted((root / "train" / "good").glob("*.png"))[:4]:
        Image.open(f).resize((400, 300), Image.Resampling.BICUBIC).save(small / f.name)
    run_edgetl("fit", small.parent.parent, "--out", root.parent / "small.bundle", *args)
    return root, root.parent / "tiled.bundle", root.parent / "small.bundle"


def _nearest(Q: np.ndarray, M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of the nearest row of ``M``, its distance) for each row of ``Q``."""
    M = np.asarray(M, np.float32)
    mm = np.sum(M * M, axis=1)
    idx, dist = [], []
    for i in range(0, len(Q), 1024):
        q = np.asarray(Q[i : i + 1024], np.float32)
        d2 = np.sum(q * q, axis=1)[:, None] - 2 * q @ M.T + mm[None, :]
        k = d2.argmin(axis=1)
        idx.append(k)
        dist.append(np.sqrt(np.maximum(d2[np.arange(len(q)), k], 0)))
    return np.concatenate(idx), np.concatenate(dist)


def test_round_on_tiled_frames_keeps_the_plan_and_scores_like_central(bundles, tmp_path):
    from PIL import Image

    from edgetl import load_predictor
    from edgetl.heads.patch import update_patch_head

    root, bundle, small = bundles
    plan_before = json.loads((bundle / "manifest.json").read_text())["anomaly"]["tiles"]
    b0 = et.load_bundle(bundle)
    head0, thr0 = et.current_head(b0), float(b0.head_entry()["threshold"])
    shutil.copytree(bundle, tmp_path / "server.bundle")
    devices = {}
    for j in range(3):  # each device adapts on good frames of its own (another part of the texture)
        tiled.good_frames(tmp_path / f"cam{j}" / "good", 4, seed=20 + j)
        shutil.copytree(bundle, tmp_path / f"cam{j}.bundle")
        devices[f"cam{j}"] = Device.open(tmp_path / f"cam{j}.bundle", tmp_path / f"cam{j}", name=f"cam{j}")
    # another plan (fitted on another frame size): refused in one line, the rest still merge
    for f in tiled.good_frames(tmp_path / "other" / "good", 4, seed=30):
        Image.open(f).resize((400, 300), Image.Resampling.BICUBIC).save(f)
    shutil.copytree(small, tmp_path / "other.bundle")
    devices["other"] = Device.open(tmp_path / "other.bundle", tmp_path / "other", name="other")
    plan = et.tile_plan(b0)
    n, rows = plan.count, et.tiles_per_image(b0)  # rows: the tiles, then the whole-frame overview
    assert n == 4 and rows == n + int(plan.overview) and et.has_overview(b0) == plan.overview
    # 3 frames summarised as tiles only (the overview is each device's own), 1 held out whole
    assert all(len(d.train.F) == 3 * n and len(d.heldout.F) == rows for d in list(devices.values())[:3])

    report = run_round(FleetRound(tmp_path / "server.bundle"), devices)
    assert report["version"] == 2 and report["devices"] == 3, report
    refused = {r["device"]: r["reason"] for r in report["refused"]}
    assert set(refused) == {"other"} and "\n" not in refused["other"]
    assert "tiles frames as" in refused["other"] and "another size or another --defect-size" in refused["other"]
    d = report["deliveries"]["other"]
    assert not d["accepted"] and "tiled as" in d["reason"] and "\n" not in d["reason"]
    assert et.load_bundle(tmp_path / "other.bundle").head_version == 1
    for name in ("cam0", "cam1", "cam2"):
        d = report["deliveries"][name]
        # judged on its held-out frame (its tiles and overview, one frame score), at the carried-over frame threshold
        assert d["accepted"] and d["heldout_images"] == 1 and d["threshold"] == thr0, d
        assert et.load_bundle(tmp_path / f"{name}.bundle").head_version == 2

    server = et.load_bundle(tmp_path / "server.bundle")
    assert server.manifest["anomaly"]["tiles"] == plan_before  # the plan is kept
    assert float(server.head_entry()["threshold"]) == thr0  # carried over, as adapt does
    merged = et.current_head(server)

    # central: the single-bundle update (adapt's) on every frame the devices summarised
    F_all = np.concatenate([devices[f"cam{j}"].train.F for j in range(3)])
    central = update_patch_head(head0, F_all)
    frames = sorted((root / "test").rglob("*.png"))
    F_test = et.patch_features(server, frames)
    s_merged, s_central = et.anomaly_scores(server, merged, F_test), et.anomaly_scores(server, central, F_test)
    # Scored on the test frames and the devices' held-out frames. The noise of the comparison:
    # how far the central scores move with which devices took part (the central update without
    # each device in turn). The coreset of coresets is not the central bank, but it is no farther
    # from it than that.
    held = np.concatenate([devices[f"cam{j}"].heldout.F for j in range(3)])
    F_eval = np.concatenate([F_test, held])
    s_merged, s_central = et.anomaly_scores(server, merged, F_eval), et.anomaly_scores(server, central, F_eval)
    lodo = [
        update_patch_head(head0, np.concatenate([devices[f"cam{j}"].train.F for j in range(3) if j != k]))
        for k in range(3)
    ]
    spread = np.max([np.abs(et.anomaly_scores(server, h, F_eval) - s_central) for h in lodo])
    gap = np.abs(s_merged - s_central)
    print(f"\ntiled fleet vs central: |score gap| {np.round(gap, 3)}, leave-one-device-out spread {spread:.3f}")
    assert gap.max() <= spread
    # the same verdicts wherever the central score is clear of the threshold by more than that
    clear = np.abs(s_central - thr0) > spread
    assert np.array_equal((s_merged >= thr0)[clear], (s_central >= thr0)[clear])
    # the served model scores frames as tiles with the merged bank (fused graph = numpy)
    maps, fused = load_predictor(tmp_path / "server.bundle").maps(frames)
    assert maps.shape == (len(frames), tiled.H, tiled.W)
    np.testing.assert_allclose(fused, s_merged[: len(frames)], rtol=1e-4)
