"""``search predict``: inference from an export bundle alone (``model.json`` + ``model.onnx``).

No study, storage, data set or PyTorch is needed: only numpy, Pillow, onnxruntime and
scikit-learn, so a bundle runs wherever those install. Every input is prepared the way
``model.json``'s ``preprocess`` describes (resize, scale, mean/std, tokenizer rule), which
is all any other onnxruntime client of the bundle has to do to get the same predictions.

Inputs are images (with ``--depth``/``--numeric``/``--text`` once per image when the model
takes them), folders in the data-set layout (``<folder>/rgb/<class>/<id>.png`` or
``<folder>/<split>/rgb/...``, other modalities beside ``rgb/``) or CSV files (columns
``image, label, depth, num_*, text``, paths relative to the CSV's folder).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console
from sklearn.metrics import accuracy_score, f1_score

from search.bundle.files import META_FILE, ONNX_FILE
from search.bundle.schema import first_problem
from search.data.decode import (
    CSV_ENCODING,
    DEFAULT_RESIZE,
    IMAGE_SUFFIXES,
    MODALITIES,
    RESIZE_MODES,
    SPLITS,
    ImageError,
    Problem,
    RawSample,
    csv_reader,
    decode_image,
    missing_csv_columns,
    normalize_pixels,
    read_csv_sample,
    read_folder_sample,
    standardize_numeric,
    tokenize,
)
from search.errors import BundleError

BATCH_SIZE = 32
_NEEDED = ("labels", "inputs", "preprocess.resolution", "preprocess.rgb.mean",
           "preprocess.rgb.std", "preprocess.rgb.scale")


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its ``model.json`` and an onnxruntime session on ``model.onnx``."""

    folder: Path
    meta: dict
    session: ort.InferenceSession

    @property
    def classes(self) -> list[str]:
        labels = self.meta["labels"]
        return [labels[str(i)] for i in range(len(labels))]

    @property
    def modalities(self) -> list[str]:
        return [entry["modality"] for entry in self.meta["inputs"]]

    @property
    def preprocess(self) -> dict:
        return self.meta["preprocess"]


@dataclass
class Sample:
    """One sample to predict: its files and values, and its true class when known."""

    name: str
    rgb: Path
    depth: Path | None = None
    numeric: list[float] | None = None
    text: str | None = None
    label: str | None = None


@dataclass(frozen=True)
class ExtraInputs:
    """The second modality for images given directly, one value per image, in order."""

    depth: list[Path] = field(default_factory=list)
    numeric: list[str] = field(default_factory=list)
    numeric_json: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)


@dataclass
class Predictions:
    """Class probabilities per sample, with the bundle's class names."""

    samples: list[Sample]
    probabilities: np.ndarray
    classes: list[str]

    @property
    def labels(self) -> list[str]:
        return [self.classes[i] for i in self.probabilities.argmax(axis=1)]

    def scores(self) -> tuple[float, float, int] | None:
        """Macro F1, accuracy and count over the labelled samples (None when there are none).

        Macro F1 averages over every class of the model (absent ones count 0), as the
        search and export score their splits.
        """
        pairs = [(s.label, p) for s, p in zip(self.samples, self.labels, strict=True) if s.label]
        if not pairs:
            return None
        truth, predicted = zip(*pairs, strict=True)
        classes = self.classes + sorted(set(truth) - set(self.classes))
        f1 = f1_score(truth, predicted, labels=classes, average="macro", zero_division=0)
        return float(f1), float(accuracy_score(truth, predicted)), len(pairs)


