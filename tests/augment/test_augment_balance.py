"""augment.balance: the three strategies, determinism, leak-freedom and input checks."""

from __future__ import annotations

import random

import numpy as np
import pytest

import augment

FLIPS_AND_TURNS = ["flip_left_right", "flip_top_bottom", "rotate90"]


def as_bytes(balanced: augment.BalancedSet) -> list[bytes]:
    arrays = [balanced.labels, balanced.source_index]
    arrays += [balanced.images[name] for name in sorted(balanced.images)]
    return [np.ascontiguousarray(array).tobytes() for array in arrays]


def dihedral(image: np.ndarray) -> list[np.ndarray]:
    """The 8 flips and quarter turns of an image."""
    turns = [np.rot90(image, k) for k in range(4)]
    return turns + [np.fliplr(turn) for turn in turns]


def test_strategy_table() -> None:
    assert augment.list_strategies() == ["oversample", "class_weights", "none"]
    with pytest.raises(ValueError, match=r"unknown balance strategy 'smote'.*oversample"):
        augment.balance("smote", {}, np.zeros(1, np.int64))


@pytest.mark.parametrize(("target", "expected"), [("max", [6, 6, 6]), (8, [8, 8, 8])])
def test_oversample_reaches_target(imbalanced, target, expected) -> None:
    balanced = augment.balance(
        "oversample", imbalanced.images, imbalanced.labels,
        ops=FLIPS_AND_TURNS, target=target, seed=0,
    )
    assert np.bincount(balanced.labels).tolist() == expected
    assert balanced.class_weights is None
    for name, array in imbalanced.images.items():
        out = balanced.images[name]
        assert out.shape == (sum(expected), *array.shape[1:]) and out.dtype == np.uint8


def test_integer_target_below_a_class_keeps_its_originals(imbalanced) -> None:
    balanced = augment.balance("oversample", imbalanced.images, imbalanced.labels, target=4, seed=0)
    assert np.bincount(balanced.labels).tolist() == [6, 4, 4]


def test_originals_come_first_and_rows_point_to_their_source(imbalanced) -> None:
    n = imbalanced.labels.size
    balanced = augment.balance(
        "oversample", imbalanced.images, imbalanced.labels, ops=FLIPS_AND_TURNS, seed=1
    )
    np.testing.assert_array_equal(balanced.source_index[:n], np.arange(n))
    for name, array in imbalanced.images.items():
        np.testing.assert_array_equal(balanced.images[name][:n], array)
    np.testing.assert_array_equal(balanced.labels, imbalanced.labels[balanced.source_index])
    # Flips and quarter turns are exact, so every copy is one of them of its source row.
    for row in range(n, balanced.labels.size):
        source = imbalanced.images["rgb"][balanced.source_index[row]]
        assert any(np.array_equal(balanced.images["rgb"][row], t) for t in dihedral(source))


def test_copies_are_spread_evenly_over_originals(split_factory) -> None:
    split = split_factory([10, 4, 3])
    balanced = augment.balance("oversample", split.images, split.labels, seed=0)
    copies = balanced.source_index[split.labels.size :]
    # Class 1 needs 6 copies of 4 rows: each row once or twice. Class 2: 7 of 3 -> 2 or 3.
    per_row = np.bincount(copies, minlength=split.labels.size)
    assert sorted(per_row[10:14].tolist()) == [1, 1, 2, 2]
    assert sorted(per_row[14:17].tolist()) == [2, 2, 3]


def test_without_ops_copies_are_exact(imbalanced) -> None:
    balanced = augment.balance("oversample", imbalanced.images, imbalanced.labels, ops=[], seed=0)
    for name, array in imbalanced.images.items():
        np.testing.assert_array_equal(balanced.images[name], array[balanced.source_index])


def test_oversampled_depth_matches_rgb_pixel_for_pixel(imbalanced) -> None:
    # Grey RGB equal to the depth map: any difference would be a misaligned transform.
    grey = imbalanced.images["depth"]
    images = {"rgb": np.repeat(grey, 3, axis=-1), "depth": grey}
    ops = augment.list_ops("geometric")
    balanced = augment.balance("oversample", images, imbalanced.labels, ops=ops, seed=2)
    np.testing.assert_array_equal(balanced.images["rgb"][..., :1], balanced.images["depth"])


def test_class_weights_are_inverse_frequency(imbalanced) -> None:
    balanced = augment.balance("class_weights", imbalanced.images, imbalanced.labels, seed=0)
    # N = 10 samples, K = 3 classes, counts 6, 3, 1: weight_c = N / (K * n_c).
    expected = np.array([10 / 18, 10 / 9, 10 / 3], np.float32)
    assert balanced.class_weights.dtype == np.float32
    np.testing.assert_allclose(balanced.class_weights, expected, rtol=1e-6)
    assert balanced.class_weights[imbalanced.labels].mean() == pytest.approx(1.0)
    for name, array in imbalanced.images.items():
        assert balanced.images[name] is array
    np.testing.assert_array_equal(balanced.labels, imbalanced.labels)
    np.testing.assert_array_equal(balanced.source_index, np.arange(10))


def test_class_weights_with_an_absent_class(imbalanced) -> None:
    balanced = augment.balance(
        "class_weights", imbalanced.images, imbalanced.labels, num_classes=4
    )
    assert balanced.class_weights.shape == (4,)
    assert balanced.class_weights[3] == 0
    assert balanced.class_weights[imbalanced.labels].mean() == pytest.approx(1.0)


