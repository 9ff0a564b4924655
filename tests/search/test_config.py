"""Study-file parsing: every bad input is one line naming the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from search.config import read_study_file, resolve_study_path
from search.errors import ConfigError
from search.space import Categorical, Range

GOOD = """
[study]
n_trials = 5
seed = 3

[data]
root = "{root}"
modalities = ["rgb", "depth"]

[augment]
balance = ["oversample", "none"]
ops = ["flip_left_right"]

[train]
epochs = 2
resolution = 32

[space]
backbone = ["b0", "b1"]
fusion = ["none", "early", "joint", "late"]
dropout = [0.0, 0.5]
optimizer = ["adam", "sgd"]
lr = {{ low = 1e-4, high = 1e-1, log = true }}
batch_size = {{ choices = [16, 32] }}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(text.replace("{root}", str(tmp_path)))
    return path


def good_text() -> str:
    return GOOD.replace("{{", "{").replace("}}", "}")


def test_good_study_parses_into_typed_objects(tmp_path):
    config = read_study_file(str(write(tmp_path, good_text())))
    assert config.name == "study"
    assert config.study.n_trials == 5
    assert config.data.second_modality == "depth"
    assert config.space.balance == Categorical(("oversample", "none"))  # [augment] alias
    assert config.space.dropout == Range(0.0, 0.5)
    assert config.space.lr == Range(1e-4, 1e-1, log=True)
    assert config.space.batch_size == Categorical((16, 32))
    assert config.space.backbone == Categorical(("b0", "b1"))


def test_start_points_keep_the_values_the_space_can_draw(tmp_path):
    text = good_text() + (
        '\n[sampler]\nstart_with = [{ fusion = "joint", lr = 3e-3, batch_size = 16 },'
        ' { balance = "none" }]\n')
    config = read_study_file(str(write(tmp_path, text)))
    assert config.sampler.start_with == [{"fusion": "joint", "lr": 3e-3, "batch_size": 16},
                                         {"balance": "none"}]


def test_without_start_with_the_first_trial_is_the_centre_of_the_space(tmp_path):
    config = read_study_file(str(write(tmp_path, good_text())))
    [point] = config.start_points()
    assert point == {"fusion": "joint", "dropout": 0.25, "lr": pytest.approx(10 ** -2.5)}
    text = good_text().replace('fusion = ["none", "early", "joint", "late"]',
                               'fusion = ["none", "late", "early"]')
    text = text.replace("dropout = [0.0, 0.5]", "dropout = { low = 0.0, high = 0.5, step = 0.2 }")
    text = text.replace("batch_size = { choices = [16, 32] }", "batch_size = [16, 64]")
    point = read_study_file(str(write(tmp_path, text))).start_points()[0]
    assert point["fusion"] == "late" and point["dropout"] == pytest.approx(0.2)
    assert point["batch_size"] == 40 and isinstance(point["batch_size"], int)
    for point in config.start_points()[0].items():
        assert config.space.get(point[0]).describe_miss(point[1]) is None


def test_start_with_replaces_the_centre_and_an_empty_list_means_none(tmp_path):
    text = good_text() + '\n[sampler]\nstart_with = [{ fusion = "none" }]\n'
    assert read_study_file(str(write(tmp_path, text))).start_points() == [{"fusion": "none"}]
    empty = good_text() + "\n[sampler]\nstart_with = []\n"
    assert read_study_file(str(write(tmp_path, empty))).start_points() == []
    rgb_only = good_text().replace('fusion = ["none", "early", "joint", "late"]',
                                   'fusion = ["none"]')
    assert "fusion" not in read_study_file(str(write(tmp_path, rgb_only))).start_points()[0]


@pytest.mark.parametrize(("study", "second"), [("apples", "depth"), ("garbage", "text")])
def test_the_shipped_studies_are_valid(study, second):
    config = read_study_file(study)
    assert config.name == config.data.demo == study
    assert config.data.second_modality == second


