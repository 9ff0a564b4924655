"""The `search` CLI: what a person sees, and exit codes, for data checks and bad input."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from search.cli import app
from search.study.runner import physical_gpu
from tests.search.conftest import make_dataset, write_study

runner = CliRunner()


def one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_data_check_prints_counts_per_split_and_class_and_the_imbalance(workdir):
    data = make_dataset(workdir / "data", counts={"red": 12, "green": 8, "yellow": 3})
    study = write_study(workdir, data)
    result = runner.invoke(app, ["data", "check", "--study", str(study)], terminal_width=120)
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: line for line in result.output.splitlines()
            if line.strip().startswith("│") and len(line.split()) > 2}
    assert {"red", "green", "yellow", "all"} <= set(rows)
    # 23 samples; val/test are stratified holdouts of train, so the row totals are the inputs.
    assert rows["red"].split("│")[-2].strip() == "12"
    assert rows["yellow"].split("│")[-2].strip() == "3"
    assert rows["all"].split("│")[-2].strip() == "23"
    assert "imbalance (largest / smallest training class):" in result.output


def test_data_check_of_a_corrupt_image_is_one_line_naming_it(workdir):
    data = make_dataset(workdir / "data")
    (data / "train" / "rgb" / "red" / "red3.png").write_bytes(b"\x89PNG broken")
    study = write_study(workdir, data)
    line = one_line_error(runner.invoke(app, ["data", "check", "--study", str(study)]))
    assert "red3.png" in line


def test_bad_study_file_is_one_line_and_exit_2(workdir):
    data = make_dataset(workdir / "data")
    study = write_study(workdir, data)
    study.write_text(study.read_text().replace("[train]", "[train]\nepochz = 3"))
    for command in (["run"], ["data", "check"], ["status"], ["worker"]):
        line = one_line_error(runner.invoke(app, [*command, "--study", str(study)]))
        assert "train.epochz: unknown key" in line


def test_status_of_a_missing_database_creates_nothing(workdir):
    study = write_study(workdir, make_dataset(workdir / "data"))
    line = one_line_error(runner.invoke(app, ["status", "--study", str(study)]))
    assert "no SQLite database" in line
    assert not (workdir / "runs" / "tiny" / "study.db").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error(workdir):
    study = write_study(workdir, make_dataset(workdir / "data"), extra="")
    study.write_text(study.read_text().replace("threads = 1", 'threads = 1\ndevice = "cuda"'))
    for command in (["run"], ["worker"]):
        line = one_line_error(runner.invoke(app, [*command, "--study", str(study)]))
        assert 'train.device = "cuda"' in line


def test_workers_are_pinned_to_the_parents_visible_gpus():
    assert physical_gpu(1, "2,3") == "3"
    assert physical_gpu(0, " 5 , 7") == "5"
    assert physical_gpu(1, None) == "1"
    assert physical_gpu(2, "") == "2"
