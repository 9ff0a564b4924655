"""Per-batch flips and quarter turns: exact, aligned across modalities, seeded."""

from __future__ import annotations

import numpy as np
import pytest

import augment
from tests.augment.conftest import make_split, marked_pair, marker_centroid


def dihedral(image: np.ndarray) -> list[np.ndarray]:
    """The 8 flips and turns of a square ``[H, W, C]`` image."""
    turns = [np.rot90(image, k, axes=(0, 1)) for k in range(4)]
    return turns + [t[:, ::-1] for t in turns]


def test_every_modality_of_a_sample_gets_the_same_draw():
    pairs = [marked_pair((16, 16), (1 + i % 10, 2 + (3 * i) % 10), seed=i) for i in range(32)]
    images = {"rgb": np.stack([p[0] for p in pairs]), "depth": np.stack([p[1] for p in pairs])}
    out = augment.flip_batch(images, augment.ONLINE_OPS, np.random.default_rng(0))
    moved = 0
    for i in range(32):
        rgb_at, depth_at = marker_centroid(out["rgb"][i]), marker_centroid(out["depth"][i])
        np.testing.assert_allclose(rgb_at, depth_at)
        moved += not np.allclose(rgb_at, marker_centroid(images["rgb"][i]))
    assert moved > 16  # 7 of the 8 draws move an off-centre marker


@pytest.mark.parametrize("ops, allowed", [
    (("flip_left_right",), lambda im: [im, im[:, ::-1]]),
    (("flip_top_bottom",), lambda im: [im, im[::-1]]),
    (("rotate90",), lambda im: dihedral(im)[:4]),
    (augment.ONLINE_OPS, dihedral),
])
def test_outputs_are_exact_flips_or_turns_and_all_of_them_occur(ops, allowed):
    split = make_split([64], size=8)
    source = split.images["rgb"]
    before = source.copy()
    out = augment.flip_batch(split.images, ops, np.random.default_rng(1))["rgb"]
    np.testing.assert_array_equal(source, before)  # the input is left alone
    seen = set()
    for image, original in zip(out, source, strict=True):
        options = allowed(original)
        which = [k for k, option in enumerate(options) if np.array_equal(image, option)]
        assert which, "output is not one of the allowed flips/turns"
        seen.add(which[0])
    assert seen == set(range(len(allowed(source[0]))))


def test_same_generator_state_same_batch_and_no_ops_no_change():
    images = make_split([20], size=8).images
    first = augment.flip_batch(images, augment.ONLINE_OPS, np.random.default_rng(5))
    again = augment.flip_batch(images, augment.ONLINE_OPS, np.random.default_rng(5))
    other = augment.flip_batch(images, augment.ONLINE_OPS, np.random.default_rng(6))
    np.testing.assert_array_equal(first["rgb"], again["rgb"])
    assert not np.array_equal(first["rgb"], other["rgb"])
    unchanged = augment.flip_batch(images, (), np.random.default_rng(5))
    np.testing.assert_array_equal(unchanged["depth"], images["depth"])


def test_only_lossless_ops_run_per_batch():
    assert augment.online_ops(["rotate", "flip_left_right", "zoom", "rotate90"]) == (
        "flip_left_right", "rotate90")
    with pytest.raises(ValueError, match="not a per-batch op"):
        augment.flip_batch({"rgb": np.zeros((2, 4, 4, 3), np.uint8)}, ["zoom"],
                           np.random.default_rng(0))
    with pytest.raises(ValueError, match="square"):
        augment.flip_batch({"rgb": np.zeros((8, 4, 6, 3), np.uint8)}, ["rotate90"],
                           np.random.default_rng(0))
