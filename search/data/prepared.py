"""From the study's data section to model-ready arrays: splits, balanced training set, batches.

Everything expensive (decoding, resizing, Augmentor) is cached on disk per content and
settings, so a trial only pays for it once per machine. What remains per trial is
gathering rows into tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

import augment
from search.config import StudyConfig
from search.data.cache import (
    SplitArrays,
    cached_arrays,
    depth_range,
    load_split_arrays,
    split_cache_key,
)
from search.data.decode import (
    DEPTH_MEAN,
    DEPTH_STD,
    PIXEL_SCALE,
    RGB_MEAN,
    RGB_STD,
    Preprocess,
    standardize_numeric,
    tokenize,
)
from search.data.demo import ensure_demo
from search.data.index import DatasetIndex, load_index


@dataclass
class Split:
    """One split as arrays ready to batch: uint8 images, standardised numeric, token ids.

    A training split may carry ``flip_ops`` (see :mod:`augment.online`): every batch then
    gets fresh random flips and quarter turns on the device, drawn from ``generator``; and
    ``crop_to``, the training resolution: every sample is then cut to a random box of its
    (larger) cached image and resized to ``crop_to``, after the flips (:mod:`augment.crop`).
    A batch is made in two halves so a background thread can do the first while the
    device trains (:mod:`search.trial.prefetch`): :meth:`gather` (host: copy the rows) and
    :meth:`to_device` (copy over, augment, normalise); :meth:`assemble` does both. On a CPU
    device the augmentation and normalisation are one compiled pass (:mod:`augment.fused`)
    with the same draws, which :meth:`assemble` feeds from the arrays themselves.
    RGB is normalized with ``rgb_mean`` and ``rgb_std`` (the trial's backbone's, see
    :meth:`PreparedData.split`).
    """

    labels: np.ndarray
    images: dict[str, np.ndarray]
    numeric: np.ndarray | None = None
    tokens: np.ndarray | None = None
    flip_ops: tuple[str, ...] = ()
    crop_to: int | None = None
    generator: torch.Generator | None = None
    rgb_mean: tuple[float, ...] = RGB_MEAN
    rgb_std: tuple[float, ...] = RGB_STD

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def per_batch(self) -> bool:
        """Whether every batch gets fresh flips, turns or crops."""
        return bool(self.flip_ops or self.crop_to)

    def gather(self, rows: np.ndarray, *, pin: bool = False,
               images: bool = True) -> dict[str, torch.Tensor]:
        """The rows as CPU tensors: uint8 images by modality, ``numeric``, ``text``, ``labels``.

        ``pin`` puts them in page-locked memory, which a CUDA copy can overlap with compute.
        ``images=False`` leaves the images out.
        """
        host = ({modality: torch.from_numpy(array[rows])
                 for modality, array in self.images.items()} if images else {})
        if self.numeric is not None:
            host["numeric"] = torch.from_numpy(self.numeric[rows])
        if self.tokens is not None:
            host["text"] = torch.from_numpy(self.tokens[rows])
        host["labels"] = torch.from_numpy(np.asarray(self.labels[rows], dtype=np.int64))
        return {key: value.pin_memory() for key, value in host.items()} if pin else host

    def assemble(self, rows: np.ndarray, device: torch.device,
                 channels_last: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Both halves in one call: (model batch keyed by modality, labels) of ``rows``.

        On a CPU device with per-batch ops, the fused pass reads the images straight from
        the arrays (the cache's memory maps), with no gathered copy in between: that copy
        was 3 of 15 ms for 64 rgb + depth images at 224 px (cached at 280) here.
        """
        if device.type == "cpu" and self.per_batch:
            host = self.gather(rows, images=False)
            return self._finished(self._augmented_on_cpu(self.images, rows), host, channels_last)
        return self.to_device(self.gather(rows), device, channels_last)

    def to_device(self, host: dict[str, torch.Tensor], device: torch.device, channels_last: bool,
                  *, non_blocking: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """A gathered batch on ``device``: (model batch keyed by modality, labels)."""
        moved = {key: value.to(device, non_blocking=non_blocking) for key, value in host.items()}
        images = {modality: moved[modality] for modality in self.images}
        if self.per_batch and device.type == "cpu":
            arrays = {modality: pixels.numpy() for modality, pixels in images.items()}
            return self._finished(self._augmented_on_cpu(arrays, None), moved, channels_last)
        if self.per_batch:
            generator = self._generator()
            if self.flip_ops:
                images = augment.flip_batch(images, self.flip_ops, generator)
            if self.crop_to:  # on the posed image: the box is uniform over it either way
                images = augment.crop_batch(images, self.crop_to, generator)
        batch = {}
        for modality, pixels in images.items():
            # The same float32 operations as search.data.decode.normalize_pixels (predict's).
            # [N, H, W, C] permuted is channels_last in memory already; in-place ops keep it.
            pixels = pixels.permute(0, 3, 1, 2).float().div_(1 / PIXEL_SCALE)
            mean, std = (torch.tensor(v, device=pixels.device).view(1, -1, 1, 1)
                         for v in self._mean_std(modality))
            batch[modality] = pixels.sub_(mean).div_(std)
        return self._finished(batch, moved, channels_last)

    @staticmethod
    def _finished(images: dict[str, torch.Tensor], host: dict[str, torch.Tensor],
                  channels_last: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        memory = torch.channels_last if channels_last else torch.contiguous_format
        batch = {modality: pixels.contiguous(memory_format=memory)
                 for modality, pixels in images.items()}
        batch.update((key, host[key]) for key in ("numeric", "text") if key in host)
        return batch, host["labels"]

    def _augmented_on_cpu(self, images: dict[str, np.ndarray],
                          rows: np.ndarray | None) -> dict[str, torch.Tensor]:
        """The GPU path's draws, poses, crops and normalisation in one pass per modality,
        of ``rows`` of ``images`` (None: all of them)."""
        generator = self._generator()
        first = next(iter(images.values()))
        n = len(first) if rows is None else len(rows)
        # The order of draws is the GPU path's: poses (none without flip_ops), then boxes.
        poses = augment.draw_poses(n, self.flip_ops, generator)
        boxes = (augment.draw_boxes(n, first.shape[1], first.shape[2], generator)
                 if self.crop_to else None)
        normalise = {}
        for modality in images:
            mean, std = self._mean_std(modality)
            normalise[modality] = ([PIXEL_SCALE / s for s in std],
                                   [-m / s for m, s in zip(mean, std, strict=True)])
        out = augment.posed_crops(images, poses, boxes, self.crop_to, normalise, rows=rows)
        return {modality: pixels.permute(0, 3, 1, 2) for modality, pixels in out.items()}

    def _generator(self) -> torch.Generator:
        assert self.generator is not None, "a split with per-batch ops carries its generator"
        return self.generator

    def batch(self, rows: np.ndarray, device: torch.device, channels_last: bool) -> dict:
        """Gather ``rows`` into a model batch (dict of tensors keyed by modality)."""
        return self.assemble(rows, device, channels_last)[0]

    def _mean_std(self, modality: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """A modality's per-channel mean and std (of pixels scaled to 0-1)."""
        if modality == "depth":
            return (DEPTH_MEAN,), (DEPTH_STD,)
        return self.rgb_mean, self.rgb_std


@dataclass
class PreparedData:
    """The study's data, decoded and cached, shared by every trial of a worker."""

    config: StudyConfig
    index: DatasetIndex
    arrays: dict[str, SplitArrays]
    # The range the cached depth was scaled with (search.data.cache.depth_range); None for
    # 8-bit depth, or no depth.
    depth_range: tuple[float, float] | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.index.classes)

    @cached_property
    def preprocess(self) -> Preprocess:
        train, settings = self.arrays["train"], self.config.train
        images = Preprocess(resolution=settings.resolution, resize=settings.resize,
                            depth_range=self.depth_range)
        if train.numeric is None:
            return images
        std = train.numeric.std(axis=0)
        return dataclasses.replace(
            images,
            numeric_mean=tuple(float(v) for v in train.numeric.mean(axis=0)),
            numeric_std=tuple(float(v) for v in np.where(std > 0, std, 1.0)),
            numeric_names=tuple(self.index.numeric_names or ()),
        )

    def split(self, name: str, *, rgb: dict | None = None) -> Split:
        """An evaluation split (``val`` or ``test``), untouched by augmentation.

        ``rgb`` is the ``"rgb"`` entry of a trial's preprocess (its backbone's mean and std);
        None: :attr:`preprocess`'s (ImageNet's).
        """
        return self._to_split(self.arrays[name], np.arange(len(self.arrays[name].labels)), rgb)

    def train_split(self, strategy: str, *, seed: int = 0, rgb: dict | None = None,
                    crop: str = "none") -> tuple[Split, np.ndarray | None]:
        """The balanced training split for ``strategy`` and its class weights (or None).

        With ``[augment] online`` on, its batches get fresh flips and turns, drawn from ``seed``.
        With ``crop = "random_resized"`` its images come from the training images cached with
        a margin (:func:`augment.source_size`) and every batch gets random-resized crops
        to the resolution; the evaluation splits are the same either way. ``rgb`` is as
        for :meth:`split`.
        """
        if crop not in ("none", "random_resized"):
            raise ValueError(f"unknown crop {crop!r}")
        train, images_key = self.arrays["train"], self._images_key()
        if crop == "random_resized":
            train, images_key = self._margin_train, self._images_key(margin=True)
        balanced = self._balanced(strategy, train, images_key)
        weights = balanced.get("class_weights")
        split = self._to_split(train, balanced["source_index"], rgb)
        split.labels = np.asarray(balanced["labels"])
        split.images = {m: balanced[f"image_{m}"] for m in train.images}
        if self.config.augment.online:
            split.flip_ops = augment.online_ops(self.config.augment.ops)
        if crop == "random_resized":
            split.crop_to = self.config.train.resolution
        if split.flip_ops or split.crop_to:
            split.generator = torch.Generator().manual_seed(seed)
        return split, None if weights is None else np.array(weights)  # writable copy for torch

    @cached_property
    def _margin_train(self) -> SplitArrays:
        """The training split decoded at :func:`augment.source_size`, depth in the same range."""
        settings = self.config.train
        return load_split_arrays(self.index, augment.source_size(settings.resolution),
                                 self.config.data.cache_dir, settings.resize, splits=("train",),
                                 fit_resolution=settings.resolution)["train"]

    def _images_key(self, *, margin: bool = False) -> str:
        """The cache key of the decoded training images: files, size, resize, depth, decoder."""
        settings = self.config.train
        if not margin:
            return split_cache_key(self.index, settings.resolution, settings.resize,
                                   self.preprocess.depth_range)
        return split_cache_key(self.index, augment.source_size(settings.resolution),
                               settings.resize, self.preprocess.depth_range, ("train",))

    def _balanced(self, strategy: str, train: SplitArrays,
                  images_key: str) -> dict[str, np.ndarray]:
        settings = self.config.augment
        key_parts = {
            "images": images_key,  # the decoded images' own key (_images_key)
            "strategy": strategy, "ops": settings.ops, "target": settings.target_per_class,
            "seed": self.config.study.seed,
        }
        key = "balanced-" + hashlib.sha1(json.dumps(key_parts).encode()).hexdigest()[:20]

        def build() -> dict[str, np.ndarray]:
            result = augment.balance(
                strategy, train.images, train.labels, ops=settings.ops,
                target=settings.target_per_class, seed=self.config.study.seed,
                num_classes=len(self.classes),
            )
            arrays = {f"image_{m}": a for m, a in result.images.items()}
            arrays.update(labels=result.labels, source_index=result.source_index)
            if result.class_weights is not None:
                arrays["class_weights"] = result.class_weights
            return arrays

        return cached_arrays(self.config.data.cache_dir, key, build)

    def _to_split(self, arrays: SplitArrays, rows: np.ndarray, rgb: dict | None) -> Split:
        prep = self.preprocess
        numeric = tokens = None
        rules = prep.to_dict()
        rgb = rgb or rules["rgb"]
        if arrays.numeric is not None and prep.numeric_mean is not None:
            numeric = standardize_numeric(np.asarray(arrays.numeric)[rows], rules["numeric"])
        if arrays.text is not None:
            texts = [arrays.text[i] for i in rows]
            tokens = tokenize(texts, prep.text_buckets, prep.text_length)
        return Split(np.asarray(arrays.labels)[rows], dict(arrays.images), numeric, tokens,
                     rgb_mean=tuple(rgb["mean"]), rgb_std=tuple(rgb["std"]))


def prepare_data(config: StudyConfig) -> PreparedData:
    """Generate the demo set if asked, validate the data set and load its cached arrays."""
    ensure_demo(config.data, seed=config.study.seed)
    index = load_index(config.data, seed=config.study.seed)
    settings = config.train
    arrays = load_split_arrays(index, settings.resolution, config.data.cache_dir, settings.resize)
    # load_split_arrays scaled the cached depth into this range; read back from its cache.
    fitted = depth_range(index, settings.resolution, settings.resize, config.data.cache_dir)
    return PreparedData(config, index, arrays, fitted)
