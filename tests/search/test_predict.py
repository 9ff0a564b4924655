"""`search predict`: the bundle alone, checked against PyTorch, training and plain onnxruntime.

The trained bundle comes from test_export.py's shared study (rgb + depth, early fusion).
Numeric and text inputs are checked on small hand-built ONNX graphs with the same
``model.json`` layout, run by the real onnxruntime.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

import models
from search.bundle.predict import folder_samples, load_bundle, model_inputs
from search.cli import app
from search.config import read_study_file
from search.data.decode import tokenize
from search.data.prepared import prepare_data
from tests.search.test_export import STUDY_FILE, build_exported_study

pytestmark = pytest.mark.slow
runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return build_exported_study(tmp_path_factory)


@pytest.fixture
def in_study(exported, monkeypatch):
    monkeypatch.chdir(exported.root)
    return exported


def predict(*args: str) -> str:
    result = runner.invoke(app, ["predict", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


def predict_error(*args: str) -> str:
    result = runner.invoke(app, ["predict", *map(str, args)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def read_predictions(path: Path) -> dict[str, dict]:
    with path.open(newline="") as handle:
        return {Path(row["sample"]).stem: row for row in csv.DictReader(handle)}


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@torch.no_grad()
def test_round_trip_gives_the_pytorch_model_s_labels_and_the_exported_f1(in_study, tmp_path):
    output = predict("bundle", "data/test", "--out", tmp_path / "p.csv")
    rows = read_predictions(tmp_path / "p.csv")
    meta = json.loads(Path("bundle/model.json").read_text())
    model = models.create_model(meta["architecture"]["spec"]).eval()
    model.load_state_dict(load_file("bundle/weights.safetensors"))
    data = prepare_data(read_study_file(STUDY_FILE))
    split = data.split("test")
    batch = split.batch(np.arange(len(split)), torch.device("cpu"), channels_last=False)
    expected = torch.softmax(model(batch), dim=1).numpy()
    ids = data.arrays["test"].ids
    assert sorted(rows) == sorted(ids)
    for i, sample_id in enumerate(ids):
        row = rows[sample_id]
        assert row["label"] == data.classes[expected[i].argmax()]
        assert row["true_label"] == data.classes[split.labels[i]]
        got = [float(row[f"p_{name}"]) for name in data.classes]
        np.testing.assert_allclose(got, expected[i], atol=1e-5)
    assert f"macro F1 {meta['metrics']['test_macro_f1']:.4f}" in output
    assert "on 11 labelled sample(s)" in output


def test_predict_prepares_inputs_exactly_as_training_did(in_study):
    bundle = load_bundle(Path("bundle"))
    samples = folder_samples(Path("data/test"), bundle)
    feeds = model_inputs(bundle, samples)
    data = prepare_data(read_study_file(STUDY_FILE))
    split = data.split("test")
    batch = split.batch(np.arange(len(split)), torch.device("cpu"), channels_last=False)
    order = [data.arrays["test"].ids.index(Path(s.name).stem) for s in samples]
    for name in ("rgb", "depth"):
        np.testing.assert_allclose(feeds[name], batch[name].numpy()[order], atol=1e-6)


def plain_onnxruntime(bundle: Path, images: dict[str, list[Path]],
                      ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Inputs and probabilities for onnxruntime, following nothing but model.json."""
    meta = json.loads((bundle / "model.json").read_text())
    prep = meta["preprocess"]
    size = prep["resolution"]
    feeds = {}
    for spec in meta["inputs"]:
        rule = prep[spec["modality"]]
        mode = "RGB" if spec["modality"] == "rgb" else rule["mode"]
        arrays = []
        for path in images[spec["modality"]]:
            image = Image.open(path).convert(mode).resize((size, size), Image.BILINEAR)
            pixels = np.asarray(image, np.float32).reshape(size, size, -1)
            arrays.append(((pixels * rule["scale"] - np.asarray(rule["mean"]))
                           / np.asarray(rule["std"])).transpose(2, 0, 1))
        feeds[spec["name"]] = np.stack(arrays).astype(spec["dtype"])
    session = ort.InferenceSession(str(bundle / "model.onnx"))
    return feeds, softmax(session.run(None, feeds)[0])


