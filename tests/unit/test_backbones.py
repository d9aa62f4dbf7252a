"""The pretrained weights really load, from every source, and bad names/files fail clearly."""

from __future__ import annotations

import pytest
from PIL import Image

from edgetl.core.preprocess import preprocess_image
from edgetl.errors import ConfigError
from edgetl.export import REGISTRY, resolve
from edgetl.export.image import build_model, preprocess_config, weight_source

torch = pytest.importorskip("torch")
skdata = pytest.importorskip("skimage.data")

ESPRESSO, TRIPOD = 967, 872  # ImageNet-1k class indices


@pytest.fixture(scope="module")
def classifier():
    spec = resolve("efficientnet_lite0")
    return build_model(spec, weight_source(spec), with_classifier=True)


def _top1(model, arr) -> tuple[int, float]:
    x = torch.from_numpy(preprocess_image(Image.fromarray(arr), preprocess_config(model)))[None]
    p = model(x).softmax(-1)[0]
    return int(p.argmax()), float(p.max())


def test_offline_package_weights_classify_imagenet(classifier):
    assert weight_source(resolve("efficientnet_lite0")).kind == "package"
    cls, p = _top1(classifier, skdata.coffee())
    assert cls == ESPRESSO and p > 0.9
    cls, p = _top1(classifier, skdata.camera())
    assert cls == TRIPOD and p > 0.9


def test_explicit_weights_file_in_timm_naming(tmp_path, classifier):
    st = pytest.importorskip("safetensors.torch")
    f = tmp_path / "mine.safetensors"
    st.save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(f))
    spec = resolve("efficientnet_lite0")
    model = build_model(spec, weight_source(spec, f), with_classifier=True)
    assert _top1(model, skdata.coffee())[0] == ESPRESSO


def test_weights_for_another_architecture_are_refused(tmp_path):
    f = tmp_path / "small.pth"
    torch.save({"w": torch.zeros(3)}, f)
    spec = resolve("efficientnet_lite0")
    with pytest.raises(ConfigError, match="do not match"):
        build_model(spec, weight_source(spec, f))


def test_missing_weights_file():
    with pytest.raises(ConfigError, match="not found"):
        weight_source(resolve("efficientnet_lite0"), "/nonexistent/w.pth")


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ConfigError, match="did you mean resnet50"):
        resolve("resnet5O")


def test_registry_and_timm_names():
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(REGISTRY)
    assert resolve("tf_efficientnet_lite0").name == "efficientnet_lite0"
    assert resolve("resnet18").source == "resnet18"  # any timm architecture is accepted
