"""Per-batch random-resized crops: exact geometry, aligned across modalities, seeded."""

from __future__ import annotations

import pytest
import torch

import augment
from augment.crop import SCALE, Boxes, draw_boxes, resize_boxes


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(n: int = 16, side: int = 20, channels: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (n, side, side, channels), generator=seeded(9),
                         dtype=torch.uint8)


def test_a_box_the_size_of_the_output_is_the_slice_of_the_image():
    images = batch(2)
    boxes = Boxes(*(torch.tensor(v, dtype=torch.float32)
                    for v in ([2.0, 0.0], [3.0, 0.0], [5.0, 20.0], [5.0, 20.0])))
    out = resize_boxes(images, boxes, 5)
    assert out.dtype == torch.float32 and out.shape == (2, 5, 5, 3)
    # float32 grid coordinates: exact up to ~1e-4 of a grey level
    torch.testing.assert_close(out[0], images[0, 3:8, 2:7].float(), atol=1e-3, rtol=0)
    # The whole image at a smaller size is a plain bilinear resize (pixel centres aligned).
    whole = torch.nn.functional.interpolate(images[1:].permute(0, 3, 1, 2).float(), size=5,
                                            mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[1], whole[0].permute(1, 2, 0), atol=1e-3, rtol=0)


def test_same_box_for_every_modality_and_the_training_size_out():
    rgb = batch()
    out = augment.crop_batch({"rgb": rgb, "depth": rgb[..., :1].clone()}, 8, seeded(0))
    assert out["rgb"].shape == (16, 8, 8, 3) and out["depth"].shape == (16, 8, 8, 1)
    assert torch.equal(out["depth"], out["rgb"][..., :1])  # depth stays aligned with rgb


def test_crops_follow_the_seed_and_differ_per_sample_and_batch():
    images = {"rgb": batch()}
    first = augment.crop_batch(images, 8, seeded(1))["rgb"]
    assert torch.equal(first, augment.crop_batch(images, 8, seeded(1))["rgb"])
    generator = seeded(1)
    augment.crop_batch(images, 8, generator)
    assert not torch.equal(first, augment.crop_batch(images, 8, generator)["rgb"])
    boxes = draw_boxes(16, 20, 20, seeded(1))
    assert len({(a, b, c, d) for a, b, c, d in zip(*(v.tolist() for v in vars(boxes).values()),
                                                     strict=True)}) > 8


def test_boxes_lie_inside_the_image_within_the_scale_range():
    boxes = draw_boxes(2000, 25, 25, seeded(2))
    assert bool((boxes.left >= 0).all() and (boxes.top >= 0).all())
    assert bool((boxes.left + boxes.width <= 25).all() and (boxes.top + boxes.height <= 25).all())
    share = boxes.width * boxes.height / 625
    # Rounding the sides to whole pixels moves the area a little past the bounds.
    assert float(share.min()) > SCALE[0] * 0.85 and float(share.max()) <= 1.0
    assert 0.5 < float(share.mean()) < 0.75  # uniform in [0.25, 1], less the boxes that miss


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_batch_gets_the_crops_a_cpu_batch_gets():
    images = {"rgb": batch(), "depth": batch(channels=1)}
    on_cpu = augment.crop_batch(images, 8, seeded(7))
    on_gpu = augment.crop_batch({k: v.cuda() for k, v in images.items()}, 8, seeded(7))
    for name in images:  # the same boxes; bilinear weights differ in the last bits only
        torch.testing.assert_close(on_gpu[name].cpu(), on_cpu[name], atol=1e-2, rtol=0)
