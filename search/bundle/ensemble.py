"""``search export --ensemble K`` and ``--bias``: a final model better than any single trial.

The K best trials (by validation macro F1) become one ONNX graph that takes the images scaled
to [0, 1], normalizes them for each member itself (lite and b backbones want different mean and
std), and returns ``log(sum_m w_m softmax(member_m)) + bias``: the weighted mean of the members'
class probabilities, in log space so that ``softmax`` of the output gives them back, plus an
optional per-class bias that moves the decision thresholds towards macro F1. ``search predict``
and a plain onnxruntime client follow ``model.json`` as for a single model; nothing else.

The weights (greedy ensemble selection) and the bias are fitted on the validation split; each
step's effect is first estimated by cross-fitting inside it (:mod:`search.bundle.posthoc`) and
the test split is only scored, never used to choose.
"""

from __future__ import annotations

import datetime
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import optuna
import torch
from optuna.trial import TrialState
from rich.console import Console
from safetensors.torch import save_file
from torch import nn

import models
from search.bundle import export as single
from search.bundle.files import BUNDLE_FORMAT, BUNDLE_VERSION, META_FILE, ONNX_FILE, WEIGHTS_FILE
from search.bundle.interval import bootstrap_macro_f1
from search.bundle.posthoc import cross_fit, fit_bias, fit_ensemble_weights, macro_f1
from search.config import StudyConfig
from search.data.decode import PIXEL_SCALE, bundle_preprocess_section
from search.data.prepared import Split
from search.errors import UserError
from search.study.open import open_study, study_artifacts_dir
from search.study.storage import redact
from search.trial.train import evaluate

