"""``[train] pretrained``: ImageNet weights from the PyTorch hub cache, a folder, or none.

No test downloads anything: ``SEARCH_OFFLINE=1`` forbids it, and each test gets an empty hub
cache of its own (``TORCH_HOME``), pre-seeded with files of the exact names the libraries'
loaders read: the state dict of a randomly initialised network of the right architecture,
so that a test can tell those weights from any fresh initialisation.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from efficientnet_pytorch import EfficientNet
from torchvision import models as tv_models
from typer.testing import CliRunner

import models
from search.cli import app
from search.config import read_study_file
from search.errors import ConfigError
from search.trial.objective import check_pretrained, load_pretrained
from tests.search.conftest import write_study

runner = CliRunner()

# The names efficientnet-pytorch's url_map and torchvision's weights enums download as.
FILES = {
    ("b0", "efficientnet-pytorch"): "efficientnet-b0-355c32eb.pth",
    ("b3", "efficientnet-pytorch"): "efficientnet-b3-5fb5a3c3.pth",
    ("b0", "torchvision"): "efficientnet_b0_rwightman-7f5810bc.pth",
    ("b3", "torchvision"): "efficientnet_b3_rwightman-b3899882.pth",
}


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty PyTorch hub cache, and no downloads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("SEARCH_OFFLINE", "1")
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


def full_network(backbone: str, implementation: str) -> torch.nn.Module:
    """The implementation's own ImageNet architecture, classifier included, random weights."""
    if implementation == "torchvision":
        return getattr(tv_models, f"efficientnet_{backbone}")(weights=None)
    return EfficientNet.from_name(f"efficientnet-{backbone}")


def seed_cache(hub: Path, backbone: str, implementation: str, *, as_backbone: str | None = None,
               ) -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    state = full_network(as_backbone or backbone, implementation).state_dict()
    torch.save(state, hub / FILES[backbone, implementation])
    return state


def study(workdir: Path, data: Path, *, backbones: str = '["b0", "b3"]',
          implementation: str = "efficientnet-pytorch", **kwargs) -> Path:
    path = write_study(workdir, data, **kwargs)
    text = path.read_text().replace('pretrained = "none"', 'pretrained = "imagenet"\n'
                                    f'implementation = "{implementation}"')
    path.write_text(text.replace('backbone = ["b0"]', f"backbone = {backbones}"))
    return path


@pytest.mark.parametrize("implementation", ["efficientnet-pytorch", "torchvision"])
@pytest.mark.parametrize("backbone", ["b0", "b3"])
def test_weights_in_the_hub_cache_reach_the_network(hub, workdir, tiny_data, backbone,
                                                    implementation):
    state = seed_cache(hub, backbone, implementation)
    config = read_study_file(str(study(workdir, tiny_data, backbones=f'["{backbone}"]',
                                       implementation=implementation)))
    check_pretrained(config)  # what `search run` and `search worker` do first
    spec = models.ModelSpec(num_classes=3, backbone=backbone, resolution=32,
                            implementation=implementation)
    model = models.create_model(spec, pretrained=load_pretrained(config.train, backbone))
    loaded = model.backbone.net.state_dict()
    classifier = model.backbone.classifier_prefixes
    compared = [k for k in state if not k.startswith(classifier)]
    assert len(compared) == len(loaded) > 100
    for key in compared:
        assert torch.equal(loaded[key], state[key]), key


def test_an_empty_cache_offline_is_one_line_before_any_worker_starts(hub, workdir, tiny_data):
    seed_cache(hub, "b0", "efficientnet-pytorch")  # b0 is there, b3 is not
    path = study(workdir, tiny_data)
    result = runner.invoke(app, ["run", "--study", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    line = lines[0]
    for part in ("train.pretrained", "backbone b3", FILES["b3", "efficientnet-pytorch"],
                 str(hub), 'pretrained = "none"'):
        assert part in line
    assert not (workdir / "runs" / "tiny").exists()  # no study, no worker, no log


def test_a_wrong_size_file_is_a_clear_error(hub, workdir, tiny_data):
    seed_cache(hub, "b0", "torchvision")
    seed_cache(hub, "b3", "torchvision", as_backbone="b0")  # b0 weights under b3's name
    config = read_study_file(str(study(workdir, tiny_data, implementation="torchvision")))
    with pytest.raises(ConfigError) as caught:
        check_pretrained(config)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{hub / FILES['b3', 'torchvision']} is not the ImageNet checkpoint of b3" in message
    assert "do not fit EfficientNet-b3" in message


def test_an_unreadable_file_is_a_clear_error(hub, workdir, tiny_data):
    seed_cache(hub, "b0", "efficientnet-pytorch")
    (hub / FILES["b3", "efficientnet-pytorch"]).write_bytes(b"half a download")
    config = read_study_file(str(study(workdir, tiny_data)))
    with pytest.raises(ConfigError, match=r"cannot read the ImageNet weights of b3 in .*"
                                          r"delete the file to download it again"):
        check_pretrained(config)


def test_lite_weights_need_no_cache_and_a_trial_trains_from_them(hub, workdir, tiny_data):
    path = study(workdir, tiny_data, backbones='["lite0"]', n_trials=1, epochs=1,
                 fusion='["none"]')
    result = runner.invoke(app, ["run", "--study", str(path)])
    assert result.exit_code == 0, result.output
    trial = optuna.load_study(study_name="tiny", storage="sqlite:///runs/tiny/study.db").trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.user_attrs["model_spec"]["backbone"] == "lite0"
    assert not any(hub.iterdir())  # nothing was fetched into the hub cache


def test_pretrained_key_and_the_weights_dir_alias(workdir, tiny_data):
    path = write_study(workdir, tiny_data)
    assert read_study_file(str(path)).train.pretrained == "none"
    path.write_text(path.read_text().replace('pretrained = "none"\n', ""))
    assert read_study_file(str(path)).train.pretrained == "imagenet"  # the default
    weights = workdir / "weights"
    weights.mkdir()
    (weights / "b0.pth").write_bytes(b"")
    for key in ("pretrained", "weights_dir"):
        text = path.read_text()
        path.write_text(text.replace("threads = 1", f'threads = 1\n{key} = "{weights}"'))
        train = read_study_file(str(path)).train
        assert train.pretrained == weights == train.weights_dir
        path.write_text(path.read_text().replace(f'{key} = "{weights}"\n', ""))
    path.write_text(path.read_text().replace(
        "threads = 1", f'threads = 1\npretrained = "none"\nweights_dir = "{weights}"'))
    with pytest.raises(ConfigError, match="keep pretrained only"):
        read_study_file(str(path))
    path.write_text(path.read_text().replace(f'weights_dir = "{weights}"', ""))
    path.write_text(path.read_text().replace('pretrained = "none"', 'pretrained = "nowhere/"'))
    with pytest.raises(ConfigError, match=r"train.pretrained: folder nowhere does not exist"):
        read_study_file(str(path))
