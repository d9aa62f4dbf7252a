"""A tiled defect bundle (frames larger than the backbone's view) as a service: the heat map the
page and ``/predict?heatmap=1`` show covers the whole frame at its shape and sits on the defect."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from tests import tiled

from .conftest import TOKEN, Server, auth, http


@pytest.fixture(scope="module")
def served(tmp_path_factory, cache_dir):
    root = tiled.make_frames(tmp_path_factory.mktemp("serve-tiled") / "frames", n_train=8, n_good=2, n_bad=1)
    bundle = tiled.fit_tiled(root, root.parent / "tiled.bundle")
    s = Server(bundle, "--token", TOKEN)
    yield s, root
    s.stop()


def _grey(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("L"), np.float32)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_heat_map_covers_the_frame_and_sits_on_the_defect(served):
    server, root = served
    frame_file = root / "test" / "scratch" / "0.png"
    frame = Image.open(frame_file).convert("RGB")
    mask = np.asarray(Image.open(root / "ground_truth" / "scratch" / "0_mask.png")) > 0
    status, _, body = http("POST", server.url + "/predict?heatmap=1", frame_file.read_bytes())
    got = json.loads(body)
    assert status == 200, got
    assert got["verdict"] == "defect"
    # the plan is 448 x 336 at scale 1: the peak is in frame pixels, on the scratch (2 px wide,
    # so within the map's 3 x 3 feature smoothing of it)
    rows, cols = np.nonzero(mask)
    r, c = got["peak"]
    assert rows.min() - 8 <= r <= rows.max() + 8 and cols.min() - 8 <= c <= cols.max() + 8

    pictures = {"predict": Image.open(io.BytesIO(base64.b64decode(got["heatmap"].split(",", 1)[1])))}
    status, headers, png = http("GET", server.url + f"/heatmap/{got['id']}", headers=auth())
    assert status == 200 and headers["content-type"] == "image/png"
    pictures["page"] = Image.open(io.BytesIO(png))
    assert http("GET", server.url + "/heatmap/ffffffffffffffff", headers=auth())[0] == 404
    f = _grey(frame)
    # a control: the frame against itself moved by 4 px (about a gravel grain) decorrelates; an
    # overlay cropped, squashed or shifted by that much would too
    moved = _corr(f[:, 4:], f[:, :-4])
    for where, im in pictures.items():
        assert im.size == frame.size, where  # the whole frame at its own resolution, not a 224 px view
        o = _grey(im)
        # the heat is blended over the frame (at most 75 % opaque, 15 % where cool): aligned, the
        # overlay keeps the frame's texture pixel for pixel
        assert _corr(o, f) > max(0.9, moved + 0.3), where
        # where the heat is, the overlay departs from the frame the most: 16 px blocks, the
        # hottest within a block of the scratch
        d = np.abs(np.asarray(im.convert("RGB"), np.float32) - np.asarray(frame, np.float32)).mean(axis=2)
        blocks = d[: d.shape[0] // 16 * 16, : d.shape[1] // 16 * 16].reshape(d.shape[0] // 16, 16, -1, 16).mean((1, 3))
        br, bc = np.unravel_index(int(np.argmax(blocks)), blocks.shape)
        assert rows.min() - 16 <= 16 * br + 8 <= rows.max() + 16, where
        assert cols.min() - 16 <= 16 * bc + 8 <= cols.max() + 16, where

    # the page's thumbnail: the frame's aspect ratio (4:3), not a square crop
    status, _, thumb = http("GET", server.url + f"/thumb/{got['id']}")
    assert status == 200
    tw, th = Image.open(io.BytesIO(thumb)).size
    assert max(tw, th) == 192 and abs(tw / th - tiled.W / tiled.H) < 1 / th
    # KServe metadata and raw map: the working frame's shape
    meta = json.loads(http("GET", server.url + "/v2/models/tiled")[2])
    assert next(o["shape"] for o in meta["outputs"] if o["name"] == "anomaly_map") == [-1, tiled.H, tiled.W]
