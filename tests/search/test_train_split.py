"""The training split the objective trains on: balanced, cached, flipped afresh per batch."""

from __future__ import annotations

import numpy as np
import torch

import augment
from search.config import read_study_file
from search.data.prepared import prepare_data
from tests.search.conftest import make_dataset, write_study

CPU = torch.device("cpu")


def batches(config, seed: int) -> list[torch.Tensor]:
    split, _ = prepare_data(config).train_split("none", seed=seed)
    rows = np.arange(len(split))
    return [split.batch(rows, CPU, False)["depth"] for _ in range(2)]


def test_online_flips_change_every_epoch_and_follow_the_seed(workdir):
    data = make_dataset(workdir / "data")
    path = write_study(workdir, data, extra="")  # ops = ["flip_left_right"], online by default
    config = read_study_file(str(path))
    first, second = batches(config, seed=3)
    assert not torch.equal(first, second)  # a fresh draw per batch
    assert torch.equal(first, batches(config, seed=3)[0])  # the same seed, the same draws
    val = prepare_data(config).split("val")
    rows = np.arange(len(val))
    assert torch.equal(val.batch(rows, CPU, False)["rgb"], val.batch(rows, CPU, False)["rgb"])


def test_online_off_gives_the_cached_pixels(workdir):
    data = make_dataset(workdir / "data")
    text = write_study(workdir, data).read_text().replace(
        'ops = ["flip_left_right"]', 'ops = ["flip_left_right"]\nonline = false')
    path = workdir / "offline.toml"
    path.write_text(text)
    first, second = batches(read_study_file(str(path)), seed=3)
    assert torch.equal(first, second)


def dihedral_keys(image: np.ndarray) -> set[bytes]:
    """The bytes of every flip and quarter turn of ``image`` ([H, W, C])."""
    turns = [np.rot90(image, k, axes=(0, 1)) for k in range(4)]
    return {np.ascontiguousarray(t).tobytes() for t in turns + [t[:, ::-1] for t in turns]}


def test_oversampled_training_set_holds_no_val_or_test_sample(workdir):
    data = make_dataset(workdir / "data", counts={"red": 14, "green": 6, "yellow": 4})
    path = write_study(workdir, data)  # no val/test folders: both are split off train
    prepared = prepare_data(read_study_file(str(path)))
    split, _ = prepared.train_split("oversample", seed=0)
    assert len(split) > len(prepared.arrays["train"])  # copies were made
    held_out = set()
    for name in ("val", "test"):
        for image in prepared.arrays[name].images["rgb"]:
            held_out |= dihedral_keys(np.asarray(image))
    trained = {np.ascontiguousarray(image).tobytes() for image in split.images["rgb"]}
    assert not trained & held_out
    train_ids = set(prepared.arrays["train"].ids)
    held_out_ids = set(prepared.arrays["val"].ids) | set(prepared.arrays["test"].ids)
    assert held_out_ids and not train_ids & held_out_ids


def test_balanced_set_is_built_once_and_rebuilt_when_a_file_changes(workdir, monkeypatch):
    import augment

    data = make_dataset(workdir / "data", counts={"red": 10, "green": 4, "yellow": 4})
    config = read_study_file(str(write_study(workdir, data)))
    builds = []
    real = augment.balance
    monkeypatch.setattr(augment, "balance", lambda *a, **k: builds.append(1) or real(*a, **k))
    first, _ = prepare_data(config).train_split("oversample")
    again, _ = prepare_data(config).train_split("oversample")
    assert len(builds) == 1
    np.testing.assert_array_equal(first.images["rgb"], again.images["rgb"])
    changed = next((data / "train" / "rgb" / "green").iterdir())
    changed.write_bytes((data / "train" / "rgb" / "green" / "green0.png").read_bytes()
                        if changed.name != "green0.png"
                        else (data / "train" / "rgb" / "green" / "green1.png").read_bytes())
    prepare_data(config).train_split("oversample")
    assert len(builds) == 2


def test_random_resized_crop_reads_the_margin_cache_and_leaves_evaluation_alone(workdir):
    data = make_dataset(workdir / "data")
    config = read_study_file(str(write_study(workdir, data)))  # 32 px, rgb + depth
    prepared = prepare_data(config)
    resolution = config.train.resolution
    val_before = prepared.split("val").batch(np.arange(4), CPU, False)
    split, _ = prepared.train_split("none", seed=5, crop="random_resized")
    plain, _ = prepared.train_split("none", seed=5)
    margin = augment.source_size(resolution)
    assert split.images["rgb"].shape[1:] == (margin, margin, 3)
    assert plain.images["rgb"].shape[1:] == (resolution, resolution, 3)
    rows = np.arange(len(split))
    first = split.batch(rows, CPU, False)
    assert first["rgb"].shape == (len(split), 3, resolution, resolution)
    assert first["depth"].shape == (len(split), 1, resolution, resolution)
    again, _ = prepared.train_split("none", seed=5, crop="random_resized")
    assert torch.equal(first["rgb"], again.batch(rows, CPU, False)["rgb"])  # seeded
    assert not torch.equal(first["rgb"], split.batch(rows, CPU, False)["rgb"])  # fresh per batch
    # Evaluation sees the same pixels as without crops.
    val_after = prepare_data(config).split("val").batch(np.arange(4), CPU, False)
    assert torch.equal(val_before["rgb"], val_after["rgb"])
    assert prepared.arrays["val"].images["rgb"].shape[1] == resolution


class _Brightness(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, batch: dict) -> torch.Tensor:
        assert batch["rgb"].shape[2:] == (4, 4) and batch["depth"].shape[2:] == (4, 4)
        return self.head(torch.cat([batch["rgb"], batch["depth"]], 1).mean(dim=(2, 3)))


def test_training_on_cropped_batches_through_the_prefetcher():
    from search.config import TrainConfig
    from search.data.prepared import Split
    from search.trial.train import Speedups, TrialParams, train

    rng = np.random.default_rng(0)

    def images(n: int, side: int) -> dict[str, np.ndarray]:
        labels = np.arange(n) % 2
        rgb = rng.integers(0, 120, (n, side, side, 3), dtype=np.uint8) + 120 * labels[:, None,
                                                                                 None, None]
        return {"rgb": rgb.astype(np.uint8), "depth": rgb[..., :1].copy()}

    margin = augment.source_size(4)
    train_split = Split(labels=np.arange(32) % 2, images=images(32, margin), crop_to=4,
                        flip_ops=("flip_left_right",), generator=torch.Generator().manual_seed(0))
    val = Split(labels=np.arange(16) % 2, images=images(16, 4))
    params = TrialParams(backbone="b0", fusion="none", dropout=0.0, optimizer="sgd", lr=0.5,
                         weight_decay=0.0, batch_size=8, label_smoothing=0.0, balance="none",
                         crop="random_resized")
    result = train(_Brightness(), train_split, val, params=params,
                   settings=TrainConfig(epochs=3, patience=10, warmup_epochs=0), device=CPU,
                   speed=Speedups(channels_last=True, autocast_dtype=None), num_classes=2, seed=0)
    assert result.epochs_run == 3 and result.best.macro_f1 == 1.0
