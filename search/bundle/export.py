"""``search export``: one trial of a study -> a self-contained bundle (DESIGN.md, "Export bundle").

The network is rebuilt from the trial's checkpoint artifact (spec, weights, classes and
preprocessing), scored on the test split, exported to ONNX and checked against PyTorch on
that split. The bundle is written into a temporary folder and moved into place only when
everything succeeded, so a half-written or disagreeing bundle never appears at ``--out``.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from safetensors.torch import save_file

import models
from search.bundle.files import BUNDLE_FORMAT, BUNDLE_VERSION, META_FILE, ONNX_FILE, WEIGHTS_FILE
from search.bundle.interval import bootstrap_macro_f1
from search.config import StudyConfig
from search.data.decode import bundle_preprocess_section
from search.data.prepared import PreparedData, Split, prepare_data
from search.errors import UserError
from search.study.open import open_study, study_artifacts_dir
from search.study.storage import redact
from search.trial.artifacts import CHECKPOINT, load_checkpoint
from search.trial.train import Evaluation, Speedups, evaluate
from search.trial.tta import TTAModel

if TYPE_CHECKING:  # ensemble imports this module
    from search.bundle.ensemble import EnsembleModel

# onnxruntime and PyTorch may differ per logit by ONNX_ATOL + ONNX_RTOL x the largest |logit|:
# float32 rounding grows with the logits (trained models reach hundreds; we saw 6e-7 of the
# largest), while a wrong graph is off by far more.
ONNX_ATOL = 1e-3
ONNX_RTOL = 1e-4
_CPU = torch.device("cpu")
_FP32 = Speedups(channels_last=False, autocast_dtype=None)  # export is checked in plain fp32
_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64"}
_DATA_DEPENDENT = ("resolution", "numeric", "text")  # preprocess entries the data decides

# What a trial exports: its fusion model, or that model averaged over test-time views.
Network = models.FusionModel | TTAModel


@dataclass
class TrialModel:
    """A trial's network rebuilt from its checkpoint, in eval mode and ready to export."""

    trial: FrozenTrial
    spec: models.ModelSpec
    model: Network
    state_dict: dict[str, torch.Tensor]
    classes: list[str]
    preprocess: dict


def pick_trial(study: optuna.Study, number: int | None) -> FrozenTrial:
    """The best trial, or trial ``number``; it must be COMPLETE.

    Raises:
        UserError: No completed trial, no such trial, or the trial is not COMPLETE.
    """
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if number is None:
        if not complete:
            raise UserError(f"study {study.study_name!r} has no completed trial yet "
                            f"({len(trials)} trial(s) in other states); nothing to export")
        return study.best_trial
    found = next((t for t in trials if t.number == number), None)
    if found is None:
        known = f"trials 0..{len(trials) - 1}" if trials else "no trials"
        raise UserError(f"study {study.study_name!r} has no trial {number} ({known})")
    if found.state != TrialState.COMPLETE:
        best = f"; the best complete trial is {study.best_trial.number}" if complete else ""
        raise UserError(f"trial {number} of study {study.study_name!r} is "
                        f"{found.state.name}, not COMPLETE{best}")
    return found


def load_trial_model(study: optuna.Study, trial: FrozenTrial, artifacts_dir: Path) -> TrialModel:
    """Rebuild the network of ``trial`` from its checkpoint artifact.

    Raises:
        UserError: The trial has no checkpoint artifact, its file is gone, or it is unreadable.
    """
    where = f"trial {trial.number} of study {study.study_name!r}"
    store = FileSystemArtifactStore(str(artifacts_dir))
    try:
        checkpoint = load_checkpoint(store, study._storage, trial)
    except ArtifactNotFound:
        raise UserError(f"{where}: its {CHECKPOINT} artifact is missing from the artifact "
                        f"store {artifacts_dir}") from None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise UserError(f"{where}: cannot read its {CHECKPOINT} artifact "
                        f"({_first_line(error)})") from None
    if checkpoint is None:
        raise UserError(f"{where} has no {CHECKPOINT} artifact")
    try:
        spec = models.ModelSpec.from_dict(checkpoint["spec"])
        model = models.create_model(spec)
        model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, ValueError, RuntimeError) as error:
        raise UserError(f"{where}: its checkpoint does not fit the models package "
                        f"({_first_line(error)})") from None
    prepared = models.prepare_for_export(model)
    views = checkpoint.get("tta") or []  # the trial was validated on these views: ship them
    return TrialModel(trial=trial, spec=spec,
                      model=TTAModel(prepared, views) if views else prepared,
                      state_dict=checkpoint["state_dict"], classes=list(checkpoint["classes"]),
                      preprocess=checkpoint["preprocess"])


