"""The numpy preprocessing the device runs equals timm's own evaluation transform."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgetl.core.preprocess import PreprocessConfig, preprocess_image

timm = pytest.importorskip("timm")
skdata = pytest.importorskip("skimage.data")


def _timm_transform(cfg: PreprocessConfig):
    from timm.data import create_transform

    return create_transform(
        input_size=(3, cfg.input_size, cfg.input_size),
        interpolation=cfg.interpolation,
        mean=cfg.mean,
        std=cfg.std,
        crop_pct=cfg.crop_pct,
        crop_mode="center",
    )


@pytest.mark.parametrize(
    "cfg",
    [
        PreprocessConfig(),  # EfficientNet-Lite0
        PreprocessConfig(input_size=260, crop_pct=0.89, interpolation="bicubic"),  # Lite2-like
        PreprocessConfig(
            input_size=224,
            crop_pct=0.875,
            interpolation="bilinear",
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
        ),  # ImageNet-normalised timm models
    ],
)
@pytest.mark.parametrize("name", ["coffee", "camera", "astronaut"])
def test_matches_timm_eval_transform(cfg, name):
    arr = getattr(skdata, name)()
    im = Image.fromarray(arr).convert("RGB")
    for crop in (im, im.crop((0, 0, 301, 173)), im.crop((0, 0, 120, 400))):  # wide, tall, odd sizes
        ours = preprocess_image(crop, cfg)
        theirs = _timm_transform(cfg)(crop).numpy()
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)


def test_backbone_config_comes_from_timm(exported):
    assert exported.image_preprocess == PreprocessConfig(
        input_size=224, crop_pct=0.875, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
    )
