"""The CPU's one-pass poses, crops and normalisation give what the GPU's tensor ops give."""

from __future__ import annotations

import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

import augment
from augment.fused import _Outputs
from augment.online import Poses
from search.data.decode import PIXEL_SCALE
from search.data.prepared import Split

CPU = torch.device("cpu")
PLAIN = {"x": ([1.0] * 3, [0.0] * 3)}  # no normalisation: pixel values out


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int, side: int, channels: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, channels), np.uint8)


def tensor_path(batch: np.ndarray, generator: torch.Generator, crop_to: int | None,
                mean: list[float], std: list[float]) -> torch.Tensor:
    """What a GPU does: augment.flip_batch, augment.crop_batch, then normalise."""
    posed = augment.flip_batch({"x": torch.from_numpy(batch)}, augment.ONLINE_OPS, generator)
    if crop_to:
        posed = augment.crop_batch(posed, crop_to, generator)
    pixels = posed["x"].float() * PIXEL_SCALE
    return (pixels - torch.tensor(mean)) / torch.tensor(std)


@pytest.mark.parametrize("channels", [3, 1, 2])  # rgb, depth, and the generic kernel
@pytest.mark.parametrize("crop_to", [None, 9])
def test_same_pixels_as_the_tensor_ops(channels, crop_to):
    batch = images(40, 13, channels)  # odd sides: the centre row and column move too
    mean, std = [0.4, 0.5, 0.6][:channels], [0.2, 0.25, 0.3][:channels]
    expected = tensor_path(batch, seeded(5), crop_to, mean, std)
    generator = seeded(5)  # the same draws, in the same order
    poses = augment.draw_poses(40, augment.ONLINE_OPS, generator)
    boxes = augment.draw_boxes(40, 13, 13, generator) if crop_to else None
    scale = [PIXEL_SCALE / s for s in std]
    shift = [-m / s for m, s in zip(mean, std, strict=True)]
    got = augment.posed_crops({"x": batch}, poses, boxes, crop_to, {"x": (scale, shift)})["x"]
    assert got.dtype == torch.float32 and got.shape == expected.shape
    # A multiply-add for a division, and the crop's bilinear weights computed apart.
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=0)
    assert len(set(poses.turns.tolist())) == 4 and poses.left_right.any()  # all poses ran


def test_without_a_crop_the_pixels_are_only_moved():
    batch = images(32, 7, 3)
    poses = augment.draw_poses(32, augment.ONLINE_OPS, seeded(1))
    got = augment.posed_crops({"x": batch}, poses, None, None, PLAIN)["x"]
    expected = augment.flip_batch({"x": torch.from_numpy(batch)}, augment.ONLINE_OPS, seeded(1))
    assert torch.equal(got, expected["x"].float())


def test_the_threads_split_the_samples_not_the_result():
    batch = images(21, 16, 3)
    generator = seeded(2)
    poses = augment.draw_poses(21, augment.ONLINE_OPS, generator)
    boxes = augment.draw_boxes(21, 16, 16, generator)
    depth = batch[..., :1].copy()
    runs = [augment.posed_crops({"x": batch, "depth": depth}, poses, boxes, 12,
                                {**PLAIN, "depth": ([1.0], [0.0])}, threads=t)
            for t in (1, 2, 5, 64)]
    for other in runs[1:]:
        assert all(torch.equal(runs[0][name], other[name]) for name in ("x", "depth"))
    assert torch.equal(runs[0]["depth"], runs[0]["x"][..., :1])  # one box for both


def test_turns_need_square_images():
    turned = Poses(torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool),
                   torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="square"):
        augment.posed_crops({"x": np.zeros((2, 4, 6, 3), np.uint8)}, turned, None, None, PLAIN)


