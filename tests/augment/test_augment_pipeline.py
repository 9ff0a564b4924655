"""Every image modality of a sample goes through the same random operation."""

from __future__ import annotations

import numpy as np
import pytest

import augment
from augment.pipeline import augment_sample

GEOMETRIC = augment.list_ops("geometric")
COLOUR = augment.list_ops("colour")
SEEDS = range(6)
SIZE = (24, 24)
# Off-centre and away from the borders: flips and rotations move it, crops keep it.
TOP_LEFT = (7, 13)
# Interpolation mixes the marker with each image's own background; a couple of pixels of
# centroid difference between RGB and depth is interpolation, not misalignment.
TOLERANCE_PX = 2.0


def run(ops: list[str], images: list[np.ndarray], seed: int) -> list[np.ndarray]:
    height, width = images[0].shape[:2]
    pipeline = augment.build_pipeline(ops, size=(height, width), probability=1.0)
    with augment.seeded_global_rngs(seed):
        return augment_sample(pipeline, images)


@pytest.mark.parametrize("op", GEOMETRIC)
def test_depth_stays_aligned_with_rgb(op: str, marked_pair, marker_centroid) -> None:
    changed = False
    for seed in SEEDS:
        rgb, depth = marked_pair(SIZE, TOP_LEFT, seed)
        out_rgb, out_depth = run([op], [rgb, depth], seed)
        rgb_at, depth_at = marker_centroid(out_rgb), marker_centroid(out_depth)
        assert (rgb_at is None) == (depth_at is None), f"{op} seed {seed}: marker lost in one"
        if rgb_at is not None:
            assert np.abs(rgb_at - depth_at).max() <= TOLERANCE_PX, f"{op} seed {seed}"
        changed |= not np.array_equal(out_rgb, rgb)
    assert changed, f"{op} never changed the image, so alignment was not tested"


def test_all_geometric_ops_together_keep_alignment(marked_pair, marker_centroid) -> None:
    for seed in SEEDS:
        rgb, depth = marked_pair(SIZE, (10, 10), seed)
        out_rgb, out_depth = run(GEOMETRIC, [rgb, depth], seed)
        rgb_at, depth_at = marker_centroid(out_rgb), marker_centroid(out_depth)
        assert (rgb_at is None) == (depth_at is None)
        if rgb_at is not None:
            assert np.abs(rgb_at - depth_at).max() <= TOLERANCE_PX


@pytest.mark.parametrize(
    ("op", "expected"), [("flip_left_right", np.fliplr), ("flip_top_bottom", np.flipud)]
)
def test_flips_are_exact_on_both_images(op: str, expected, marked_pair) -> None:
    rgb, depth = marked_pair(SIZE, TOP_LEFT, 0)
    out_rgb, out_depth = run([op], [rgb, depth], 0)
    np.testing.assert_array_equal(out_rgb, expected(rgb))
    np.testing.assert_array_equal(out_depth, expected(depth))


def test_rotate90_turns_both_images_by_the_same_quarter(marked_pair) -> None:
    turns = set()
    for seed in SEEDS:
        rgb, depth = marked_pair(SIZE, TOP_LEFT, seed)
        out_rgb, out_depth = run(["rotate90"], [rgb, depth], seed)
        k = next(k for k in (1, 2, 3) if np.array_equal(out_rgb, np.rot90(rgb, k)))
        np.testing.assert_array_equal(out_depth, np.rot90(depth, k))
        turns.add(k)
    assert len(turns) > 1, "rotate90 should draw among 90, 180 and 270 degrees"


@pytest.mark.parametrize("op", COLOUR)
def test_colour_ops_change_rgb_only(op: str, marked_pair) -> None:
    changed = False
    for seed in SEEDS:
        rgb, depth = marked_pair(SIZE, TOP_LEFT, seed)
        out_rgb, out_depth = run([op], [rgb, depth], seed)
        np.testing.assert_array_equal(out_depth, depth)
        changed |= not np.array_equal(out_rgb, rgb)
    assert changed, f"{op} never changed the RGB image"


@pytest.mark.parametrize("op", augment.list_ops())
def test_non_square_images_keep_shape_and_dtype(op: str, marked_pair) -> None:
    rgb, depth = marked_pair((16, 28), (5, 9), 0)
    for seed in SEEDS:
        out_rgb, out_depth = run([op], [rgb, depth], seed)
        assert out_rgb.shape == rgb.shape and out_rgb.dtype == np.uint8
        assert out_depth.shape == depth.shape and out_depth.dtype == np.uint8


def test_sample_inputs_are_not_modified(marked_pair) -> None:
    rgb, depth = marked_pair(SIZE, TOP_LEFT, 0)
    before = rgb.copy(), depth.copy()
    rgb.flags.writeable = depth.flags.writeable = False
    run(augment.list_ops(), [rgb, depth], 0)
    np.testing.assert_array_equal(rgb, before[0])
    np.testing.assert_array_equal(depth, before[1])


def test_depth_only_sample_ignores_colour_ops(marked_pair) -> None:
    _, depth = marked_pair(SIZE, TOP_LEFT, 0)
    pipeline = augment.build_pipeline(COLOUR, size=SIZE, colour_images=0, probability=1.0)
    with augment.seeded_global_rngs(0):
        (out,) = augment_sample(pipeline, [depth])
    np.testing.assert_array_equal(out, depth)