def test_name_resolves_to_studies_folder(tmp_path):
    assert resolve_study_path("apples") == Path("studies/apples.toml")
    assert resolve_study_path("x/y.toml") == Path("x/y.toml")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("[study]", "[study]\ncolour = 1"), "study.colour: unknown key"),
        (("[train]", "[train]\nepochz = 3"), "train.epochz: unknown key"),
        (("[nonsense]", None), None),
        (("n_trials = 5", 'n_trials = "five"'), "study.n_trials"),
        (("n_trials = 5", "n_trials = 0"), "study.n_trials"),
        (("log = true", "log = true, step = 2"), "space.lr"),
        (("low = 1e-4", "low = 0.0"), "space.lr"),
        (("low = 1e-4, high = 1e-1, log = true", "low = 0.1, high = 0.01"), "low must be < high"),
        (("dropout = [0.0, 0.5]", "dropout = [0.5, 0.1]"), "space.dropout"),
        (('backbone = ["b0", "b1"]', 'backbone = ["b0", "b9"]'), "'b9'"),
        (('optimizer = ["adam", "sgd"]', 'optimizer = ["lion"]'), "'lion'"),
        (('fusion = ["none", "early", "joint", "late"]', 'fusion = ["cross"]'), "'cross'"),
        (('modalities = ["rgb", "depth"]', 'modalities = ["depth", "rgb"]'), "data.modalities"),
        (('modalities = ["rgb", "depth"]', 'modalities = ["rgb", "depth", "text"]'),
         "data.modalities"),
        (('modalities = ["rgb", "depth"]', 'modalities = ["rgb", "sonar"]'), "'sonar'"),
        (('modalities = ["rgb", "depth"]', 'modalities = ["rgb"]'), "space.fusion"),
        (('modalities = ["rgb", "depth"]', 'modalities = ["rgb", "text"]'), "'early'"),
        (('ops = ["flip_left_right"]', 'ops = ["melt"]'), "melt"),
        (('balance = ["oversample", "none"]', 'balance = "smote"'), "augment.balance"),
        (("resolution = 32", "resolution = 8"), "train.resolution"),
        (("seed = 3", "seed = -1"), "study.seed"),
        (("resolution = 32", 'resolution = 32\nimplementation = "timm"'),
         "train.implementation: unknown implementation 'timm'"),
        (("[study]", "[sampler]\nstart_with = [{ lr = 0.5 }]\n[study]"),
         "sampler.start_with[0].lr: 0.5 is outside the range [0.0001, 0.1]"),
        (("[study]", '[sampler]\nstart_with = [{}, { fusion = "cross" }]\n[study]'),
         "sampler.start_with[1].fusion: 'cross' is not one of"),
        (("[study]", "[sampler]\nstart_with = [{ colour = 1 }]\n[study]"),
         "sampler.start_with[0].colour: not a parameter of [space]"),
        (("[study]", '[sampler]\nstart_with = [{ balance = "class_weights" }]\n[study]'),
         "sampler.start_with[0].balance: 'class_weights' is not one of ['oversample', 'none']"),
        (("[study]", "[sampler]\nstart_with = [{ batch_size = 64 }]\n[study]"),
         "sampler.start_with[0].batch_size: 64 is not one of [16, 32]"),
        (("[study]", "[sampler]\nstart_with = [{ weight_decay = 0.1 }]\n[study]"),
         "sampler.start_with[0].weight_decay: 0.1 is not one of [0.0]"),
    ],
)
def test_bad_study_is_one_line_naming_the_key(tmp_path, change, expected):
    old, new = change
    text = good_text()
    if new is None:
        text += f"\n{old}\nx = 1\n"
        expected = "nonsense: unknown key"
    else:
        assert old in text
        text = text.replace(old, new, 1)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        read_study_file(str(path))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message


def test_weights_dir_must_hold_weights_for_every_backbone_of_the_space(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "efficientnet-b0-355c32eb.pth").write_bytes(b"")
    text = good_text().replace("resolution = 32", f'resolution = 32\nweights_dir = "{weights}"')
    with pytest.raises(ConfigError, match=r"train.pretrained: no weights for \['b1'\]"):
        read_study_file(str(write(tmp_path, text)))
    (weights / "b1.pth").write_bytes(b"")
    assert read_study_file(str(write(tmp_path, text))).train.weights_dir == weights


def test_bad_toml_names_the_file(tmp_path):
    path = write(tmp_path, "[study\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_study_file(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="study file not found"):
        read_study_file(str(tmp_path / "nope.toml"))


def test_missing_data_root_without_demo(tmp_path):
    text = good_text().replace('root = "{root}"', 'root = "/no/such/folder"')
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"data\.root: folder /no/such/folder does not exist"):
        read_study_file(str(path))


def test_storage_precedence(tmp_path, monkeypatch):
    config = read_study_file(str(write(tmp_path, good_text())))
    monkeypatch.delenv("SEARCH_STORAGE", raising=False)
    assert config.storage_url() == "sqlite:///runs/study/study.db"
    monkeypatch.setenv("SEARCH_STORAGE", "sqlite:///env.db")
    assert config.storage_url() == "sqlite:///env.db"
    assert config.storage_url("sqlite:///flag.db") == "sqlite:///flag.db"


@pytest.mark.parametrize(("kind", "expected"), [
    ("hyperband", "HyperbandPruner"), ("successive_halving", "SuccessiveHalvingPruner"),
    ("median", "MedianPruner"), ("none", "NopPruner"),
])
def test_every_pruner_kind_makes_optunas_pruner(tmp_path, kind, expected):
    from search.study.open import make_pruner

    text = good_text() + f'\n[pruner]\nkind = "{kind}"\nmin_resource = 2\n'
    pruner = make_pruner(read_study_file(str(write(tmp_path, text))))
    assert type(pruner).__name__ == expected


def test_the_default_pruner_decides_at_half_the_epochs(tmp_path):
    from search.study.open import make_pruner

    text = good_text().replace("epochs = 2", "epochs = 12")
    config = read_study_file(str(write(tmp_path, text)))
    assert (config.pruner.kind, config.pruner.first_step(12)) == ("successive_halving", (6, 6))
    pruner = make_pruner(config)
    assert (pruner._min_resource, pruner._reduction_factor) == (6, 2)
    explicit = text + '\n[pruner]\nkind = "median"\nmin_resource = 3\nn_warmup_steps = 2\n'
    assert read_study_file(str(write(tmp_path, explicit))).pruner.first_step(12) == (3, 2)
    assert config.pruner.first_step(1) == (1, 1)  # never a rung at step 0