def load_bundle(folder: Path) -> Bundle:
    """Read ``model.json`` and open ``model.onnx``; anything wrong is one BundleError line."""
    if not folder.is_dir():
        raise BundleError(f"{folder}: not a folder; give the folder `search export --out` wrote")
    meta_path = folder / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{meta_path}: missing; {folder} is not an export bundle") from None
    except (OSError, UnicodeDecodeError) as error:
        raise BundleError(f"{meta_path}: cannot read it ({error})") from None
    except json.JSONDecodeError as error:
        raise BundleError(f"{meta_path}: not valid JSON (line {error.lineno}: {error.msg})"
                          ) from None
    check_meta(meta, meta_path)
    onnx_path = folder / ONNX_FILE
    if not onnx_path.is_file():
        raise BundleError(f"{onnx_path}: missing; the bundle is incomplete")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    try:
        session = ort.InferenceSession(str(onnx_path), options,
                                       providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
        reason = (str(error).strip() or type(error).__name__).splitlines()[0][:200]
        raise BundleError(f"{onnx_path}: onnxruntime cannot load it ({reason})") from None
    graph = sorted(arg.name for arg in session.get_inputs())
    declared = sorted(entry["name"] for entry in meta["inputs"])
    if graph != declared:
        raise BundleError(f"{meta_path}: inputs {declared} do not match {ONNX_FILE}'s {graph}")
    return Bundle(folder, meta, session)


def check_meta(meta: object, path: Path) -> None:
    """The keys predict relies on, each missing one named with its dotted path."""
    if not isinstance(meta, dict):
        raise BundleError(f"{path}: expected a JSON object")
    listed = meta.get("inputs")
    modalities = [e.get("modality") for e in (listed if isinstance(listed, list) else [])
                  if isinstance(e, dict) and isinstance(e.get("modality"), str)]
    needed = list(_NEEDED)
    needed += [f"preprocess.{m}.{k}" for m in ("depth", "numeric") if m in modalities
               for k in ("mean", "std")]
    needed += ["preprocess.text.buckets", "preprocess.text.length"] if "text" in modalities else []
    for dotted in needed:
        value = meta
        for key in dotted.split("."):
            if not isinstance(value, dict) or key not in value or value[key] is None:
                raise BundleError(f"{path}: missing key {dotted}")
            value = value[key]
    labels, inputs = meta["labels"], meta["inputs"]
    if not isinstance(labels, dict) or sorted(labels) != sorted(map(str, range(len(labels)))):
        raise BundleError(f"{path}: labels must map 0..N-1 to class names")
    if not isinstance(inputs, list) or not inputs or any(
            not isinstance(e, dict) or {"name", "modality", "dtype"} - set(e) for e in inputs):
        raise BundleError(f"{path}: inputs must list {{name, modality, shape, dtype}} entries")
    unknown = set(modalities) - set(MODALITIES)
    if unknown:
        # key=str: a JSON null modality must be reported, not make sorted() fail.
        raise BundleError(f"{path}: unknown input modality {sorted(unknown, key=str)[0]!r}")
    resize = meta["preprocess"].get("resize")
    if isinstance(resize, dict) and resize.get("mode") not in RESIZE_MODES:
        raise BundleError(f"{path}: preprocess.resize.mode must be one of "
                          f"{', '.join(RESIZE_MODES)}")
    fitted = (meta["preprocess"].get("depth") or {}).get("range")
    if "depth" in modalities and fitted is not None and not (
            isinstance(fitted, list) and len(fitted) == 2
            and all(isinstance(v, int | float) and math.isfinite(v) for v in fitted)
            and fitted[0] < fitted[1]):
        raise BundleError(f"{path}: preprocess.depth.range must be null or [low, high] "
                          "with low < high")
    problem = first_problem(meta)  # the types of everything else predict reads
    if problem is not None:
        raise BundleError(f"{path}: {problem}")


def load_pixels(path: Path, modality: str, preprocess: dict) -> np.ndarray:
    """Decode and resize one image to uint8 ``[resolution, resolution, C]`` (as training did).

    ``preprocess`` is ``model.json``'s section: its resolution, ``resize.mode`` and
    ``depth.range`` (bundles from before those existed were squashed, with 8-bit depth).
    """
    resize = preprocess.get("resize")
    depth = preprocess.get("depth") or {}
    try:
        return decode_image(path, modality, int(preprocess["resolution"]),
                            resize=resize.get("mode", DEFAULT_RESIZE)
                            if isinstance(resize, dict) else "squash",
                            depth_range=depth.get("range") if modality == "depth" else None)
    except ImageError as error:
        if error.missing:
            raise BundleError(f"{path}: no such image") from None
        raise BundleError(f"{path}: not a readable image ({error.kind})") from None


def numeric_vector(value: object, bundle: Bundle, where: str) -> list[float]:
    """A list, or an object keyed by the bundle's feature names, as the model's feature order."""
    names = bundle.preprocess["numeric"].get("names") or []
    count = len(bundle.preprocess["numeric"]["mean"])
    if isinstance(value, dict):
        missing = [name for name in names if name not in value]
        if missing or not names:
            raise BundleError(f"{where}: numeric features need the keys {names} "
                              f"(missing {missing or list(value)})")
        value = [value[name] for name in names]
    if not isinstance(value, list) or len(value) != count:
        got = len(value) if isinstance(value, list) else type(value).__name__
        raise BundleError(f"{where}: expected {count} numeric values "
                          f"({', '.join(names)}), got {got}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
               for v in value):
        raise BundleError(f"{where}: numeric values must be finite numbers, got {value}")
    return [float(v) for v in value]


def parse_numeric(text: str, *, as_json: bool) -> object:
    """``--numeric "1,2,3"`` or ``--numeric-json '[1, 2, 3]'`` / ``'{"a": 1}'``."""
    flag = "--numeric-json" if as_json else "--numeric"
    try:
        if as_json:
            return json.loads(text)
        return [float(part) for part in text.split(",")]
    except ValueError:
        kind = "JSON" if as_json else "comma-separated numbers"
        raise BundleError(f"{flag} {text!r}: not {kind}") from None


def image_samples(paths: list[Path], extra: ExtraInputs, bundle: Bundle) -> list[Sample]:
    """Images given directly, paired in order with ``--depth``/``--numeric``/``--text``."""
    if extra.numeric and extra.numeric_json:
        raise BundleError("give --numeric or --numeric-json, not both")
    numeric = ([parse_numeric(t, as_json=False) for t in extra.numeric]
               or [parse_numeric(t, as_json=True) for t in extra.numeric_json])
    flag = "--numeric-json" if extra.numeric_json else "--numeric"
    given: dict[str, tuple[str, Sequence[object]]] = {
        "depth": ("--depth", extra.depth), "numeric": (flag, numeric),
        "text": ("--text", extra.text),
    }
    for modality, (option, values) in given.items():
        if modality not in bundle.modalities and values:
            raise BundleError(f"the model takes no {modality} input (its inputs: "
                              f"{', '.join(bundle.modalities)}); drop {option}")
        if modality in bundle.modalities and len(values) != len(paths):
            raise BundleError(f"the model needs {modality} for every input image: give "
                              f"{option} once per image ({len(values)} given for "
                              f"{len(paths)} image(s))")
    samples = []
    for i, path in enumerate(paths):
        sample = Sample(name=str(path), rgb=path)
        if "depth" in bundle.modalities:
            sample.depth = extra.depth[i]
        if "numeric" in bundle.modalities:
            sample.numeric = numeric_vector(numeric[i], bundle, f"{flag} for {path}")
        if "text" in bundle.modalities:
            sample.text = extra.text[i]
        samples.append(sample)
    return samples


def folder_samples(folder: Path, bundle: Bundle) -> list[Sample]:
    """Samples of a data-set folder; the class folder names are the true labels."""
    bases = ([folder] if (folder / "rgb").is_dir()
             else [folder / s for s in SPLITS if (folder / s / "rgb").is_dir()])
    if not bases:
        raise BundleError(f"{folder}: not a data-set folder: expected {folder}/rgb/<class>/"
                          f"<id>.png or {folder}/<split>/rgb/<class>/<id>.png")
    samples = []
    for base in bases:
        for class_dir in sorted(p for p in (base / "rgb").iterdir() if p.is_dir()):
            for rgb in sorted(class_dir.iterdir()):
                if rgb.suffix.lower() in IMAGE_SUFFIXES and not rgb.name.startswith("."):
                    samples.append(_folder_sample(base, class_dir.name, rgb, bundle))
    return samples


def _folder_sample(base: Path, label: str, rgb: Path, bundle: Bundle) -> Sample:
    raw = read_folder_sample(base, label, rgb, bundle.modalities)
    return _sample(raw, str(rgb), bundle, str(raw.labels))


def csv_samples(path: Path, bundle: Bundle) -> list[Sample]:
    """Samples of a CSV file (``image, label, depth, num_*, text``; paths relative to it)."""
    root, modalities = path.parent, bundle.modalities
    try:
        with path.open(newline="", encoding=CSV_ENCODING) as handle:
            reader = csv_reader(handle)
            header = list(reader.fieldnames or [])
            missing = missing_csv_columns(header, modalities, label=False)
            if missing:
                raise BundleError(f"{path}: no {', '.join(missing)} column, which the model needs")
            samples = []
            for record in reader:
                where = f"{path} line {reader.line_num}"
                raw = read_csv_sample(root, record, header, where, modalities, label=False)
                if isinstance(raw, Problem):
                    raise BundleError(raw.detail)
                if raw.numeric is not None and not bundle.preprocess["numeric"].get("names"):
                    raw.numeric = list(raw.numeric.values())
                samples.append(_sample(raw, str(raw.rgb), bundle, where))
            return samples
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise BundleError(f"{path}: cannot read it as CSV ({error})") from None


def _sample(raw: RawSample, name: str, bundle: Bundle, numeric_where: str) -> Sample:
    """A sample to predict from what :mod:`search.data.decode` read (its first problem fails)."""
    if raw.problems:
        raise BundleError(raw.problems[0].detail)
    sample = Sample(name=name, rgb=raw.rgb, depth=raw.depth, text=raw.text, label=raw.label)
    if "numeric" in bundle.modalities:
        sample.numeric = numeric_vector(raw.numeric, bundle, numeric_where)
    return sample


def collect_samples(bundle: Bundle, inputs: list[Path], extra: ExtraInputs) -> list[Sample]:
    """Every sample of ``inputs``, in the order given."""
    for path in inputs:
        if not path.exists():
            raise BundleError(f"{path}: no such file or folder")
    images = [p for p in inputs if p.is_file() and p.suffix.lower() != ".csv"]
    direct: Iterator[Sample] = iter(image_samples(images, extra, bundle))
    samples: list[Sample] = []
    for path in inputs:
        if path.is_dir():
            samples += folder_samples(path, bundle)
        elif path.suffix.lower() == ".csv":
            samples += csv_samples(path, bundle)
        else:
            samples.append(next(direct))
    if not samples:
        raise BundleError(f"no images found in {', '.join(map(str, inputs))}")
    return samples


def model_inputs(bundle: Bundle, samples: list[Sample]) -> dict[str, np.ndarray]:
    """The ONNX feeds for ``samples``, prepared as ``model.json``'s ``preprocess`` says."""
    prep = bundle.preprocess
    feeds = {}
    for entry in bundle.meta["inputs"]:
        modality = entry["modality"]
        if modality in ("rgb", "depth"):
            pixels = np.stack([load_pixels(getattr(s, modality), modality, prep)
                               for s in samples])
            value = normalize_pixels(pixels, prep[modality])
        elif modality == "numeric":
            value = standardize_numeric(np.asarray([s.numeric for s in samples]), prep["numeric"])
        else:
            value = tokenize([s.text or "" for s in samples], int(prep["text"]["buckets"]),
                             int(prep["text"]["length"]))
        feeds[entry["name"]] = value.astype(entry["dtype"])
    return feeds


def predict(bundle: Bundle, samples: list[Sample]) -> Predictions:
    """Class probabilities (softmax of the logits) for every sample."""
    chunks = []
    for start in range(0, len(samples), BATCH_SIZE):
        chunk = samples[start:start + BATCH_SIZE]
        feeds = model_inputs(bundle, chunk)
        try:
            logits = bundle.session.run(None, feeds)[0]
        except Exception as error:  # onnxruntime's own types: InvalidArgument, Fail, ...
            reason = (str(error).strip() or type(error).__name__).splitlines()[0][:200]
            raise BundleError(f"{bundle.folder / ONNX_FILE}: rejects the inputs "
                              f"{META_FILE} describes ({reason})") from None
        if logits.shape != (len(chunk), len(bundle.classes)):
            raise BundleError(f"{bundle.folder / ONNX_FILE}: returns shape {logits.shape}, "
                              f"expected (samples, {len(bundle.classes)} labels)")
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        chunks.append(shifted / shifted.sum(axis=1, keepdims=True))
    return Predictions(samples, np.concatenate(chunks), bundle.classes)


def write_csv(path: Path, result: Predictions) -> None:
    """One row per sample: sample, label, probability, true label, each class's probability."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sample", "label", "probability", "true_label",
                         *(f"p_{name}" for name in result.classes)])
        for sample, label, row in zip(result.samples, result.labels, result.probabilities,
                                      strict=True):
            writer.writerow([sample.name, label, f"{row.max():.6f}", sample.label or "",
                             *(f"{p:.6f}" for p in row)])


def run_predict(folder: Path, inputs: list[Path], *, extra: ExtraInputs | None = None,
                out: Path | None = None, console: Console | None = None) -> Predictions:
    """Predict ``inputs`` with the bundle in ``folder``; print or write the results.

    Raises:
        BundleError: The bundle is invalid, or an input is missing, unreadable or lacks a
            modality the model needs.
    """
    console = console or Console()
    bundle = load_bundle(folder)
    samples = collect_samples(bundle, inputs, extra or ExtraInputs())
    result = predict(bundle, samples)
    if out is not None:
        write_csv(out, result)
        console.print(f"wrote {len(samples)} prediction(s) to {out}", markup=False)
    else:
        width = max(len(s.name) for s in samples)
        for sample, label, row in zip(samples, result.labels, result.probabilities, strict=True):
            truth = f"  (true: {sample.label})" if sample.label else ""
            console.print(f"{sample.name:<{width}}  {label}  {row.max():.4f}{truth}",
                          markup=False, highlight=False, soft_wrap=True)
    scores = result.scores()
    if scores is not None:
        f1, accuracy, count = scores
        console.print(f"macro F1 {f1:.4f}, accuracy {accuracy:.4f} on {count} labelled sample(s)")
    return result
