"""The table of allowed ops and the pipelines built from it."""

from __future__ import annotations

import pytest
from Augmentor.Operations import Operation

import augment
from augment.ops import OPS
from augment.pipeline import ColourOnly

ISSUE_OPS = [
    "flip_left_right", "flip_top_bottom", "rotate90", "rotate", "random_distortion",
    "zoom", "skew", "brightness", "contrast", "color",
]


def test_table_lists_the_issue_ops() -> None:
    assert augment.list_ops() == ISSUE_OPS
    assert augment.list_ops("colour") == ["brightness", "contrast", "color"]
    assert augment.list_ops("geometric") == ISSUE_OPS[:7]


def test_validate_ops_keeps_order() -> None:
    assert augment.validate_ops(["zoom", "flip_left_right"]) == ("zoom", "flip_left_right")
    assert augment.validate_ops([]) == ()


def test_unknown_op_names_it_and_lists_allowed() -> None:
    with pytest.raises(ValueError, match="unknown augment op 'flip_sideways'") as info:
        augment.validate_ops(["flip_left_right", "flip_sideways"])
    for name in ISSUE_OPS:
        assert name in str(info.value)


def test_duplicate_op_is_an_error() -> None:
    with pytest.raises(ValueError, match="'zoom' is listed more than once"):
        augment.validate_ops(["zoom", "zoom"])


def test_bare_string_is_an_error() -> None:
    with pytest.raises(TypeError, match="list of op names"):
        augment.validate_ops("zoom")


@pytest.mark.parametrize("name", ISSUE_OPS)
def test_every_op_builds_one_augmentor_operation(name: str) -> None:
    pipeline = augment.build_pipeline([name], size=(32, 32))
    assert len(pipeline.operations) == 1
    operation = pipeline.operations[0]
    assert isinstance(operation, Operation)
    # Colour ops are wrapped so that they only reach the RGB image of a sample.
    assert isinstance(operation, ColourOnly) == (OPS[name].kind == "colour")


def test_pipeline_keeps_listed_order_and_probability() -> None:
    pipeline = augment.build_pipeline(["zoom", "flip_top_bottom"], size=(16, 16), probability=0.3)
    assert [type(op).__name__ for op in pipeline.operations] == ["Zoom", "Flip"]
    assert all(op.probability == 0.3 for op in pipeline.operations)


@pytest.mark.parametrize("probability", [0.0, 1.5])
def test_pipeline_rejects_bad_probability(probability: float) -> None:
    with pytest.raises(ValueError, match="probability"):
        augment.build_pipeline(["zoom"], size=(16, 16), probability=probability)
