"""`search run --dry-run`: the study file and the data checked, the plan printed, nothing run."""

from __future__ import annotations

import re

import optuna
import pytest
import sqlalchemy
import torch
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from search.cli import app
from search.space import HYPERPARAMETERS
from tests.db.conftest import ServerDatabase
from tests.search.conftest import make_dataset, write_study

runner = CliRunner()


def dry_run(study, *args: str):
    return runner.invoke(app, ["run", "--study", str(study), "--dry-run", *args],
                         terminal_width=200)


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def model_size(output: str) -> int:
    found = re.search(r"first trial's model: ([\d,]+) parameters", output)
    assert found, output
    return int(found.group(1).replace(",", ""))


def test_prints_the_plan_and_trains_and_stores_nothing(workdir, tiny_data):
    study = write_study(workdir, tiny_data, n_trials=7)
    study.write_text(study.read_text().replace("seed = 0", "seed = 0\ntimeout_s = 600", 1))
    result = dry_run(study)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "workers: 1 on CPU" in out
    assert "budget: 7 trials" in out and "no new trial after 600 s" in out
    assert "storage: sqlite:///runs/tiny/study.db (new study)" in out
    for hp in HYPERPARAMETERS:  # every [space] key and what a trial draws for it
        assert re.search(rf"^\s+{hp.name}\s+\S", out, re.MULTILINE), hp.name
    assert re.search(r"fusion +one of none, early, joint, late\n", out)
    assert re.search(r"lr +float in \[0.001, 0.01\], log\n", out)
    assert re.search(r"batch_size +8 \(fixed\)\n", out)  # [train] batch_size, not searched
    assert re.search(r"late_rule +one of mean, learned, confidence \(only with fusion late\)", out)
    # The first trial is the centre of the space (joint fusion, middle of every range).
    assert "first trial: backbone=b0, fusion=joint, dropout=0.15," in out
    assert model_size(out) > 1_000_000
    # Nothing trained, nothing stored: no database, no artifacts, no worker logs.
    assert not (workdir / "runs" / "tiny").exists()
    # The data was checked like `search data check` does (and its table printed).
    assert "imbalance (largest / smallest training class)" in out


def test_the_model_size_is_the_first_trials_network(workdir, tiny_data):
    sizes = {}
    for backbone in ("b0", "b1"):
        study = write_study(workdir, tiny_data, name=f"size_{backbone}")
        study.write_text(study.read_text().replace('backbone = ["b0"]',
                                                   f'backbone = ["{backbone}"]'))
        result = dry_run(study)
        assert result.exit_code == 0, result.output
        sizes[backbone] = model_size(result.output)
    assert sizes["b1"] > sizes["b0"]  # b1 is the deeper network
    # A start point that asks for rgb only builds a smaller network than the joint centre.
    study = write_study(workdir, tiny_data, name="rgb_first",
                        extra='start_with = [{ fusion = "none" }]\n')
    result = dry_run(study)
    assert "first trial: backbone=b0, fusion=none," in result.output
    assert model_size(result.output) < sizes["b0"]


def test_an_existing_study_is_reported_and_left_as_it_was(workdir, tiny_data):
    study = write_study(workdir, tiny_data)
    url = f"sqlite:///{workdir / 'held.db'}"
    held = optuna.create_study(study_name="tiny", storage=url, direction="maximize")
    held.enqueue_trial({"dropout": 0.1})
    other = optuna.create_study(study_name="other", storage=url)
    assert other.study_name == "other"
    result = dry_run(study, "--storage", url, "--n-trials", "3", "--workers", "2")
    assert result.exit_code == 0, result.output
    assert "continues a study holding 1 trial(s)" in result.output
    assert "workers: 2 on CPU" in result.output and "budget: 3 trials" in result.output
    assert sorted(optuna.get_all_study_names(url)) == ["other", "tiny"]
    assert len(optuna.load_study(study_name="tiny", storage=url).trials) == 1
    assert "n_trials" not in optuna.load_study(study_name="tiny", storage=url).user_attrs


@pytest.mark.db
def test_a_server_storage_shows_no_password_and_gets_no_study(workdir, tiny_data):
    database = ServerDatabase("postgresql")
    database.create()
    try:
        # The server trusts local connections, so any password is accepted and must not show.
        url = make_url(database.url).set(password="s3cret-pw").render_as_string(
            hide_password=False)
        result = dry_run(write_study(workdir, tiny_data), "--storage", url)
        assert result.exit_code == 0, result.output
        assert "s3cret-pw" not in result.output
        assert "postgres:***@" in result.output and "(new study)" in result.output
        engine = sqlalchemy.create_engine(make_url(database.url).set(
            drivername="postgresql+psycopg"))
        try:
            tables = sqlalchemy.inspect(engine).get_table_names()
            if "studies" in tables:  # Optuna may create its tables; never a study
                with engine.connect() as connection:
                    count = connection.execute(sqlalchemy.text("SELECT count(*) FROM studies"))
                    assert count.scalar() == 0
        finally:
            engine.dispose()
    finally:
        database.drop()


def test_bad_data_is_the_same_one_line_error_as_data_check(workdir):
    data = make_dataset(workdir / "data")
    (data / "train" / "rgb" / "red" / "red3.png").write_bytes(b"\x89PNG broken")
    study = write_study(workdir, data)
    checked = one_line_error(runner.invoke(app, ["data", "check", "--study", str(study)]))
    assert "red3.png" in checked
    assert one_line_error(dry_run(study)) == checked

    one_class = make_dataset(workdir / "one", counts={"red": 5})
    study = write_study(workdir, one_class, name="one")
    checked = one_line_error(runner.invoke(app, ["data", "check", "--study", str(study)]))
    assert one_line_error(dry_run(study)) == checked
    assert not (workdir / "runs" / "tiny").exists() and not (workdir / "runs" / "one").exists()


def test_a_bad_study_file_is_one_line(workdir, tiny_data):
    study = write_study(workdir, tiny_data)
    study.write_text(study.read_text().replace("[train]", "[train]\nepochz = 3"))
    assert "train.epochz: unknown key" in one_line_error(dry_run(study))


def test_a_study_written_by_init_passes_the_dry_run(workdir):
    make_dataset(workdir / "fruit", modalities=("rgb", "numeric"))
    assert runner.invoke(app, ["init", "--data", "fruit"]).exit_code == 0
    path = workdir / "studies" / "fruit.toml"
    # On a CPU init picks lite0, whose ImageNet weights ship with the package: no network.
    text = path.read_text()
    assert 'backbone = ["lite0"]' in text and 'pretrained = "imagenet"' in text
    result = dry_run("fruit")
    assert result.exit_code == 0, result.output
    assert "first trial's model:" in result.output
    assert not (workdir / "runs" / "fruit").exists()


def test_a_missing_gpu_or_a_bad_storage_url_is_one_line(workdir, tiny_data):
    study = write_study(workdir, tiny_data)
    assert "not a URL" in one_line_error(dry_run(study, "--storage", "nonsense"))
    if not torch.cuda.is_available():
        study.write_text(study.read_text().replace("[train]", '[train]\ndevice = "cuda"'))
        assert "no CUDA GPU" in one_line_error(dry_run(study))
    assert not (workdir / "runs" / "tiny").exists()
