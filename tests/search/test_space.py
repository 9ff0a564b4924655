"""The one table of hyperparameters: everything that lists them derives from it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import optuna

import models
from search.config import parse_study
from search.data.decode import MODALITIES
from search.space import HYPERPARAMETERS, LATE_RULES, SearchSpace, readme_space_keys
from search.trial.train import TrialParams

README = Path(__file__).resolve().parents[2] / "README.md"


def test_trial_params_has_one_field_per_row_of_the_table():
    fields = dataclasses.fields(TrialParams)
    assert {f.name for f in fields} == {h.name for h in HYPERPARAMETERS}
    for field in fields:  # the defaults TrialParams has are the table's
        if field.default is not dataclasses.MISSING:
            assert field.default == next(h.default for h in HYPERPARAMETERS
                                         if h.name == field.name)


def test_the_space_schema_has_one_key_per_row():
    assert list(SearchSpace.model_fields) == [h.name for h in HYPERPARAMETERS]


def test_constants_shared_with_models_agree():
    assert models.LATE_RULES == LATE_RULES
    assert set(models.MODALITIES) == set(MODALITIES) - {"rgb"}


def test_readme_lists_every_optional_space_key():
    text = README.read_text()
    block = text[text.index("\n[space] "):text.index("\n[pruner]")]  # the TOML block
    start = block.index("# optional:")
    lines = [line.strip().lstrip("#").strip() for line in block[start:].splitlines()
             if line.strip().startswith("#")]
    assert " ".join(lines) == readme_space_keys().lstrip("#").strip()


def test_augment_balance_is_a_deprecated_alias_of_the_space_key(tmp_path, capsys):
    raw = {"data": {"root": str(tmp_path)}, "augment": {"balance": ["oversample", "none"]}}
    config = parse_study(raw, tmp_path / "s.toml")
    assert config.space.balance.values() == ("oversample", "none")
    assert "[augment] balance is deprecated" in capsys.readouterr().err
    config = parse_study({"data": {"root": str(tmp_path)},
                          "space": {"balance": "class_weights"}}, tmp_path / "s.toml")
    assert config.space.balance.values() == ("class_weights",)


def test_sampling_draws_every_row_in_order(tmp_path):
    raw = {"data": {"root": str(tmp_path), "modalities": ["rgb", "depth"]},
           "space": {"fusion": ["late"], "balance": ["oversample", "class_weights"],
                     "depth_backbone": ["b0", "b1"]}}
    config = parse_study(raw, tmp_path / "s.toml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    from search.trial.objective import sample_params

    params = sample_params(trial, config)
    assert params.batch_size == config.train.batch_size  # not searched: [train]'s
    assert list(trial.params) == ["dropout", "lr", "balance", "depth_backbone", "late_rule"]
    assert re.fullmatch(r"b[01]", params.depth_backbone)
