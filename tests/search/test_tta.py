"""Test-time augmentation ([space] tta): the mean over the study's own views, also in ONNX."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import models
from search.bundle.export import export_graph
from search.trial.tta import TTAModel, tta_ops


def test_views_are_the_studys_own_lossless_ops():
    ops = ["flip_left_right", "rotate", "zoom", "rotate90"]
    assert tta_ops("flips", ops) == ("flip_left_right", "rotate90")
    assert tta_ops("none", ops) == ()
    with pytest.raises(ValueError, match="tta must be one of"):
        tta_ops("mirror", ops)


def _model() -> models.FusionModel:
    torch.manual_seed(0)
    spec = models.ModelSpec(backbone="b0", fusion="early", num_classes=3, modality="depth",
                            resolution=32)
    return models.prepare_for_export(models.create_model(spec))


class _Positional(torch.nn.Module):
    """Logits from where the bright pixels are: flips and turns change them."""

    input_names = ("rgb", "depth")

    def forward(self, batch: dict) -> torch.Tensor:
        rgb, depth = batch["rgb"], batch["depth"]
        return torch.stack([rgb[:, :, :, :16].mean((1, 2, 3)), rgb[:, :, :16, :].mean((1, 2, 3)),
                            depth[:, :, :16, :16].mean((1, 2, 3))], dim=1) * 5


@torch.no_grad()
def test_the_output_is_the_log_mean_probability_over_views():
    model = _Positional()
    batch = {"rgb": torch.randn(2, 3, 32, 32), "depth": torch.randn(2, 1, 32, 32)}
    tta = TTAModel(model, ("flip_left_right", "rotate90"))
    views = [batch,
             {k: torch.flip(v, dims=(3,)) for k, v in batch.items()},
             {k: torch.rot90(v, 1, dims=(2, 3)) for k, v in batch.items()}]
    expected = torch.stack([torch.softmax(model(v), 1) for v in views]).mean(0).log()
    torch.testing.assert_close(tta(batch), expected)
    # The model is not flip invariant, so the views change the answer.
    assert not torch.allclose(tta(batch), torch.log_softmax(model(batch), 1), atol=1e-4)


@pytest.mark.slow
@torch.no_grad()
def test_the_views_export_to_onnx(tmp_path):
    tta = TTAModel(_model(), ("flip_left_right", "flip_top_bottom", "rotate90"))
    example = {"rgb": torch.randn(2, 3, 32, 32), "depth": torch.randn(2, 1, 32, 32)}
    export_graph(tta, example, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    batch = {"rgb": torch.randn(5, 3, 32, 32), "depth": torch.randn(5, 1, 32, 32)}
    (logits,) = session.run(["logits"], {k: v.numpy() for k, v in batch.items()})
    np.testing.assert_allclose(logits, tta(batch).numpy(), atol=1e-4)
