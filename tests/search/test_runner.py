"""End-to-end: `search run` drives real training trials into a real SQLite study."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
from optuna.artifacts import download_artifact, get_all_artifact_meta
from optuna.trial import TrialState
from typer.testing import CliRunner

import models
from models.backbones import create_backbone
from search.cli import app
from search.trial.artifacts import (
    CHECKPOINT,
    CONFUSION,
    LEARNING_CURVE,
    METRICS,
    create_artifact_store,
)
from tests.search.conftest import make_dataset, write_study

pytestmark = pytest.mark.slow
runner = CliRunner()


def load(name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///runs/{name}/study.db")


def run(*args: str):
    result = runner.invoke(app, ["run", *args])
    assert result.exit_code == 0, result.output
    return result


def test_run_stores_complete_trials_attributes_and_artifacts(workdir, tiny_data):
    study_file = write_study(workdir, tiny_data, n_trials=2)
    result = run("--study", str(study_file))
    assert "best trials" in result.output

    study = load()
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    store = create_artifact_store(workdir / "runs" / "tiny" / "artifacts")
    for trial in trials:
        assert 0.0 <= trial.value <= 1.0
        attrs = trial.user_attrs
        assert set(attrs["per_class_f1"]) == {"green", "red", "yellow"}
        assert attrs["n_params"] > 1_000_000 and attrs["images_per_s"] > 0
        assert {"data_s", "train_s", "val_s", "storage_s", "artifacts_s"} <= set(attrs["timing"])
        metas = get_all_artifact_meta(trial, storage=study._storage)
        files = {m.filename: m.artifact_id for m in metas}
        assert set(files) == {CHECKPOINT, CONFUSION, LEARNING_CURVE, METRICS}
        download_artifact(artifact_store=store, artifact_id=files[METRICS],
                          file_path=str(workdir / "m.json"))
        metrics = json.loads((workdir / "m.json").read_text())
        assert metrics["value"] == pytest.approx(trial.value)
        assert metrics["macro_f1"] == pytest.approx(metrics["history"][metrics["best_epoch"]])
        download_artifact(artifact_store=store, artifact_id=files[CHECKPOINT],
                          file_path=str(workdir / "c.pt"))
        checkpoint = torch.load(workdir / "c.pt", weights_only=True)
        model = models.create_model(models.ModelSpec.from_dict(checkpoint["spec"]))
        model.load_state_dict(checkpoint["state_dict"])
        (workdir / "m.json").unlink()
        (workdir / "c.pt").unlink()


def test_second_run_continues_and_a_finished_study_says_so(workdir, tiny_data):
    study_file = write_study(workdir, tiny_data, n_trials=1, epochs=1)
    run("--study", str(study_file))
    first = load().get_trials()[0]
    run("--study", str(study_file), "--n-trials", "2")
    trials = load().get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert trials[0].datetime_start == first.datetime_start  # not redone
    assert trials[0].value == first.value
    result = run("--study", str(study_file), "--n-trials", "2")
    assert "already finished" in result.output
    assert len(load().get_trials()) == 2


def test_start_points_run_first_and_only_once(workdir, tiny_data):
    study_file = write_study(workdir, tiny_data, n_trials=2, epochs=1, extra=(
        'start_with = [{ fusion = "late", optimizer = "adam", lr = 0.005 },'
        ' { fusion = "early" }]\n'))
    run("--study", str(study_file))
    run("--study", str(study_file), "--n-trials", "3")  # a second run queues neither again
    trials = load().get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert {k: trials[0].params[k] for k in ("fusion", "optimizer", "lr")} == {
        "fusion": "late", "optimizer": "adam", "lr": 0.005}
    assert trials[1].params["fusion"] == "early"
    assert trials[2].system_attrs["fixed_params"] == {}  # a budget trial: all sampled


def test_without_start_points_the_first_trial_is_the_centre_of_the_space(workdir, tiny_data):
    study_file = write_study(workdir, tiny_data, n_trials=1, epochs=1)  # names no start_with
    run("--study", str(study_file))
    [trial] = load().get_trials()
    assert trial.system_attrs["fixed_params"] == {
        "fusion": "joint", "dropout": pytest.approx(0.15), "lr": pytest.approx(10 ** -2.5)}
    assert trial.params["fusion"] == "joint" and trial.state == TrialState.COMPLETE


def test_two_workers_finish_the_shared_budget_exactly(workdir, tiny_data):
    study_file = write_study(workdir, tiny_data, n_trials=5, epochs=1)
    run("--study", str(study_file), "--workers", "2")
    trials = load().get_trials()
    assert len(trials) == 5
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["worker_pid"] for t in trials}) == 2
    logs = "".join(p.read_text() for p in (workdir / "runs" / "tiny" / "logs").glob("*.log"))
    assert "database is locked" not in logs


def test_a_trial_that_raises_fails_with_its_reason_and_the_study_goes_on(workdir, tiny_data):
    weights = workdir / "weights"
    weights.mkdir()
    b0 = create_backbone("b0", implementation="efficientnet-pytorch", image_size=32)
    torch.save(dict(b0.net.state_dict()), weights / "b0.pth")  # a usable local checkpoint
    (weights / "b1.pth").write_bytes(b"not a checkpoint")  # b1 trials crash when loading it
    study_file = write_study(workdir, tiny_data, n_trials=3, epochs=1)
    text = study_file.read_text().replace('backbone = ["b0"]', 'backbone = ["b0", "b1"]')
    text = text.replace('pretrained = "none"', f'weights_dir = "{weights}"')
    study_file.write_text(text)
    run("--study", str(study_file))
    trials = load().get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3
    assert failed and all(t.params["backbone"] == "b1" for t in failed)
    assert all(t.user_attrs["fail_reason"] for t in failed)
    assert not [t for t in trials if t.state == TrialState.RUNNING]


def test_a_worker_started_by_hand_keeps_to_the_budget_the_study_holds(workdir, tiny_data):
    study_file = write_study(workdir, tiny_data, n_trials=4, epochs=1, fusion='["none"]')
    run("--study", str(study_file), "--n-trials", "1")  # the study now holds a budget of 1
    assert load().user_attrs["n_trials"] == 1
    joined = runner.invoke(app, ["worker", "--study", str(study_file)])
    assert joined.exit_code == 0, joined.output
    assert "ran 0 trial(s)" in joined.output  # not the study file's 4
    assert len(load().get_trials()) == 1


def test_run_fails_when_its_workers_stop_with_the_budget_unspent(workdir, tiny_data):
    weights = workdir / "weights"
    weights.mkdir()
    (weights / "b0.pth").write_bytes(b"not a checkpoint")  # every trial raises
    study_file = write_study(workdir, tiny_data, n_trials=2, epochs=1, fusion='["none"]')
    study_file.write_text(study_file.read_text().replace(
        'pretrained = "none"', f'weights_dir = "{weights}"'))
    result = runner.invoke(app, ["run", "--study", str(study_file)])
    assert result.exit_code == 1, result.output
    assert "worker(s) stopped with an error" in result.output
    assert "trials raised an error" in result.output  # the worker's own reason is shown too


def test_hyperband_prunes_poor_trials(workdir):
    # Noisy colours and a huge lr range: some trials learn, others cannot, so rungs differ.
    data = make_dataset(workdir / "data", counts={"red": 10, "green": 10, "yellow": 10},
                        noise=60.0)
    study_file = write_study(workdir, data, n_trials=8, epochs=4, pruner="hyperband",
                             fusion='["none"]')
    text = study_file.read_text().replace("low = 1e-3, high = 1e-2", "low = 1e-6, high = 3.0")
    study_file.write_text(text.replace('optimizer = ["adam", "adamw"]', 'optimizer = ["sgd"]'))
    run("--study", str(study_file))
    states = [t.state for t in load().get_trials()]
    assert states.count(TrialState.PRUNED) >= 1
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 8


def test_sampled_fusion_always_fits_the_modalities(workdir):
    data = make_dataset(workdir / "data", modalities=("rgb", "text"))
    study_file = write_study(workdir, data, n_trials=3, epochs=1,
                             modalities='["rgb", "text"]', fusion='["none", "joint", "late"]')
    run("--study", str(study_file))
    for trial in load().get_trials():
        fusion = trial.params["fusion"]
        assert fusion == "none" or "text" in models.fusion_accepts(fusion)
        assert trial.state == TrialState.COMPLETE
