"""Per-batch flips and quarter turns: exact, aligned across modalities, seeded, any device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import augment
from augment.online import Poses, apply_poses, draw_poses
from tests.augment.conftest import make_split, marked_pair, marker_centroid


def dihedral(image: np.ndarray) -> list[np.ndarray]:
    """The 8 flips and turns of a square ``[H, W, C]`` image."""
    turns = [np.rot90(image, k, axes=(0, 1)) for k in range(4)]
    return turns + [t[:, ::-1] for t in turns]


def tensors(images: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array) for name, array in images.items()}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_every_modality_of_a_sample_gets_the_same_draw():
    pairs = [marked_pair((16, 16), (1 + i % 10, 2 + (3 * i) % 10), seed=i) for i in range(32)]
    images = {"rgb": np.stack([p[0] for p in pairs]), "depth": np.stack([p[1] for p in pairs])}
    out = augment.flip_batch(tensors(images), augment.ONLINE_OPS, seeded(0))
    moved = 0
    for i in range(32):
        rgb_at = marker_centroid(out["rgb"][i].numpy())
        depth_at = marker_centroid(out["depth"][i].numpy())
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
    out = augment.flip_batch(tensors(split.images), ops, seeded(1))["rgb"].numpy()
    np.testing.assert_array_equal(source, before)  # the input is left alone
    seen = set()
    for image, original in zip(out, source, strict=True):
        options = allowed(original)
        which = [k for k, option in enumerate(options) if np.array_equal(image, option)]
        assert which, "output is not one of the allowed flips/turns"
        seen.add(which[0])
    assert seen == set(range(len(allowed(source[0]))))


def test_the_folded_ops_equal_flip_then_flip_then_turn_for_every_draw():
    # All 16 (left_right, top_bottom, turns) draws, against the ops applied one after another.
    draws = [(lr, tb, k) for lr in (0, 1) for tb in (0, 1) for k in range(4)]
    images = make_split([len(draws)], size=6).images["rgb"]
    poses = Poses(torch.tensor([d[0] for d in draws], dtype=torch.bool),
                  torch.tensor([d[1] for d in draws], dtype=torch.bool),
                  torch.tensor([d[2] for d in draws]))
    out = apply_poses(torch.from_numpy(images), poses).numpy()
    for image, original, (lr, tb, k) in zip(out, images, draws, strict=True):
        expected = original[:, ::-1] if lr else original
        expected = expected[::-1] if tb else expected
        np.testing.assert_array_equal(image, np.rot90(expected, k, axes=(0, 1)))


def test_draws_keep_the_probabilities_of_the_ops():
    poses = draw_poses(40_000, augment.ONLINE_OPS, seeded(2))
    assert poses.left_right.float().mean() == pytest.approx(0.5, abs=0.01)
    assert poses.top_bottom.float().mean() == pytest.approx(0.5, abs=0.01)
    counts = torch.bincount(poses.turns, minlength=4).float() / 40_000
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.01)
    only_turns = draw_poses(100, ["rotate90"], seeded(2))
    assert not only_turns.left_right.any() and not only_turns.top_bottom.any()


def test_same_generator_state_same_batch_and_no_ops_no_change():
    images = tensors(make_split([20], size=8).images)
    first = augment.flip_batch(images, augment.ONLINE_OPS, seeded(5))
    again = augment.flip_batch(images, augment.ONLINE_OPS, seeded(5))
    other = augment.flip_batch(images, augment.ONLINE_OPS, seeded(6))
    assert torch.equal(first["rgb"], again["rgb"])
    assert not torch.equal(first["rgb"], other["rgb"])
    unchanged = augment.flip_batch(images, (), seeded(5))
    assert torch.equal(unchanged["depth"], images["depth"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_batch_gets_the_poses_a_cpu_batch_gets():
    images = tensors(make_split([32], size=8).images)
    on_cpu = augment.flip_batch(images, augment.ONLINE_OPS, seeded(7))
    on_gpu = augment.flip_batch({k: v.cuda() for k, v in images.items()},
                                augment.ONLINE_OPS, seeded(7))
    assert all(torch.equal(on_cpu[k], on_gpu[k].cpu()) for k in images)


def test_only_lossless_ops_run_per_batch():
    assert augment.online_ops(["rotate", "flip_left_right", "zoom", "rotate90"]) == (
        "flip_left_right", "rotate90")
    with pytest.raises(ValueError, match="not a per-batch op"):
        augment.flip_batch({"rgb": torch.zeros((2, 4, 4, 3), dtype=torch.uint8)}, ["zoom"],
                           seeded(0))
    with pytest.raises(ValueError, match="square"):
        augment.flip_batch({"rgb": torch.zeros((8, 4, 6, 3), dtype=torch.uint8)},
                           ["rotate90"], seeded(0))
