"""ModelSpec: JSON round trip, rebuilding a network from it, validation, the registry."""

from __future__ import annotations

import json

import pytest
import torch

import models


def test_round_trip_through_json_rebuilds_the_same_network(case_spec, make_batch):
    data = json.loads(json.dumps(case_spec.to_dict()))
    assert models.ModelSpec.from_dict(data) == case_spec
    torch.manual_seed(0)
    original = models.create_model(case_spec).eval()
    torch.manual_seed(1)  # a different random init, overwritten by load_state_dict
    rebuilt = models.create_model(models.ModelSpec.from_dict(data))
    rebuilt.load_state_dict(original.state_dict())
    batch = make_batch(2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(batch), original(batch), rtol=0, atol=0)


def test_create_model_takes_the_dict_form(small_spec):
    spec = small_spec(fusion="joint", modality="text")
    assert models.create_model(spec.to_dict()).spec == spec


def test_defaults():
    spec = models.ModelSpec(num_classes=2)
    assert (spec.backbone, spec.fusion, spec.modality, spec.implementation) == (
        "b0",
        "none",
        None,
        "efficientnet-pytorch",
    )
    assert spec.depth_backbone_name == "b0"
    assert spec.input_names == ("rgb",)
    assert models.ModelSpec(num_classes=2, fusion="late", modality="text").input_names == (
        "rgb",
        "text",
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"backbone": "b9"}, "unknown backbone 'b9'"),
        ({"depth_backbone": "b8"}, "unknown depth_backbone 'b8'"),
        ({"fusion": "middle"}, "unknown fusion 'middle'"),
        ({"fusion": "late", "modality": "depth", "late_rule": "vote"}, "unknown late_rule 'vote'"),
        ({"modality": "audio"}, "unknown modality 'audio'"),
        ({"fusion": "early", "modality": "text"}, "fusion 'early' cannot use modality 'text'"),
        ({"fusion": "joint"}, "fusion 'joint' cannot use RGB alone"),
        ({"fusion": "late", "modality": "numeric", "numeric_dim": None}, "numeric_dim is required"),
        ({"implementation": "timm"}, "unknown implementation 'timm'"),
        ({"num_classes": 0}, "num_classes must be an integer >= 1"),
        ({"num_classes": True}, "num_classes must be an integer"),
        ({"resolution": 32.0}, "resolution must be an integer"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_invalid_specs_are_clear_value_errors(small_spec, overrides, message):
    with pytest.raises(ValueError, match=message):
        small_spec(**overrides)


def test_from_dict_rejects_unknown_and_missing_keys():
    with pytest.raises(ValueError, match=r"unknown ModelSpec keys \['colour'\]"):
        models.ModelSpec.from_dict({"num_classes": 2, "colour": "red"})
    with pytest.raises(ValueError, match="needs 'num_classes'"):
        models.ModelSpec.from_dict({"backbone": "b0"})


def test_registry_lists_fusions_and_what_they_accept():
    assert set(models.list_fusions()) == {"none", "early", "joint", "late"}
    assert models.fusion_accepts("none") == {None, "depth", "numeric", "text"}
    assert models.fusion_accepts("early") == {"depth", "numeric"}
    assert models.fusion_accepts("joint") == {"depth", "numeric", "text"}
    assert models.fusion_accepts("late") == {"depth", "numeric", "text"}
    with pytest.raises(ValueError, match="unknown fusion"):
        models.fusion_accepts("middle")