def test_a_plain_onnxruntime_session_following_model_json_agrees(in_study, tmp_path):
    predict("bundle", "data/test", "--out", tmp_path / "p.csv")
    rows = read_predictions(tmp_path / "p.csv")
    rgb = sorted(Path("data/test/rgb").glob("*/*.png"))
    depth = [Path("data/test/depth") / p.parent.name / p.name for p in rgb]
    feeds, probabilities = plain_onnxruntime(Path("bundle"), {"rgb": rgb, "depth": depth})
    bundle = load_bundle(Path("bundle"))
    ours = model_inputs(bundle, folder_samples(Path("data/test"), bundle))
    for name, value in feeds.items():  # the same inputs, so the same outputs for any model
        np.testing.assert_allclose(value, ours[name], atol=1e-6)
    labels = json.loads(Path("bundle/model.json").read_text())["labels"]
    for path, row in zip(rgb, probabilities, strict=True):
        predicted = rows[path.stem]
        assert predicted["label"] == labels[str(row.argmax())]
        assert float(predicted["probability"]) == pytest.approx(row.max(), abs=1e-5)


def test_images_of_any_size_with_their_depth_and_a_csv_give_one_line_each(in_study, tmp_path):
    odd = tmp_path / "odd.png"
    Image.new("RGBA", (50, 20), (200, 30, 30, 255)).save(odd)  # wrong size and mode: fine
    depth = Path("data/test/depth/red/red0.png")
    lines = predict("bundle", odd, "data/test/rgb/red/red0.png", "--depth", depth,
                    "--depth", depth).strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(odd))
    label, probability = lines[0].split()[1:3]
    assert label in ("green", "red", "yellow") and 0 < float(probability) <= 1

    listing = Path("data/test/list.csv")  # paths relative to the CSV's folder
    with listing.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "depth"])
        for path in sorted(Path("data/test/rgb").glob("*/*.png")):
            writer.writerow([f"rgb/{path.parent.name}/{path.name}", path.parent.name,
                             f"depth/{path.parent.name}/{path.name}"])
    try:
        from_csv = predict("bundle", listing, "--out", tmp_path / "c.csv")
    finally:
        listing.unlink()
    from_folder = predict("bundle", "data/test", "--out", tmp_path / "f.csv")
    assert from_csv.splitlines()[-1] == from_folder.splitlines()[-1]  # the same F1 line
    csv_rows, folder_rows = read_predictions(tmp_path / "c.csv"), read_predictions(
        tmp_path / "f.csv")
    assert {k: r["label"] for k, r in csv_rows.items()} == {
        k: r["label"] for k, r in folder_rows.items()}


@pytest.mark.parametrize(("args", "message"), [
    (["data/test/rgb/red/red0.png"],
     "the model needs depth for every input image: give --depth once per image "
     "(0 given for 1 image(s))"),
    (["data/test/rgb/red/red0.png", "data/test/rgb/red/red1.png", "--depth",
      "data/test/depth/red/red0.png"], "(1 given for 2 image(s))"),
    (["data/test/rgb/red/red0.png", "--depth", "data/test/depth/red/red0.png", "--numeric",
      "1,2"], "the model takes no numeric input (its inputs: rgb, depth); drop --numeric"),
    (["data/test/rgb/red/nope.png", "--depth", "x.png"],
     "data/test/rgb/red/nope.png: no such file or folder"),
    (["data/test/rgb/red/red0.png", "--depth", "data/missing.png"],
     "data/missing.png: no such image"),
    (["runs"], "runs: not a data-set folder: expected runs/rgb/<class>/<id>.png"),
])
def test_bad_inputs_are_one_clear_line(in_study, args, message):
    assert message in predict_error("bundle", *args)