# The ensemble's rgb input: pixels scaled to [0, 1], not normalized (each member does that).
RAW_RGB = {"scale": PIXEL_SCALE, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
_PREPROCESS_MUST_MATCH = ("resolution", "resize", "numeric", "text", "depth")


class EnsembleModel(nn.Module):
    """Members' softmax averaged with ``weights``; output ``log(mean) + bias`` ("logits").

    Reads a dict batch like a fusion model; its ``rgb`` is in [0, 1] and every member
    normalizes it with its own mean and std. Other inputs are passed as they are (the study's
    data decides them, so all members agree on them).
    """

    # Buffers, declared so that they type as tensors rather than nn.Module's Tensor | Module.
    rgb_mean: torch.Tensor
    rgb_std: torch.Tensor
    weights: torch.Tensor
    bias: torch.Tensor

    def __init__(self, members: Sequence[single.Network], rgb_norms: Sequence[dict],
                 weights: Sequence[float], bias: Sequence[float] | None = None) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.member_inputs = [tuple(m.input_names) for m in members]
        names = [n for inputs in self.member_inputs for n in inputs]
        self.input_names = tuple(sorted(set(names), key=lambda n: (n != "rgb", names.index(n))))
        self.register_buffer("rgb_mean", torch.tensor(
            [norm["mean"] for norm in rgb_norms], dtype=torch.float32).view(-1, 1, 3, 1, 1))
        self.register_buffer("rgb_std", torch.tensor(
            [norm["std"] for norm in rgb_norms], dtype=torch.float32).view(-1, 1, 3, 1, 1))
        self.register_buffer("weights", torch.tensor(list(weights), dtype=torch.float32))
        classes = None if bias is None else len(bias)
        self.register_buffer("bias", torch.zeros(classes or 1) if bias is None
                             else torch.tensor(list(bias), dtype=torch.float32))
        self.train(False)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        total: torch.Tensor | None = None
        for i, member in enumerate(self.members):
            inputs = {name: batch[name] for name in self.member_inputs[i]}
            inputs["rgb"] = (inputs["rgb"] - self.rgb_mean[i]) / self.rgb_std[i]
            share = torch.softmax(member(inputs).float(), dim=1) * self.weights[i]
            total = share if total is None else total + share
        assert total is not None
        # The floor keeps log finite where every member gives a class exactly 0.
        return torch.log(total.clamp_min(1e-12)) + self.bias


@dataclass
class Member:
    """One trial in the ensemble, with its probabilities on validation and test."""

    trained: single.TrialModel
    val: np.ndarray
    test: np.ndarray


def pick_members(study: optuna.Study, size: int, *,
                 diverse: bool) -> list[optuna.trial.FrozenTrial]:
    """The ``size`` best COMPLETE trials; ``diverse``: at most one per (backbone, fusion)."""
    complete = sorted((t for t in study.get_trials(deepcopy=False)
                       if t.state == TrialState.COMPLETE and t.value is not None),
                      key=lambda t: -cast(float, t.value))  # None filtered out above
    picked, seen = [], set()
    for trial in complete:
        kind = (trial.params.get("backbone"), trial.params.get("fusion"))
        if diverse and kind in seen:
            continue
        seen.add(kind)
        picked.append(trial)
        if len(picked) == size:
            break
    if not picked:
        raise UserError(f"study {study.study_name!r} has no completed trial yet; nothing to export")
    return picked


@torch.no_grad()
def member_probabilities(trained: single.TrialModel, split: Split) -> np.ndarray:
    """A member's class probabilities on a split whose rgb is [0, 1] (``RAW_RGB``)."""
    alone = EnsembleModel([trained.model], [trained.preprocess["rgb"]], [1.0])
    chunks = []
    for start in range(0, len(split), 128):
        batch = split.batch(np.arange(start, min(start + 128, len(split))), torch.device("cpu"),
                            channels_last=False)
        chunks.append(alone(batch).exp().numpy())
    return np.concatenate(chunks).astype(np.float64)


def export_ensemble(config: StudyConfig, storage_url: str, out: Path, *, size: int,
                    diverse: bool = False, bias: bool = False,
                    console: Console | None = None) -> dict:
    """Export the ``size`` best trials as one bundle (``size`` 1 with ``bias``: one trial).

    Returns:
        The bundle's ``model.json`` content.

    Raises:
        UserError: No completed trial, a member's checkpoint is unusable, the members were
            trained on differently prepared data, or onnxruntime disagrees with PyTorch.
    """
    console = console or Console()
    single.check_out(out)
    study = open_study(config, storage_url)
    trials = pick_members(study, size, diverse=diverse)
    artifacts = study_artifacts_dir(config, study)
    trained = [single.load_trial_model(study, t, artifacts) for t in trials]
    val, test = raw_splits(config, trained)
    console.print(f"members: trials {', '.join(str(t.number) for t in trials)}; fitting on "
                  f"{len(val)} validation samples, scoring {len(test)} test samples")
    members = [Member(t, member_probabilities(t, val), member_probabilities(t, test))
               for t in trained]
    fitted = fit(members, val.labels, use_bias=bias)
    kept = [i for i, w in enumerate(fitted.weights) if w > 0]
    model = EnsembleModel([members[i].trained.model for i in kept],
                          [members[i].trained.preprocess["rgb"] for i in kept],
                          [fitted.weights[i] for i in kept],
                          fitted.bias.tolist() if bias else None)
    num_classes = len(trained[0].classes)
    result = evaluate(model, test, device=torch.device("cpu"), speed=single._FP32,
                      num_classes=num_classes)
    console.print("exporting to ONNX and checking it against PyTorch on the test split...")
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        example = _example(model, trained)
        single.export_graph(model, example, building / ONNX_FILE)
        session = single._session(building / ONNX_FILE)
        check = single.compare_onnx(model, session, test)
        if not check.agrees:
            raise UserError(f"onnxruntime and PyTorch disagree on the test split (max |logit "
                            f"difference| {check.max_abs_diff:.3g} > {check.tolerance:.3g}); "
                            "no bundle written")
        tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(building / WEIGHTS_FILE), metadata={"format": "pt"})
        meta = _metadata(config, study, storage_url, model, members, kept, fitted, result,
                         test, session, check, bias=bias)
        meta["onnx_opset"] = single._opset(building / ONNX_FILE)
        (building / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        single._usual_permissions(building)
        single.move_into_place(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    _report(console, meta, out)
    return meta


@dataclass
class Fitted:
    """Weights and bias fitted on validation, with the honest (out-of-fold) estimates."""

    weights: np.ndarray
    bias: np.ndarray
    steps: dict


def fit(members: list[Member], labels: np.ndarray, *, use_bias: bool) -> Fitted:
    """Ensemble weights (when there are several members), then the bias on the blend."""
    num_classes = members[0].val.shape[1]
    val = np.stack([m.val for m in members])  # [M, N, K]
    steps: dict = {}
    if len(members) > 1:
        weights = fit_ensemble_weights(val, labels)
        estimate = cross_fit(labels, num_classes, baseline=val[0], fit_and_apply=lambda f, a:
                             np.tensordot(fit_ensemble_weights(val[:, f], labels[f]), val[:, a],
                                          axes=1))
        steps["ensemble"] = _step(estimate)
    else:
        weights = np.ones(1)
    blend = np.log(np.clip(np.tensordot(weights, val, axes=1), 1e-12, None))
    bias = np.zeros(num_classes)
    if use_bias:
        bias = fit_bias(blend, labels)
        estimate = cross_fit(labels, num_classes, baseline=blend, fit_and_apply=lambda f, a:
                             blend[a] + fit_bias(blend[f], labels[f]))
        steps["bias"] = _step(estimate)
    return Fitted(weights=weights, bias=bias, steps=steps)


def _step(estimate) -> dict:
    return {"val_macro_f1_before": estimate.before,
            "val_macro_f1_after_out_of_fold": estimate.after_out_of_fold,
            "folds": estimate.folds,
            "note": "fitted on all folds but one, scored on the one left out"}


def raw_splits(config: StudyConfig, trained: list[single.TrialModel]) -> tuple[Split, Split]:
    """Validation and test with rgb in [0, 1]; every member must have seen the same data."""
    first = trained[0].preprocess
    for other in trained[1:]:
        if any(other.preprocess.get(k) != first.get(k) for k in _PREPROCESS_MUST_MATCH):
            raise UserError(f"trials {trained[0].trial.number} and {other.trial.number} were "
                            "trained on differently prepared data (resolution, resize, depth "
                            "range or numeric statistics); export them one at a time")
    data = single.prepare_trial_data(config, trained[0])  # the checks a single export makes
    val, test = data.split("val", rgb=RAW_RGB), data.split("test", rgb=RAW_RGB)
    if len(test) == 0:
        raise UserError(f"the test split of {config.data.root} is empty; export needs it "
                        "to score the model and check the ONNX graph")
    return val, test


def _example(model: EnsembleModel, trained: list[single.TrialModel]) -> dict[str, torch.Tensor]:
    example: dict[str, torch.Tensor] = {}
    for member in trained:
        example.update(models.example_inputs(member.spec, batch_size=2))
    return {name: example[name] for name in model.input_names}


def _metadata(config: StudyConfig, study: optuna.Study, storage_url: str,
              model: EnsembleModel, members: list[Member], kept: list[int], fitted: Fitted,
              result, test: Split, session, check, *, bias: bool) -> dict:
    classes = members[0].trained.classes
    best = members[0]
    labels = test.labels
    best_test = macro_f1(labels, best.test, len(classes))
    blend = np.log(np.clip(np.tensordot(fitted.weights, np.stack([m.test for m in members]),
                                        axes=1), 1e-12, None))
    preprocess = dict(best.trained.preprocess, rgb=RAW_RGB)
    interval = bootstrap_macro_f1(result.confusion)
    # The exported model's validation score without selection's optimism: the last fitted
    # step's out-of-fold estimate; with nothing fitted, the one trial's own score.
    steps = list(fitted.steps.values())
    val = steps[-1]["val_macro_f1_after_out_of_fold"] if steps else best.trained.trial.value
    return {
        "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION,
        "labels": {str(i): name for i, name in enumerate(classes)},
        "inputs": single.describe_inputs(session),
        "outputs": [{"name": "logits", "shape": ["batch", len(classes)], "dtype": "float32",
                     "note": "log of the members' weighted mean probability plus the per-class "
                             "bias; softmax gives the (bias-adjusted) probabilities"}],
        "preprocess": bundle_preprocess_section(preprocess, model.input_names),
        "architecture": {
            "ensemble": True,
            "params": sum(p.numel() for p in model.parameters()),
            "members": [{
                "trial": members[i].trained.trial.number,
                "val_macro_f1": members[i].trained.trial.value,
                "weight": float(fitted.weights[i]),
                "backbone": members[i].trained.spec.backbone,
                "fusion": members[i].trained.spec.fusion,
                "tta": list(getattr(members[i].trained.model, "ops", [])),
                "spec": members[i].trained.spec.to_dict(),
                "preprocess": single.bundle_preprocess(members[i].trained),
            } for i in kept],
            "dropped_members": [members[i].trained.trial.number
                                for i in range(len(members)) if i not in kept],
        },
        "postprocess": {"bias": fitted.bias.tolist() if bias else None,
                        "steps": fitted.steps},
        "metrics": {
            "val_macro_f1": val,
            "test_macro_f1": result.macro_f1,
            "val_test_gap": (val or 0.0) - result.macro_f1,
            "test_macro_f1_interval": interval.to_dict(),
            "test_accuracy": result.accuracy,
            "per_class_f1": {"test": dict(zip(classes, result.per_class_f1, strict=True))},
            "test_confusion": result.confusion,
            "confusion_axes": "rows: true class, columns: predicted class, in label order",
            "test_samples": len(test),
            "best_single_trial": {"trial": best.trained.trial.number,
                                  "val_macro_f1": best.trained.trial.value,
                                  "test_macro_f1": best_test},
            "ensemble_without_bias_test_macro_f1": macro_f1(labels, blend, len(classes)),
        },
        "study": {"name": study.study_name, "storage": redact(storage_url),
                  "study_file": study.user_attrs.get("study_file", str(config.source)),
                  "direction": study.direction.name.lower()},
        "onnx_max_abs_diff": check.max_abs_diff,
        "onnx_tolerance": check.tolerance,
        "onnx_max_abs_logit": check.max_abs_logit,
        "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _report(console: Console, meta: dict, out: Path) -> None:
    metrics, arch = meta["metrics"], meta["architecture"]
    interval = metrics["test_macro_f1_interval"]
    best = metrics["best_single_trial"]
    members = ", ".join(f"trial {m['trial']} x{m['weight']:.2f}" for m in arch["members"])
    lines = [f"exported an ensemble of {len(arch['members'])} to {out}: {members}"]
    for name, step in meta["postprocess"]["steps"].items():
        lines.append(f"  {name}: val macro F1 {step['val_macro_f1_before']:.4f} -> "
                     f"{step['val_macro_f1_after_out_of_fold']:.4f} out of fold "
                     f"({step['folds']} folds)")
    lines += [
        f"  test macro F1 {metrics['test_macro_f1']:.4f} (95% interval {interval['low']:.3f}-"
        f"{interval['high']:.3f}); best single trial {best['trial']}: val "
        f"{best['val_macro_f1']:.4f}, test {best['test_macro_f1']:.4f}",
        f"  val - test gap {metrics['val_test_gap']:+.4f} (val {metrics['val_macro_f1']:.4f}, "
        f"out of fold where anything was fitted): the test score is the one to expect",
        f"  onnxruntime vs PyTorch, test split: max |logit diff| "
        f"{meta['onnx_max_abs_diff']:.1e} (tolerance {meta['onnx_tolerance']:.1e})",
    ]
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