def test_none_leaves_everything_alone(imbalanced) -> None:
    balanced = augment.balance("none", imbalanced.images, imbalanced.labels, ops=["zoom"])
    assert balanced.class_weights is None
    for name, array in imbalanced.images.items():
        assert balanced.images[name] is array
    np.testing.assert_array_equal(balanced.source_index, np.arange(10))


def test_same_seed_is_byte_identical_other_seed_differs(imbalanced) -> None:
    def run(seed: int) -> augment.BalancedSet:
        return augment.balance(
            "oversample", imbalanced.images, imbalanced.labels, ops=augment.list_ops(), seed=seed
        )

    assert as_bytes(run(7)) == as_bytes(run(7))
    assert as_bytes(run(7)) != as_bytes(run(8))


def test_no_validation_sample_reaches_the_balanced_set(split_factory) -> None:
    train = split_factory([6, 3, 1], seed=1)
    val = split_factory([2, 2, 2], seed=2)
    everything = np.concatenate([train.images["rgb"], val.images["rgb"]])
    assert len({image.tobytes() for image in everything}) == len(everything), "need unique samples"

    balanced = augment.balance(
        "oversample", train.images, train.labels, ops=FLIPS_AND_TURNS, target=9, seed=0
    )
    assert balanced.source_index.min() >= 0
    assert balanced.source_index.max() < train.labels.size
    val_variants = {t.tobytes() for image in val.images["rgb"] for t in dihedral(image)}
    assert not any(image.tobytes() in val_variants for image in balanced.images["rgb"])


def test_inputs_are_not_modified_and_memmaps_work(imbalanced, tmp_path) -> None:
    np.save(tmp_path / "rgb.npy", imbalanced.images["rgb"])
    images = {
        "rgb": np.load(tmp_path / "rgb.npy", mmap_mode="r"),
        "depth": imbalanced.images["depth"].copy(),
    }
    images["depth"].flags.writeable = False
    labels = imbalanced.labels.copy()
    labels.flags.writeable = False

    balanced = augment.balance("oversample", images, labels, ops=augment.list_ops(), seed=0)

    np.testing.assert_array_equal(images["rgb"], imbalanced.images["rgb"])
    np.testing.assert_array_equal(images["depth"], imbalanced.images["depth"])
    np.testing.assert_array_equal(labels, imbalanced.labels)
    assert not isinstance(balanced.images["rgb"], np.memmap)


def test_global_random_states_are_restored(imbalanced) -> None:
    random.seed(123)
    np.random.seed(456)
    python_state, numpy_state = random.getstate(), np.random.get_state()

    augment.balance("oversample", imbalanced.images, imbalanced.labels, ops=["rotate"], seed=9)

    assert random.getstate() == python_state
    after = np.random.get_state()
    assert after[0] == numpy_state[0]
    np.testing.assert_array_equal(after[1], numpy_state[1])
    assert after[2:] == numpy_state[2:]


def test_global_random_states_are_restored_after_an_error() -> None:
    random.seed(1)
    np.random.seed(2)
    expected = random.random(), np.random.random()
    random.seed(1)
    np.random.seed(2)
    with pytest.raises(RuntimeError), augment.seeded_global_rngs(5):
        raise RuntimeError
    assert (random.random(), np.random.random()) == expected


@pytest.mark.parametrize("strategy", augment.list_strategies())
def test_unknown_op_fails_for_every_strategy(imbalanced, strategy) -> None:
    with pytest.raises(ValueError, match="unknown augment op 'twirl'"):
        augment.balance(strategy, imbalanced.images, imbalanced.labels, ops=["twirl"])


@pytest.mark.parametrize("target", [0, -3, "min", True, 2.5])
def test_bad_target(imbalanced, target) -> None:
    with pytest.raises(ValueError, match="target_per_class"):
        augment.balance("oversample", imbalanced.images, imbalanced.labels, target=target)


@pytest.mark.parametrize(("seed", "error"), [(-1, ValueError), (1.5, TypeError)])
def test_bad_seed(imbalanced, seed, error) -> None:
    with pytest.raises(error, match="seed"):
        augment.balance("oversample", imbalanced.images, imbalanced.labels, seed=seed)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.zeros((10, 1), np.int64), "1-D integer"),
        (np.zeros(10, np.float32), "1-D integer"),
        (np.full(10, -1), "non-negative"),
        (np.zeros(9, np.int64), "has 10 rows but labels has 9"),
        (np.zeros(0, np.int64), "no samples"),
    ],
)
def test_bad_labels(imbalanced, labels, message) -> None:
    with pytest.raises(ValueError, match=message):
        augment.balance("none", imbalanced.images, labels)


def test_num_classes_below_labels(imbalanced) -> None:
    with pytest.raises(ValueError, match="num_classes=2 but labels go up to 2"):
        augment.balance("class_weights", imbalanced.images, imbalanced.labels, num_classes=2)


def test_oversample_needs_a_row_of_every_class(imbalanced) -> None:
    with pytest.raises(ValueError, match="class 3: it has no training samples"):
        augment.balance("oversample", imbalanced.images, imbalanced.labels, num_classes=4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda im: {**im, "rgb": im["rgb"].astype(np.float32)}, r"images\['rgb'\] must be uint8"),
        (lambda im: {**im, "rgb": im["rgb"][..., :1]}, r"images\['rgb'\] has 1 channels"),
        (lambda im: {**im, "depth": im["depth"][:, :8]}, "differ in height and width"),
        (lambda im: {}, "non-empty dict"),
    ],
)
def test_bad_images(imbalanced, change, message) -> None:
    with pytest.raises(ValueError, match=message):
        augment.balance("oversample", change(imbalanced.images), imbalanced.labels)