def test_missing_depth_in_a_folder_or_csv_and_corrupt_images_are_clear(in_study, tmp_path):
    folder = tmp_path / "set"
    shutil.copytree("data/test/rgb", folder / "rgb")
    assert "no depth image at" in predict_error("bundle", folder)
    listing = tmp_path / "list.csv"
    listing.write_text("image,label\nset/rgb/red/red0.png,red\n")
    assert f"{listing}: no depth column, which the model needs" in predict_error(
        "bundle", listing)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    line = predict_error("bundle", broken, "--depth", "data/test/depth/red/red0.png")
    assert f"{broken}: not a readable image" in line


def damaged_bundle(source: Path, folder: Path, damage: str) -> Path:
    folder.mkdir()
    (folder / "model.onnx").symlink_to((source / "model.onnx").resolve())
    meta = json.loads((source / "model.json").read_text())
    if damage == "no model.json":
        return folder
    if damage == "no model.onnx":
        (folder / "model.onnx").unlink()
    elif damage == "corrupt model.onnx":
        (folder / "model.onnx").unlink()
        (folder / "model.onnx").write_bytes(b"\x08garbage")
    elif damage == "no rgb std":
        del meta["preprocess"]["rgb"]["std"]
    elif damage == "inputs differ":
        meta["inputs"][1]["name"] = "depth_map"
    text = json.dumps(meta)
    (folder / "model.json").write_text(text[:-40] if damage == "bad json" else text)
    return folder


@pytest.mark.parametrize(("damage", "message"), [
    ("no model.json", "model.json: missing; {b} is not an export bundle"),
    ("bad json", "model.json: not valid JSON (line 1"),
    ("no rgb std", "model.json: missing key preprocess.rgb.std"),
    ("no model.onnx", "model.onnx: missing; the bundle is incomplete"),
    ("corrupt model.onnx", "model.onnx: onnxruntime cannot load it"),
    ("inputs differ", "model.json: inputs ['depth_map', 'rgb'] do not match model.onnx's"),
])
def test_bad_bundles_are_one_clear_line(in_study, tmp_path, damage, message):
    bundle = damaged_bundle(Path("bundle"), tmp_path / "b", damage)
    line = predict_error(bundle, "data/test")
    assert str(bundle) in line and message.format(b=bundle) in line
    assert "not a folder" in predict_error(tmp_path / "nothing", "data/test")