def prepare_trial_data(config: StudyConfig, trained: TrialModel) -> PreparedData:
    """The study's data, prepared exactly as the trial's was.

    Raises:
        UserError: The data set changed since the trial trained.
    """
    # Decode as the trial did: checkpoints from before [train] resize existed were squashed.
    resize = trained.preprocess.get("resize", "squash")
    config = config.model_copy(update={"train": config.train.model_copy(update={"resize": resize})})
    data = prepare_data(config)
    if data.classes != trained.classes:
        raise UserError(f"the data set's classes {data.classes} differ from those trial "
                        f"{trained.trial.number} was trained on {trained.classes}")
    current = data.preprocess.to_dict()
    if any(current.get(key) != trained.preprocess.get(key) for key in _DATA_DEPENDENT) or (
            current["depth"].get("range") != trained.preprocess["depth"].get("range")):
        raise UserError(f"the data set changed since trial {trained.trial.number} trained "
                        "(resolution or numeric statistics or depth range differ); cannot "
                        "score it fairly")
    return data


def load_test_split(config: StudyConfig, trained: TrialModel) -> Split:
    """The study's test split, preprocessed exactly as the trial's data was.

    Raises:
        UserError: The data set changed since the trial trained, or its test split is empty.
    """
    split = prepare_trial_data(config, trained).split("test", rgb=trained.preprocess["rgb"])
    if len(split) == 0:
        raise UserError(f"the test split of {config.data.root} is empty; export needs it "
                        "to score the model and check the ONNX graph")
    return split


def export_onnx(trained: TrialModel, path: Path) -> None:
    """Write the ONNX graph: inputs named by modality, a dynamic batch, output ``logits``."""
    example = models.example_inputs(trained.spec, batch_size=2)
    export_graph(trained.model, example, path)


def export_graph(model: Network | EnsembleModel, example: dict[str, torch.Tensor],
                 path: Path) -> None:
    """Export a model that reads a dict batch (its ``input_names``) as an ONNX graph."""
    names = list(model.input_names)
    args = tuple(example[name] for name in names)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        # The shared batch dimension makes the exporter note that it renames nothing.
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(
            models.PositionalInputs(model), args, str(path),
            input_names=names, output_names=["logits"], dynamo=True,
            external_data=False, dynamic_shapes=tuple({0: batch} for _ in args), verbose=False)


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; the optimizer's notes are not for users
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class OnnxCheck:
    """How far onnxruntime's logits are from PyTorch's on the test split."""

    max_abs_diff: float
    max_abs_logit: float

    @property
    def tolerance(self) -> float:
        return ONNX_ATOL + ONNX_RTOL * self.max_abs_logit

    @property
    def agrees(self) -> bool:
        return self.max_abs_diff <= self.tolerance  # False for NaN too


def check_onnx(trained: TrialModel, session: ort.InferenceSession, split: Split,
               batch_size: int = 64) -> OnnxCheck:
    """Run both on every sample of ``split`` and compare the logits."""
    return compare_onnx(trained.model, session, split, batch_size)


