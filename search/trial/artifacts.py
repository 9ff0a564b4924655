"""Trial artifacts in Optuna's artifact store: checkpoint, confusion matrix, learning curve,
metrics; and the trial's note in optuna-dashboard.

The checkpoint holds everything export needs to rebuild the network without the data set:
the model spec, the weights, the class names and the preprocessing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import matplotlib
import numpy as np
import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta
from sklearn.metrics import ConfusionMatrixDisplay

matplotlib.use("Agg")  # no display: render straight to PNG
import matplotlib.pyplot as plt

CHECKPOINT = "checkpoint.pt"
CONFUSION = "confusion_matrix.png"
LEARNING_CURVE = "learning_curve.png"
METRICS = "metrics.json"


class AtomicArtifactStore(FileSystemArtifactStore):
    """Optuna's file-system artifact store, whose files appear whole or not at all.

    Optuna records an artifact before it writes the file, and writes it in place: a full
    disk or a killed worker left a truncated checkpoint that export would later choke on.
    Here the bytes go to a hidden temporary file beside it, flushed to disk, then renamed; a
    failed write removes it (only a SIGKILL mid-write can leave one, named ``.*.partial``).
    Either way the artifact is missing, not corrupt, and its trial is FAIL.
    """

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        path = Path(self._get_filepath(artifact_id))  # private: optuna<6 in pyproject.toml
        with atomic_file(path, path.with_name(f".{path.name}.{os.getpid()}.partial")) as file:
            shutil.copyfileobj(content_body, file)


@contextlib.contextmanager
def atomic_file(path: Path, partial: Path) -> Iterator[BinaryIO]:
    """A file to write ``path`` through: whole, or not at all.

    The bytes go to ``partial`` (beside ``path``: a rename is atomic only within one file
    system), are flushed to disk, and replace ``path`` in one rename; readers see the old
    file or the new one, never half of one. An error (a full disk) removes ``partial``; only
    a SIGKILL mid-write leaves it behind, so callers name it where they can find it again.
    """
    try:
        with open(partial, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def create_artifact_store(folder: Path) -> FileSystemArtifactStore:
    """The file-system artifact store under ``folder`` (created if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    return AtomicArtifactStore(str(folder))


def confusion_png(path: Path, confusion: list[list[int]], classes: list[str],
                  per_class_f1: list[float], title: str) -> None:
    """A confusion matrix with per-class F1 in the row labels, for the dashboard."""
    size = max(4.0, 0.7 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    # scikit-learn draws the matrix, the counts and their contrasting text colour; we only put
    # each class's F1 into its row label, which is what a person scans first.
    display = ConfusionMatrixDisplay(np.asarray(confusion), display_labels=classes)
    display.plot(ax=ax, cmap="Blues", xticks_rotation=45, values_format="d", colorbar=True)
    ax.set_yticks(range(len(classes)),
                  [f"{name} (F1 {f1:.2f})" for name, f1 in zip(classes, per_class_f1, strict=True)])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def learning_curve_png(path: Path, history: list[float], best_epoch: int, title: str) -> None:
    """Validation macro F1 per epoch, the kept epoch marked: is the curve still rising?"""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    epochs = range(1, len(history) + 1)
    ax.plot(epochs, history, marker="o", markersize=3, label="val macro F1")
    if 0 <= best_epoch < len(history):
        ax.plot([best_epoch + 1], [history[best_epoch]], "r*", markersize=12,
                label=f"kept: epoch {best_epoch + 1}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val macro F1")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def trial_note(metrics: dict, timing: dict[str, float]) -> str:
    """The Markdown note optuna-dashboard shows on a finished trial's page."""
    rows = "\n".join(f"| {name} | {f1:.3f} |"
                      for name, f1 in zip(metrics["classes"], metrics["per_class_f1"],
                                          strict=True))
    spent = ", ".join(f"{key.removesuffix('_s')} {seconds:.1f} s"
                      for key, seconds in timing.items() if key != "total_s")
    return (f"**val macro F1 {metrics['macro_f1']:.4f}** at epoch {metrics['best_epoch'] + 1} "
            f"of {len(metrics['history'])} (accuracy {metrics['accuracy']:.3f})\n\n"
            f"| class | val F1 |\n| --- | --- |\n{rows}\n\n"
            f"Time: {timing.get('total_s', 0.0):.1f} s in all ({spent}).\n")


def upload_trial_artifacts(store: FileSystemArtifactStore, trial: optuna.Trial, *,
                           checkpoint: dict, metrics: dict, classes: list[str]) -> None:
    """Write the four artifacts of a finished trial into the store."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.save(checkpoint, folder / CHECKPOINT)
        (folder / METRICS).write_text(json.dumps(metrics, indent=2))
        confusion_png(folder / CONFUSION, metrics["confusion"], classes,
                      metrics["per_class_f1"],
                      f"trial {trial.number}: val macro F1 {metrics['macro_f1']:.3f}")
        learning_curve_png(folder / LEARNING_CURVE, metrics["history"], metrics["best_epoch"],
                           f"trial {trial.number}")
        for name in (CHECKPOINT, CONFUSION, LEARNING_CURVE, METRICS):
            optuna.artifacts.upload_artifact(
                artifact_store=store, file_path=str(folder / name), study_or_trial=trial)


def find_artifact(trial: optuna.trial.FrozenTrial, storage, filename: str) -> str | None:
    """The id of the trial's artifact called ``filename``, or None."""
    for meta in get_all_artifact_meta(trial, storage=storage):
        if meta.filename == filename:
            return meta.artifact_id
    return None


def load_checkpoint(store: FileSystemArtifactStore, storage, trial: optuna.trial.FrozenTrial,
                    ) -> dict | None:
    """Download and load a trial's checkpoint; None if it has none."""
    artifact_id = find_artifact(trial, storage, CHECKPOINT)
    if artifact_id is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CHECKPOINT
        download_artifact(artifact_store=store, artifact_id=artifact_id, file_path=str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