def test_predict_runs_without_importing_torch(in_study):
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom search.cli import app\n"
            "result = CliRunner().invoke(app, sys.argv[1:])\n"
            "assert result.exit_code == 0, result.output\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'models', 'optuna'}))")
    result = subprocess.run(
        [sys.executable, "-c", code, "predict", "bundle", "data/test/rgb/red/red0.png",
         "--depth", "data/test/depth/red/red0.png"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def small_bundle(folder: Path, source: Path, second: str) -> tuple[Path, np.ndarray]:
    """A bundle whose graph is logits = numeric @ W or sum of E[text ids] (plus 0 x rgb)."""
    folder.mkdir()
    meta = json.loads((source / "model.json").read_text())
    rng = np.random.default_rng(0)
    size = meta["preprocess"]["resolution"]
    if second == "numeric":
        weight = rng.normal(size=(2, 3)).astype(np.float32)
        meta["preprocess"]["numeric"] = {"names": ["height", "weight"], "mean": [1.0, 10.0],
                                         "std": [2.0, 5.0]}
        spec = {"name": "numeric", "modality": "numeric", "shape": ["batch", 2],
                "dtype": "float32"}
        second_in = helper.make_tensor_value_info("numeric", TensorProto.FLOAT, ["batch", 2])
        nodes = [helper.make_node("MatMul", ["numeric", "W"], ["second"])]
    else:
        weight = rng.normal(size=(16, 3)).astype(np.float32)
        meta["preprocess"]["text"] = {"buckets": 16, "length": 4}
        spec = {"name": "text", "modality": "text", "shape": ["batch", 4], "dtype": "int64"}
        second_in = helper.make_tensor_value_info("text", TensorProto.INT64, ["batch", 4])
        nodes = [helper.make_node("Gather", ["W", "text"], ["embedded"]),
                 helper.make_node("ReduceSum", ["embedded", "axis1"], ["second"], keepdims=0)]
    meta["inputs"] = [meta["inputs"][0], spec]
    del meta["preprocess"]["depth"]
    nodes += [helper.make_node("ReduceMean", ["rgb"], ["mean_rgb"], axes=[2, 3], keepdims=0),
              helper.make_node("Mul", ["mean_rgb", "zero"], ["rgb_term"]),
              helper.make_node("Add", ["second", "rgb_term"], ["logits"])]
    graph = helper.make_graph(
        nodes, "small",
        [helper.make_tensor_value_info("rgb", TensorProto.FLOAT, ["batch", 3, size, size]),
         second_in],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializer=[onnx.numpy_helper.from_array(weight, "W"),
                     onnx.numpy_helper.from_array(np.zeros((1, 3), np.float32), "zero"),
                     onnx.numpy_helper.from_array(np.array([1], np.int64), "axis1")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              folder / "model.onnx")
    (folder / "model.json").write_text(json.dumps(meta))
    return folder, weight


def test_numeric_features_from_options_json_folders_and_csv(in_study, tmp_path):
    bundle, weight = small_bundle(tmp_path / "num", Path("bundle"), "numeric")
    image = "data/test/rgb/red/red0.png"
    expected = softmax(((np.array([[3.0, 20.0]]) - [1.0, 10.0]) / [2.0, 5.0]) @ weight)
    out = tmp_path / "p.csv"
    for option in (["--numeric", "3,20"], ["--numeric-json", "[3, 20]"],
                   ["--numeric-json", '{"weight": 20, "height": 3}']):
        predict(bundle, image, *option, "--out", out)
        row = read_predictions(out)["red0"]
        np.testing.assert_allclose([float(row[f"p_{c}"]) for c in ("green", "red", "yellow")],
                                   expected[0], atol=1e-5)
    folder = tmp_path / "set"
    shutil.copytree("data/test/rgb", folder / "rgb")
    for path in folder.glob("rgb/*/*.png"):
        labels = folder / "labels" / path.parent.name / f"{path.stem}.json"
        labels.parent.mkdir(parents=True, exist_ok=True)
        labels.write_text('{"numeric": {"height": 3, "weight": 20}, "text": "unused"}')
    (folder / "rows.csv").write_text(
        "image,label,num_height,num_weight\nrgb/red/red0.png,red,3,20\n")
    for source in (folder / "rows.csv", folder):
        predict(bundle, source, "--out", out)
        assert float(read_predictions(out)["red0"]["probability"]) == pytest.approx(
            expected.max(), abs=1e-5)
    labels.unlink()
    assert f"{path}: no readable labels file at {labels}" in predict_error(bundle, folder)
    assert "expected 2 numeric values (height, weight), got 3" in predict_error(
        bundle, image, "--numeric", "1,2,3")
    assert "--numeric '1,x': not comma-separated numbers" in predict_error(
        bundle, image, "--numeric", "1,x")
    assert "numeric features need the keys ['height', 'weight']" in predict_error(
        bundle, image, "--numeric-json", '{"height": 1}')


def test_text_uses_the_documented_tokenizer(in_study, tmp_path):
    texts = ["Red APPLE, très sucrée!", "", "one two three four five six", "x_y 42"]
    for buckets, length in ((16, 4), (4096, 32), (2, 1)):
        np.testing.assert_array_equal(tokenize(texts, buckets, length),
                                      tokenize(texts, buckets, length))
    bundle, weight = small_bundle(tmp_path / "text", Path("bundle"), "text")
    predict(bundle, "data/test/rgb/red/red0.png", "--text", texts[0], "--out", tmp_path / "p.csv")
    row = read_predictions(tmp_path / "p.csv")["red0"]
    expected = softmax(weight[tokenize(texts[:1], 16, 4)].sum(axis=1))
    np.testing.assert_allclose([float(row[f"p_{c}"]) for c in ("green", "red", "yellow")],
                               expected[0], atol=1e-5)
    assert "the model needs text for every input image" in predict_error(
        bundle, "data/test/rgb/red/red0.png")