@pytest.mark.parametrize("crop_to", [None, 10])
def test_a_cpu_training_batch_is_the_gpu_path_run_on_the_cpu(crop_to):
    """Split.to_device on a CPU draws what the tensor path draws, in the same order."""
    side = 14 if crop_to else 10
    rgb, depth = images(24, side, 3, seed=1), images(24, side, 1, seed=2)
    split = Split(labels=np.arange(24) % 3, images={"rgb": rgb, "depth": depth},
                  flip_ops=augment.ONLINE_OPS, crop_to=crop_to, generator=seeded(8))
    rows = np.arange(24)[::-1].copy()
    got = split.batch(rows, CPU, channels_last=True)  # read from the arrays by row
    assert got["rgb"].is_contiguous(memory_format=torch.channels_last)
    twin = Split(labels=split.labels, images=split.images, flip_ops=augment.ONLINE_OPS,
                 crop_to=crop_to, generator=seeded(8))
    gathered, labels = twin.to_device(twin.gather(rows), CPU, channels_last=True)
    assert all(torch.equal(got[name], gathered[name]) for name in ("rgb", "depth"))
    assert labels.tolist() == (rows % 3).tolist()
    generator = seeded(8)
    posed = augment.flip_batch({"rgb": torch.from_numpy(rgb[rows]),
                                "depth": torch.from_numpy(depth[rows])},
                               augment.ONLINE_OPS, generator)
    if crop_to:
        posed = augment.crop_batch(posed, crop_to, generator)
    for name, (mean, std) in {"rgb": (split.rgb_mean, split.rgb_std),
                              "depth": ((0.5,), (0.25,))}.items():
        pixels = posed[name].float() * PIXEL_SCALE
        expected = ((pixels - torch.tensor(mean)) / torch.tensor(std)).permute(0, 3, 1, 2)
        torch.testing.assert_close(got[name], expected, atol=2e-4, rtol=0)
    # The next batch gets fresh draws.
    assert not torch.equal(got["rgb"], split.batch(rows, CPU, channels_last=True)["rgb"])


def test_no_writable_cache_folder_means_compiling_not_failing():
    """numba refuses cache=True at import where it can write no cache; we compile instead."""
    program = ("import numpy as np, torch, augment\n"
               "poses = augment.draw_poses(2, augment.ONLINE_OPS, torch.Generator())\n"
               "out = augment.posed_crops({'d': np.full((2, 4, 4, 1), 51, np.uint8)}, poses, None,"
               " None, {'d': ([0.02], [0.0])})\n"
               "print(float(out['d'].max()))\n")
    # The IPython locator is the only one allowed, and it finds nothing for a .py file.
    env = {**os.environ, "NUMBA_CACHE_LOCATOR_CLASSES": "_IPythonCacheLocator"}
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).parents[2], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout) == pytest.approx(1.02)


def test_rows_are_read_from_the_arrays_as_a_gathered_batch_would_give():
    arrays = images(30, 12, 3)
    rows = np.array([29, 0, 7, 7, 15])
    generator = seeded(4)
    poses = augment.draw_poses(5, augment.ONLINE_OPS, generator)
    boxes = augment.draw_boxes(5, 12, 12, generator)
    picked = augment.posed_crops({"x": arrays}, poses, boxes, 8, PLAIN, rows=rows)["x"]
    gathered = augment.posed_crops({"x": arrays[rows]}, poses, boxes, 8, PLAIN)["x"]
    assert torch.equal(picked, gathered)
    strided = augment.posed_crops({"x": arrays[:, :, :, ::-1]}, poses, boxes, 8, PLAIN,
                                  rows=rows)["x"]  # not C-contiguous: gathered first
    copied = np.ascontiguousarray(arrays[rows, :, :, ::-1])
    assert torch.equal(strided, augment.posed_crops({"x": copied}, poses, boxes, 8, PLAIN)["x"])
    with pytest.raises(IndexError, match="out of range"):
        augment.posed_crops({"x": arrays}, poses, boxes, 8, PLAIN, rows=rows + 1)


def test_an_output_array_is_reused_only_once_nothing_holds_it():
    batch = images(3, 11, 3, seed=6)  # a shape no other test makes: its own arrays
    poses = augment.draw_poses(3, augment.ONLINE_OPS, seeded(3))

    def run() -> torch.Tensor:
        return augment.posed_crops({"x": batch}, poses, None, None, PLAIN)["x"]

    first = run()
    held = [run().permute(0, 3, 1, 2) for _ in range(3)]  # a view keeps its array too
    pointers = {t.data_ptr() for t in [first, *held]}
    assert len(pointers) == 4  # nothing handed out twice while held
    expected = first.clone()
    address = first.data_ptr()
    del first
    again = run()
    assert again.data_ptr() == address  # the released array, reused
    assert torch.equal(again, expected) and all(torch.equal(t.permute(0, 2, 3, 1), expected)
                                                for t in held)


def test_the_pool_lets_go_of_shapes_no_longer_made():
    pool = _Outputs()
    array = pool.take((2, 2))
    kept = weakref.ref(array)
    del array
    for side in range(3, 3 + _Outputs.SHAPES - 1):
        pool.take((side, 2))
    assert kept() is not None  # still among the latest shapes: kept for reuse
    pool.take((99, 2))
    assert kept() is None  # one shape too many: the oldest is let go
