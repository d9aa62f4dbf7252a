"""Exported FP32 models (ONNX Runtime, OpenVINO) equal the PyTorch reference on real images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgetl.core.preprocess import preprocess_image
from edgetl.core.sessions import open_session
from edgetl.export import resolve
from edgetl.export.image import build_model, weight_source

torch = pytest.importorskip("torch")
skdata = pytest.importorskip("skimage.data")

# Stated once: FP32 exports may differ from eager PyTorch only by float reassociation.
ATOL = 1e-4


@pytest.fixture(scope="module")
def batch(exported):
    names = ["coffee", "chelsea", "astronaut", "rocket", "camera", "brick"]
    return np.stack([preprocess_image(Image.fromarray(getattr(skdata, n)()), exported.image_preprocess) for n in names])


@pytest.fixture(scope="module")
def reference(batch):
    spec = resolve("efficientnet_lite0")
    model = build_model(spec, weight_source(spec))
    with torch.no_grad():
        return model(torch.from_numpy(batch)).numpy()


def test_onnx_fp32_matches_torch(exported, batch, reference):
    out = open_session(exported.path, runtime="onnxruntime")(batch)
    assert out.shape == (len(batch), exported.num_features)
    np.testing.assert_allclose(out, reference, atol=ATOL, rtol=1e-4)
    # dynamic batch: one image at a time gives the same rows
    np.testing.assert_allclose(open_session(exported.path)(batch[:1]), reference[:1], atol=ATOL, rtol=1e-4)


def test_openvino_fp32_matches_torch(exported, batch, reference, tmp_path):
    ov = pytest.importorskip("openvino")
    from edgetl.pipeline.convert import onnx_to_openvino

    ov.save_model(onnx_to_openvino(exported.path, batch=0), str(tmp_path / "b.xml"), compress_to_fp16=False)
    out = open_session(tmp_path / "b.xml", runtime="openvino")(batch)
    np.testing.assert_allclose(out, reference, atol=ATOL, rtol=1e-4)