@torch.no_grad()
def compare_onnx(model: Network | EnsembleModel, session: ort.InferenceSession,
                 split: Split, batch_size: int = 64) -> OnnxCheck:
    """Run ``model`` and the graph on every sample of ``split`` and compare the logits."""
    model.eval()
    diff = largest = 0.0
    for start in range(0, len(split), batch_size):
        rows = np.arange(start, min(start + batch_size, len(split)))
        batch = split.batch(rows, _CPU, channels_last=False)
        expected = model(batch).numpy()
        feeds = {name: batch[name].numpy() for name in model.input_names}
        (logits,) = session.run(["logits"], feeds)
        diff = max(diff, float(np.abs(logits - expected).max()))
        largest = max(largest, float(np.abs(expected).max()))
    return OnnxCheck(max_abs_diff=diff, max_abs_logit=largest)


def describe_inputs(session: ort.InferenceSession) -> list[dict]:
    """``model.json``'s ``inputs``, read from the graph itself so they cannot disagree."""
    return [{"name": arg.name, "modality": arg.name,
             "shape": [d if isinstance(d, int) else "batch" for d in arg.shape],
             "dtype": _DTYPES.get(arg.type, arg.type)} for arg in session.get_inputs()]


def bundle_preprocess(trained: TrialModel) -> dict:
    """The checkpoint's preprocessing, reduced to the model's inputs and made explicit."""
    return bundle_preprocess_section(trained.preprocess, trained.spec.input_names)


def bundle_metrics(trained: TrialModel, test: Evaluation, n_test: int) -> dict:
    """Validation metrics from the trial, test metrics from :func:`search.trial.train.evaluate`."""
    attrs = trained.trial.user_attrs
    interval = bootstrap_macro_f1(test.confusion)
    return {
        "val_macro_f1": trained.trial.value,
        "val_accuracy": attrs.get("accuracy"),
        "test_macro_f1": test.macro_f1,
        "test_macro_f1_interval": interval.to_dict(),
        # The winner was chosen on validation: this is how much of its score was selection.
        "val_test_gap": (trained.trial.value or 0.0) - test.macro_f1,
        "test_accuracy": test.accuracy,
        "per_class_f1": {
            "val": attrs.get("per_class_f1", {}),
            "test": dict(zip(trained.classes, test.per_class_f1, strict=True)),
        },
        "test_confusion": test.confusion,
        "confusion_axes": "rows: true class, columns: predicted class, in label order",
        "test_samples": n_test,
    }


