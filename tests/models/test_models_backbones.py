"""Backbones: sizes, pre-trained weights and the stem adaptation, export preparation."""

from __future__ import annotations

import pytest
import torch

import models
from models.backbones import create_backbone

# EfficientNet-B0..B7 parameter counts with the 1000-class head (Tan & Le 2019, Table 2).
PAPER_PARAMS = {
    "b0": 5.3e6,
    "b1": 7.8e6,
    "b2": 9.2e6,
    "b3": 12e6,
    "b4": 19e6,
    "b5": 30e6,
    "b6": 43e6,
    "b7": 66e6,
    # EfficientNet-Lite (TensorFlow's efficientnet/lite README; timm: 4.65M, 5.42M, 6.09M).
    "lite0": 4.7e6,
    "lite1": 5.4e6,
    "lite2": 6.1e6,
}


def test_backbones_are_b0_to_b7_and_lite0_to_lite2():
    assert models.list_backbones() == list(PAPER_PARAMS)
    assert models.list_implementations()[0] == "efficientnet-pytorch"


@pytest.mark.parametrize("implementation", ["efficientnet-pytorch", "torchvision"])
def test_parameter_counts_match_the_paper(implementation):
    for name, expected in PAPER_PARAMS.items():
        spec = models.ModelSpec(num_classes=1000, backbone=name, implementation=implementation)
        # On the meta device tensors have shapes but no storage: no time spent on random init.
        with torch.device("meta"):
            model = models.create_model(spec)
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - expected) / expected < 0.03, f"{name}: {count} vs {expected:.0f}"


def _imagenet_state_dict(implementation: str) -> dict[str, torch.Tensor]:
    """A stand-in for a downloaded ImageNet checkpoint: the full net, classifier included."""
    backbone = create_backbone("b0", implementation=implementation, image_size=32)
    torch.nn.init.normal_(backbone.stem.weight)  # distinct from any fresh init
    state = dict(backbone.net.state_dict())
    prefix = backbone.classifier_prefixes[0]
    state[f"{prefix}weight"] = torch.randn(1000, backbone.num_features)
    state[f"{prefix}bias"] = torch.randn(1000)
    return state


@pytest.mark.parametrize("implementation", ["efficientnet-pytorch", "torchvision"])
@pytest.mark.parametrize(("modality", "extra"), [("depth", 1), ("numeric", 5)])
def test_early_fusion_keeps_rgb_stem_and_averages_extra_channels(
    small_spec, implementation, modality, extra
):
    state = _imagenet_state_dict(implementation)
    spec = small_spec(fusion="early", modality=modality, implementation=implementation)
    model = models.create_model(spec, pretrained=state)
    stem_key = f"{model.backbone.stem_key}.weight"
    rgb = state[stem_key]
    stem = model.backbone.stem.weight.detach()
    assert stem.shape[1] == 3 + extra
    torch.testing.assert_close(stem[:, :3], rgb)
    for channel in range(3, 3 + extra):
        torch.testing.assert_close(stem[:, channel : channel + 1], rgb.mean(dim=1, keepdim=True))
    # Everything past the stem is loaded unchanged.
    loaded = model.backbone.net.state_dict()
    for key, value in state.items():
        if key != stem_key and not key.startswith(model.backbone.classifier_prefixes):
            torch.testing.assert_close(loaded[key], value)


def test_depth_branch_of_the_same_size_starts_from_the_weights(small_spec):
    state = _imagenet_state_dict("efficientnet-pytorch")
    model = models.create_model(small_spec(fusion="joint", modality="depth"), pretrained=state)
    torch.testing.assert_close(
        model.encoder.stem.weight.detach(), state["_conv_stem.weight"].sum(dim=1, keepdim=True)
    )
    other = small_spec(fusion="joint", modality="depth", depth_backbone="b1")
    models.create_model(other, pretrained=state)  # a b1 depth branch ignores b0 weights


def test_weights_of_another_size_are_refused(small_spec):
    state = _imagenet_state_dict("efficientnet-pytorch")
    with pytest.raises(ValueError, match="do not fit EfficientNet-b1"):
        models.create_model(small_spec(backbone="b1"), pretrained=state)
    with pytest.raises(ValueError, match="not a torchvision EfficientNet"):
        models.create_model(small_spec(implementation="torchvision"), pretrained=state)


def test_prepare_for_export_switches_swish_and_keeps_outputs(small_spec, make_batch):
    model = models.create_model(small_spec(fusion="late", modality="depth")).eval()
    batch = make_batch(2)
    with torch.no_grad():
        before = model(batch)
        prepared = models.prepare_for_export(model.train())
        after = prepared(batch)
    assert prepared is model and not model.training
    # efficientnet-pytorch's plain Swish is nn.SiLU; the memory-efficient one cannot export.
    kinds = {type(m).__name__ for m in model.modules()}
    assert "MemoryEfficientSwish" not in kinds and "SiLU" in kinds
    torch.testing.assert_close(before, after)
