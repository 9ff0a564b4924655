"""Fine-tuning: frozen backbones first, a backbone learning rate of its own, and the input
normalization of the backbone's weights in training and in serving alike."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
import torch

import models
from search.config import TrainConfig, parse_study
from search.data.decode import Preprocess, bundle_preprocess_section, normalize_pixels
from search.data.prepared import Split
from search.errors import ConfigError
from search.trial.objective import sample_params, trial_preprocess
from search.trial.train import Speedups, TrialParams, make_optimizer, train

CPU = torch.device("cpu")
PLAIN = Speedups(channels_last=False, autocast_dtype=None)
SPEC = models.ModelSpec(num_classes=2, backbone="b0", fusion="joint", modality="depth",
                        resolution=32, hidden_dim=16)


def split(n: int, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    return Split(labels=np.arange(n) % 2,
                 images={"rgb": rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8),
                         "depth": rng.integers(0, 255, (n, 32, 32, 1), dtype=np.uint8)})


def params(**overrides) -> TrialParams:
    values = {"backbone": "b0", "fusion": "joint", "dropout": 0.0, "optimizer": "adamw",
              "lr": 1e-2, "weight_decay": 0.01, "batch_size": 8, "label_smoothing": 0.0,
              "balance": "none", **overrides}
    return TrialParams(**values)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def fit(model: torch.nn.Module, epochs: int, **overrides) -> None:
    settings = TrainConfig(epochs=epochs, warmup_epochs=0, patience=epochs)
    train(model, split(16), split(8, seed=1), params=params(**overrides), settings=settings,
          device=CPU, speed=PLAIN, num_classes=2, seed=0)


def test_frozen_backbones_keep_weights_and_batch_norm_statistics():
    torch.manual_seed(0)
    model = models.create_model(SPEC)
    assert len(model.backbones()) == 2  # rgb and depth trunks
    trunks = [snapshot(b) for b in model.backbones()]
    head = snapshot(model.head)
    fit(model, epochs=1, freeze_epochs=1)
    for before, backbone in zip(trunks, model.backbones(), strict=True):
        after = backbone.state_dict()
        assert any("running_mean" in k for k in after)  # BN statistics are compared too
        for key, value in before.items():
            assert torch.equal(after[key], value), key
    assert any(not torch.equal(model.head.state_dict()[k], v) for k, v in head.items())


def test_backbones_train_once_the_frozen_epochs_are_over():
    torch.manual_seed(0)
    model = models.create_model(SPEC)
    trunk = snapshot(model.backbone)
    fit(model, epochs=2, freeze_epochs=1)
    after = model.backbone.state_dict()
    assert not torch.equal(after["net._conv_stem.weight"], trunk["net._conv_stem.weight"])
    assert not torch.equal(after["net._bn0.running_mean"], trunk["net._bn0.running_mean"])


def test_the_backbone_lr_is_a_fixed_fraction_of_the_head_lr_at_every_step():
    model = models.create_model(SPEC)
    optimizer = make_optimizer("sgd", model, 0.1, 0.0, backbone_lr_scale=0.25)
    head, trunk = optimizer.param_groups
    inner = {id(p) for b in model.backbones() for p in b.parameters()}
    assert {id(p) for p in trunk["params"]} == inner
    assert len(head["params"]) + len(trunk["params"]) == len(list(model.parameters()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    for _ in range(3):
        assert trunk["lr"] == pytest.approx(0.25 * head["lr"])
        optimizer.step()
        scheduler.step()
    assert head["lr"] == pytest.approx(0.1 / 4)


def test_fine_tuning_keys_are_sampled_and_validated_through_the_table(tmp_path):
    def config(**space):
        return parse_study({"data": {"root": str(tmp_path)}, "space": space},
                           tmp_path / "s.toml")

    default = sample_params(optuna.create_study().ask(), config())
    assert (default.freeze_epochs, default.backbone_lr_scale) == (0, 1.0)
    searched = config(freeze_epochs=[0, 3], backbone_lr_scale={"low": 0.01, "high": 1.0,
                                                              "log": True})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        drawn = sample_params(trial, searched)
        assert isinstance(drawn.freeze_epochs, int) and 0 <= drawn.freeze_epochs <= 3
        assert 0.01 <= drawn.backbone_lr_scale <= 1.0
        assert {"freeze_epochs", "backbone_lr_scale"} <= set(trial.params)
    refused = [({"backbone_lr_scale": [0.0, 1.0]}, "space.backbone_lr_scale: must be >"),
               ({"freeze_epochs": [0.5, 2]}, "space.freeze_epochs: every value must be an int"),
               ({"freeze_epochs": [-1, 2]}, "space.freeze_epochs: must be >= 0")]
    for space, message in refused:
        with pytest.raises(ConfigError, match=message):
            config(**space)


@pytest.mark.parametrize(("backbone", "mean"), [("lite0", 0.5), ("b0", 0.485)])
def test_training_and_serving_normalize_rgb_as_the_weights_expect(backbone, mean):
    preprocess = trial_preprocess(Preprocess(32), backbone).to_dict()
    bundle = bundle_preprocess_section(preprocess, ("rgb",))  # model.json's section
    assert bundle["rgb"]["mean"][0] == mean
    pixels = split(4).images["rgb"]
    served = normalize_pixels(pixels, bundle["rgb"])  # what `search predict` feeds
    trained = Split(np.zeros(4, int), {"rgb": pixels}, rgb_mean=tuple(preprocess["rgb"]["mean"]),
                    rgb_std=tuple(preprocess["rgb"]["std"])).batch(np.arange(4), CPU, False)
    assert served.tobytes() == trained["rgb"].numpy().tobytes()
