"""`search init`: a data set in, a study file that validates and fits the data out."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from search.cli import app
from search.config import read_study_file
from search.data.init import Hardware, choose_settings, survey_data
from tests.search.conftest import make_dataset, write_study

runner = CliRunner()
CPU = Hardware(gpus=0, gpu_memory_gb=0.0, cpus=2)
GPU = Hardware(gpus=2, gpu_memory_gb=80.0, cpus=16)


def init(*args: str):
    return runner.invoke(app, ["init", *args], terminal_width=200)


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def make_csv_dataset(root: Path, *, size: tuple[int, int] = (40, 30)) -> Path:
    """A csv-layout set: train.csv with image, label, num_* columns; images under img/."""
    rng = np.random.default_rng(0)
    rows = []
    for label, count in (("cat", 6), ("dog", 4)):
        for i in range(count):
            path = root / "img" / f"{label}{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
            rows.append({"image": f"img/{label}{i}.png", "label": label,
                         "num_weight": f"{i + 1.5}", "num_height": f"{i * 2}"})
    with (root / "train.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_folders_with_depth_and_numeric_give_a_valid_depth_study(workdir):
    make_dataset(workdir / "fruit")  # rgb, depth and labels/*.json with numeric and text
    result = init("--data", "fruit")
    assert result.exit_code == 0, result.output
    config = read_study_file("fruit")  # the project's own reader and validation
    assert config.name == "fruit"
    assert config.data.format == "folders"
    assert config.data.modalities == ["rgb", "depth"]  # depth preferred; one second modality
    assert "also found: numeric, text" in result.output
    assert set(config.space.fusion.values()) == {"none", "early", "joint", "late"}
    assert config.train.resolution == 32  # 16 px images: the smallest resolution we train at
    text = (workdir / "studies" / "fruit.toml").read_text()
    assert "3 classes, 26 samples" in text
    settings = [line for line in text.splitlines()
                if line and not line.startswith(("#", "[")) and "=" in line]
    assert len(settings) > 15
    assert [line for line in settings if "  # " not in line] == [], "every setting says why"


def test_rgb_only_folders_search_no_fusion(workdir):
    make_dataset(workdir / "plain", modalities=("rgb",))
    assert init("--data", "plain", "--name", "mine").exit_code == 0
    config = read_study_file("mine")
    assert config.data.modalities == ["rgb"]
    assert config.space.fusion.values() == ("none",)


def test_csv_with_numeric_columns_gives_a_valid_numeric_study(workdir):
    make_csv_dataset(workdir / "pets")
    result = init("--data", "pets/train.csv")  # the CSV itself names its folder
    assert result.exit_code == 0, result.output
    config = read_study_file("pets")
    assert config.data.format == "csv"
    assert config.data.root == Path("pets")
    assert config.data.modalities == ["rgb", "numeric"]
    import models
    expected = {"none"} | {f for f in models.list_fusions() if "numeric" in
                           models.fusion_accepts(f)}
    assert set(config.space.fusion.values()) == expected


def test_settings_follow_the_images_and_the_machine(workdir):
    make_dataset(workdir / "big", size=300, counts={"red": 6, "green": 6},
                 modalities=("rgb",))
    survey = survey_data(Path("big"))
    assert survey.short_side == 300
    cpu, gpu = choose_settings(survey, CPU), choose_settings(survey, GPU)
    assert (cpu.resolution[0], gpu.resolution[0]) == (64, 224)
    assert cpu.backbones[0] == ["lite0"] and len(gpu.backbones[0]) > 1  # lite0: weights ship
    assert cpu.balance[0] == "none"  # 6 and 6: nothing to balance

    make_dataset(workdir / "small", size=100, counts={"red": 40, "green": 10},
                 modalities=("rgb",))
    small = survey_data(Path("small"))
    assert choose_settings(small, GPU).resolution[0] == 96  # not above the images' own size
    assert choose_settings(small, CPU).balance[0] == "class_weights"  # 4x imbalance
    assert choose_settings(small, GPU).batch_size[0] <= len(small.index.splits["train"]) // 4


def test_non_square_photos_and_pending_keys(workdir):
    make_csv_dataset(workdir / "wide", size=(48, 32))
    assert init("--data", "wide").exit_code == 0
    text = (workdir / "studies" / "wide.toml").read_text()
    assert 'resize = "center_crop"' in text and 'pretrained = "imagenet"' in text
    config = read_study_file("wide")
    assert config.train.resize == "center_crop" and config.train.pretrained == "imagenet"


def test_an_existing_study_file_is_kept_unless_forced(workdir):
    make_dataset(workdir / "fruit", modalities=("rgb",))
    assert init("--data", "fruit").exit_code == 0
    path = workdir / "studies" / "fruit.toml"
    path.write_text("# mine\n" + path.read_text())
    line = one_line_error(init("--data", "fruit"))
    assert "studies/fruit.toml" in line and "--force" in line
    assert path.read_text().startswith("# mine")
    assert init("--data", "fruit", "--force").exit_code == 0
    assert not path.read_text().startswith("# mine")


def test_bad_folders_get_the_same_one_line_errors_as_data_check(workdir):
    assert "not found" in one_line_error(init("--data", "nowhere"))
    make_csv_dataset(workdir / "pets")
    (workdir / "pets" / "train.csv").rename(workdir / "pets" / "mine.csv")
    assert "name the training CSV train.csv" in one_line_error(init("--data", "pets/mine.csv"))
    assert not (workdir / "studies").exists()

    one_class = make_dataset(workdir / "one", counts={"red": 5}, modalities=("rgb",))
    stray = make_dataset(workdir / "stray", modalities=("rgb",))
    (stray / "train" / "rgb" / "red" / "notes.txt").write_text("x")
    for data in (one_class, stray):
        study = write_study(workdir, Path(data.name), name=f"check_{data.name}",
                            modalities='["rgb"]', fusion='["none"]')
        checked = one_line_error(runner.invoke(app, ["data", "check", "--study", str(study)]))
        assert one_line_error(init("--data", data.name)) == checked
    assert not (workdir / "studies").exists()


def test_a_corrupt_image_is_one_line_naming_it(workdir):
    data = make_dataset(workdir / "corrupt", counts={"red": 3, "green": 3}, modalities=("rgb",))
    (data / "train" / "rgb" / "red" / "red1.png").write_bytes(b"not an image")
    line = one_line_error(init("--data", "corrupt"))
    assert "unreadable or corrupt images" in line and "red1.png" in line