def bundle_metadata(config: StudyConfig, study: optuna.Study, storage_url: str,
                    trained: TrialModel, session: ort.InferenceSession, test: Evaluation,
                    n_test: int, check: OnnxCheck) -> dict:
    """Everything ``model.json`` holds (see DESIGN.md, "Export bundle")."""
    trial, spec = trained.trial, trained.spec
    return {
        "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION,
        "labels": {str(i): name for i, name in enumerate(trained.classes)},
        "inputs": describe_inputs(session),
        "outputs": [{"name": "logits", "shape": ["batch", len(trained.classes)],
                     "dtype": "float32", "note": "softmax over classes gives probabilities"}],
        "preprocess": bundle_preprocess(trained),
        "architecture": {"spec": spec.to_dict(), "backbone": spec.backbone,
                         "tta": list(getattr(trained.model, "ops", [])),
                         "fusion": spec.fusion, "modality": spec.modality,
                         "params": sum(p.numel() for p in trained.model.parameters())},
        "metrics": bundle_metrics(trained, test, n_test),
        "study": {"name": study.study_name, "storage": redact(storage_url),
                  "study_file": study.user_attrs.get("study_file", str(config.source)),
                  "direction": study.direction.name.lower()},
        "trial": {"number": trial.number, "value": trial.value, "params": trial.params,
                  "datetime_complete": str(trial.datetime_complete),
                  "best_epoch": trial.user_attrs.get("best_epoch")},
        "onnx_max_abs_diff": check.max_abs_diff,
        "onnx_tolerance": check.tolerance,
        "onnx_max_abs_logit": check.max_abs_logit,
        "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def check_out(out: Path) -> None:
    """``--out`` may be new, an empty folder or an earlier bundle (which is replaced)."""
    if out.exists() and (not out.is_dir()
                         or (any(out.iterdir()) and not (out / META_FILE).is_file())):
        raise UserError(f"{out} exists and is not an export bundle; choose another --out")


def move_into_place(built: Path, out: Path) -> None:
    """Replace ``out`` by the finished bundle folder ``built``."""
    check_out(out)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(built, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(built, out)


def write_bundle(folder: Path, trained: TrialModel, split: Split,
                 ) -> tuple[ort.InferenceSession, OnnxCheck]:
    """Write the ONNX graph and the weights into ``folder``; check the graph against PyTorch.

    Raises:
        UserError: onnxruntime and PyTorch disagree beyond :attr:`OnnxCheck.tolerance`.
    """
    export_onnx(trained, folder / ONNX_FILE)
    session = _session(folder / ONNX_FILE)
    check = check_onnx(trained, session, split)
    if not check.agrees:
        raise UserError(f"onnxruntime and PyTorch disagree on the test split (max |logit "
                        f"difference| {check.max_abs_diff:.3g} > {check.tolerance:.3g}); "
                        "no bundle written")
    tensors = {key: value.detach().contiguous() for key, value in trained.state_dict.items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return session, check


def export_trial(config: StudyConfig, storage_url: str, out: Path, *,
                 trial_number: int | None = None, console: Console | None = None) -> dict:
    """Export the best trial (or ``trial_number``) of the study into the bundle folder ``out``.

    Returns:
        The bundle's ``model.json`` content.

    Raises:
        UserError: See :func:`pick_trial`, :func:`load_trial_model`, :func:`load_test_split`
            and :func:`write_bundle`; nothing is written to ``out`` then.
    """
    console = console or Console()
    check_out(out)
    study = open_study(config, storage_url)
    trial = pick_trial(study, trial_number)
    trained = load_trial_model(study, trial, study_artifacts_dir(config, study))
    split = load_test_split(config, trained)
    console.print(f"trial {trial.number}: {trained.spec.backbone}, fusion {trained.spec.fusion}"
                  f", val macro F1 {trial.value:.4f}; scoring {len(split)} test samples")
    test = evaluate(trained.model, split, device=_CPU, speed=_FP32,
                    num_classes=len(trained.classes))
    console.print("exporting to ONNX and checking it against PyTorch on the test split...")
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        session, check = write_bundle(building, trained, split)
        meta = bundle_metadata(config, study, storage_url, trained, session, test, len(split),
                               check)
        meta["onnx_opset"] = _opset(building / ONNX_FILE)
        (building / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _usual_permissions(building)
        move_into_place(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    _report(console, meta, out)
    return meta


def _usual_permissions(folder: Path) -> None:
    """mkdtemp and safetensors create owner-only files; a bundle is meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _opset(path: Path) -> int | None:
    graph = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)


def _report(console: Console, meta: dict, out: Path) -> None:
    metrics = meta["metrics"]
    interval = metrics["test_macro_f1_interval"]
    sizes = ", ".join(f"{name} ({(out / name).stat().st_size / 1e6:.1f} MB)"
                      for name in (ONNX_FILE, WEIGHTS_FILE))
    lines = [
        f"exported trial {meta['trial']['number']} of study {meta['study']['name']!r} to {out}",
        f"  val macro F1 {metrics['val_macro_f1']:.4f} | test macro F1 "
        f"{metrics['test_macro_f1']:.4f} (95% interval {interval['low']:.3f}-"
        f"{interval['high']:.3f}) | test accuracy {metrics['test_accuracy']:.4f} "
        f"({metrics['test_samples']} samples)",
        f"  val - test gap {metrics['val_test_gap']:+.4f}: the trial was chosen on validation, "
        f"so its val score is optimistic; the test score is the one to expect",
        f"  onnxruntime vs PyTorch, test split: max |logit diff| "
        f"{meta['onnx_max_abs_diff']:.1e} (tolerance {meta['onnx_tolerance']:.1e})",
        f"  files: {sizes}, {META_FILE}",
    ]
    for line in lines:  # whole lines, whatever the terminal's width: they are read by scripts
        console.print(line, markup=False, highlight=False, soft_wrap=True)
