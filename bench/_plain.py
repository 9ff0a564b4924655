"""The plain approach's data path, the baseline of ``bench/search_efficiency.py``.

What a hand-written training script usually does: decode and resize every image from its
file each time a batch needs it (no cache), and run the augmentation on the fly for every
training batch (no balanced set generated once). Everything else (index, splits, class
weights, numeric standardisation, tokens, batch layout) is ``search``'s own, so the
comparison changes only what the benchmark claims to measure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import augment
from search.config import StudyConfig
from search.data.cache import split_arrays
from search.data.decode import ImageError, decode_image
from search.data.demo import ensure_demo
from search.data.index import DatasetIndex, load_index
from search.data.prepared import PreparedData, Split
from search.errors import DataError


@dataclass
class DiskSplit:
    """A split whose images are decoded from their files for every batch.

    ``base`` holds labels, numeric values and tokens (cheap, in memory); ``files`` the image
    file of each row per image modality. With ``ops`` every batch goes through a fresh
    Augmentor draw, the same for all image modalities of a sample.
    """

    base: Split
    files: dict[str, list[Path]]
    resolution: int
    ops: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    @property
    def labels(self) -> np.ndarray:
        return self.base.labels

    def __len__(self) -> int:
        return len(self.base)

    def images(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Decode (and, with ``ops``, augment) the images of ``rows``."""
        images = {modality: np.stack([self._decode(paths[r], modality) for r in rows])
                  for modality, paths in self.files.items()}
        if self.ops:
            images = augment.augment_rows(images, np.arange(len(rows)), ops=self.ops,
                                          seed=int(self._rng.integers(2**31)))
        return images

    def gather(self, rows: np.ndarray, *, pin: bool = False) -> dict[str, torch.Tensor]:
        """:meth:`search.data.prepared.Split.gather`, the images decoded from their files."""
        base = self.base
        part = Split(base.labels[rows], self.images(rows),
                     None if base.numeric is None else base.numeric[rows],
                     None if base.tokens is None else base.tokens[rows],
                     rgb_mean=base.rgb_mean, rgb_std=base.rgb_std)
        return part.gather(np.arange(len(rows)), pin=pin)

    def to_device(self, host: dict[str, torch.Tensor], device: torch.device,
                  channels_last: bool, *, non_blocking: bool = False):
        """:meth:`search.data.prepared.Split.to_device` (no per-batch flips: Augmentor ran)."""
        # to_device reads only the names of the image modalities from the split.
        names = Split(self.base.labels, dict.fromkeys(self.files), rgb_mean=self.base.rgb_mean,
                      rgb_std=self.base.rgb_std)
        return names.to_device(host, device, channels_last, non_blocking=non_blocking)

    def assemble(self, rows: np.ndarray, device: torch.device, channels_last: bool):
        """:meth:`search.data.prepared.Split.assemble`: both halves, from decoded files."""
        return self.to_device(self.gather(rows), device, channels_last)

    def batch(self, rows: np.ndarray, device: torch.device, channels_last: bool) -> dict:
        """Same batch layout as :meth:`search.data.prepared.Split.batch`, from decoded files."""
        return self.assemble(rows, device, channels_last)[0]

    def _decode(self, path: Path, modality: str) -> np.ndarray:
        try:
            return decode_image(path, modality, self.resolution)
        except ImageError as error:
            raise DataError(f"{path}: {error.reason}") from None


class PlainData(PreparedData):
    """:class:`search.data.prepared.PreparedData` without the image or balanced-set caches."""

    def split(self, name: str, *, rgb: dict | None = None) -> DiskSplit:
        return self._disk_split(name, np.arange(len(self.arrays[name])), ops=(), rgb=rgb)

    def train_split(self, strategy: str, *, seed: int = 0, rgb: dict | None = None,
                    crop: str = "none") -> tuple[DiskSplit, np.ndarray | None]:
        if crop != "none":  # the baseline decodes at the resolution: no margin to crop from
            raise ValueError(f"the plain data path has no crop {crop!r}")
        labels = self.arrays["train"].labels
        rows, weights = np.arange(len(labels)), None
        if strategy == "oversample":
            rows = oversampled_rows(labels, self.config.augment.target_per_class,
                                    seed=self.config.study.seed)
        elif strategy == "class_weights":
            weights = augment.inverse_frequency_weights(labels, len(self.classes))
        split = self._disk_split("train", rows, ops=tuple(self.config.augment.ops), seed=seed,
                                 rgb=rgb)
        return split, weights

    def _disk_split(self, name: str, rows: np.ndarray, *, ops: tuple[str, ...],
                    seed: int = 0, rgb: dict | None = None) -> DiskSplit:
        samples = self.index.splits[name]
        files = {m: [getattr(samples[r], m) for r in rows]
                 for m in ("rgb", "depth") if m in self.index.modalities}
        return DiskSplit(self._to_split(self.arrays[name], rows, rgb), files,
                         self.config.train.resolution, ops=ops, seed=seed)


def oversampled_rows(labels: np.ndarray, target: int | str, *, seed: int) -> np.ndarray:
    """Every row once, plus random repeats of each class's rows up to ``target`` per class.

    The variation between repeats comes from the on-the-fly augmentation, not from copies
    generated up front.
    """
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels)
    goal = int(counts.max()) if target == "max" else int(target)
    rows = [np.arange(len(labels))]
    for label, count in enumerate(counts):
        if 0 < count < goal:
            rows.append(rng.choice(np.flatnonzero(labels == label), goal - count))
    return np.concatenate(rows)


def load_plain_data(config: StudyConfig) -> PlainData:
    """Index and validate the data set like ``search`` does, but decode no image yet."""
    ensure_demo(config.data, seed=config.study.seed)
    index: DatasetIndex = load_index(config.data, seed=config.study.seed)
    return PlainData(config, index, split_arrays(index, {}))
