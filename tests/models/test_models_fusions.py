"""Contract tests run over every registered fusion x every modality it accepts (x late rule)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

import models
from models.fusions.late import _ConfidenceRule


def _first_param_grad(module: torch.nn.Module) -> torch.Tensor:
    # The first parameter is the input layer (stem conv, numeric stem, embedding): a gradient
    # there has crossed the whole encoder.
    return next(module.parameters()).grad


def _assert_gradients_reach_every_encoder(model: models.FusionModel) -> None:
    for modality, encoder in model.encoders().items():
        grad = _first_param_grad(encoder)
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches {modality}"
    if model.name == "early":
        stem_grad = model.backbone.stem.weight.grad
        assert stem_grad[:, 3:].abs().sum() > 0, "no gradient on the extra input channels"


def test_forward_backward(case_spec, make_batch):
    torch.manual_seed(0)
    model = models.create_model(case_spec)
    batch = make_batch(3)
    logits = model(batch)
    assert logits.shape == (3, case_spec.num_classes)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    _assert_gradients_reach_every_encoder(model)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_channels_last_and_bf16_autocast(case_spec, make_batch):
    torch.manual_seed(0)
    model = models.create_model(case_spec).to(memory_format=torch.channels_last)
    batch = make_batch(2)
    for key in ("rgb", "depth"):
        batch[key] = batch[key].contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=models.amp_dtype("cpu")):
        logits = model(batch)
        loss = F.cross_entropy(logits, torch.tensor([0, 2]))
    loss.backward()
    assert logits.shape == (2, case_spec.num_classes)
    assert torch.isfinite(logits.float()).all()
    _assert_gradients_reach_every_encoder(model)


def test_onnx_export_matches_pytorch(case_spec, make_batch, calibrate):
    torch.manual_seed(0)
    model = models.create_model(case_spec)
    calibrate(model, make_batch(32, seed=1))
    wrapped = models.PositionalInputs(models.prepare_for_export(model))
    names = list(wrapped.input_names)
    example = make_batch(2)
    buffer = io.BytesIO()
    # The TorchScript exporter exports a b0 in ~1 s; the dynamo exporter takes 10-20 s, so it
    # is exercised once, in test_dynamo_onnx_export.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            tuple(example[n] for n in names),
            buffer,
            dynamo=False,
            input_names=names,
            output_names=["logits"],
            dynamic_axes={n: {0: "batch"} for n in [*names, "logits"]},
            opset_version=17,
        )
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    batch = make_batch(5, seed=2)  # another batch size: the batch axis is dynamic
    with torch.no_grad():
        expected = model(batch).numpy()
    (actual,) = session.run(None, {n: batch[n].numpy() for n in names})
    assert expected.std(axis=0).max() > 1e-3, "outputs do not depend on the input"
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


def test_dynamo_onnx_export(small_spec, make_batch, calibrate):
    spec = small_spec(fusion="late", modality="text", late_rule="confidence")
    torch.manual_seed(0)
    model = models.create_model(spec)
    calibrate(model, make_batch(32, seed=1))
    wrapped = models.PositionalInputs(models.prepare_for_export(model))
    example = make_batch(2)
    batch_dim = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapped,
            (example["rgb"], example["text"]),
            dynamo=True,
            input_names=["rgb", "text"],
            output_names=["logits"],
            dynamic_shapes=({0: batch_dim}, {0: batch_dim}),
            verbose=False,
        )
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    batch = make_batch(5, seed=2)
    with torch.no_grad():
        expected = model(batch).numpy()
    (actual,) = session.run(None, {"rgb": batch["rgb"].numpy(), "text": batch["text"].numpy()})
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)


def test_none_ignores_the_second_modality(small_spec, make_batch):
    model = models.create_model(small_spec(fusion="none", modality="depth")).eval()
    batch = make_batch(2)
    with torch.no_grad():
        before = model(batch)
        batch["depth"] = batch["depth"] + 5.0
        after = model({"rgb": batch["rgb"], "depth": batch["depth"]})
        alone = model({"rgb": batch["rgb"]})
    torch.testing.assert_close(before, after)
    torch.testing.assert_close(before, alone)


def test_missing_modality_is_a_clear_error(small_spec, make_batch):
    model = models.create_model(small_spec(fusion="joint", modality="numeric"))
    batch = make_batch(2)
    del batch["numeric"]
    with pytest.raises(KeyError, match="batch has no 'numeric'"):
        model(batch)


def test_late_returns_log_probabilities(small_spec, make_batch):
    for rule in models.LATE_RULES:
        model = models.create_model(small_spec(fusion="late", modality="numeric", late_rule=rule))
        with torch.no_grad():
            logits = model.eval()(make_batch(4))
        torch.testing.assert_close(logits.exp().sum(dim=1), torch.ones(4))


def test_confidence_rule_selects_hard_but_trains_both():
    probs = torch.tensor(
        [[[0.7, 0.2, 0.1], [0.4, 0.3, 0.3]], [[0.5, 0.4, 0.1], [0.1, 0.8, 0.1]]],
        requires_grad=True,
    )  # [modality, sample, class]: sample 0 trusts modality 0, sample 1 modality 1
    rule = _ConfidenceRule(2)
    hard = rule.eval()(probs)
    torch.testing.assert_close(hard, torch.stack([probs[0, 0], probs[1, 1]]).detach())
    combined = rule.train()(probs)
    torch.testing.assert_close(combined, hard)  # the same value in training ...
    combined[:, 0].sum().backward()
    # ... yet the modality not selected for a sample still gets its gradient.
    assert probs.grad[0, 1].abs().sum() > 0
    assert probs.grad[1, 0].abs().sum() > 0


def test_autocast_helpers():
    assert models.amp_dtype("cpu") == torch.bfloat16
