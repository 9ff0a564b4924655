"""tokenize: the documented hashing rule, padding, truncation, determinism."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from search.data.decode import RGB_MEAN, RGB_STD, tokenize


def _rule(word: str, buckets: int) -> int:
    return zlib.crc32(word.encode()) % (buckets - 1) + 1


def test_follows_the_documented_rule():
    ids = tokenize(["Red apple, 2 LEAVES!", ""], buckets=100, length=6)
    assert ids.dtype == np.int64 and ids.shape == (2, 6)
    expected = [_rule(w, 100) for w in ("red", "apple", "2", "leaves")]
    assert ids[0].tolist() == [*expected, 0, 0]
    assert ids[1].tolist() == [0] * 6


def test_truncates_and_keeps_ids_in_range():
    ids = tokenize(["a b c d e f g h"], buckets=3, length=4)
    assert ids.shape == (1, 4)
    assert set(ids.ravel().tolist()) <= {1, 2}


def test_non_ascii_letters_separate_words():
    ids = tokenize(["café_au-lait"], buckets=1000, length=4)
    assert ids[0].tolist() == [_rule(w, 1000) for w in ("caf", "au", "lait")] + [0]


def test_is_deterministic():
    # Fixed ids: crc32, unlike Python's hash(), is not salted per process, so these hold on
    # any machine, and an exported bundle's reader can rely on them.
    texts = ["Golden delicious", "granny smith with spots"]
    ids = tokenize(texts, buckets=8192, length=8)
    assert ids.tolist() == [[1585, 1946, 0, 0, 0, 0, 0, 0], [5839, 6450, 1724, 5131, 0, 0, 0, 0]]
    np.testing.assert_array_equal(ids, tokenize(list(texts), buckets=8192, length=8))


def test_rejects_a_single_string_and_bad_sizes():
    with pytest.raises(TypeError, match="not a single string"):
        tokenize("an apple", buckets=10, length=4)
    with pytest.raises(ValueError, match="buckets >= 2"):
        tokenize(["x"], buckets=1, length=4)


def test_imagenet_statistics():
    assert RGB_MEAN == (0.485, 0.456, 0.406)
    assert RGB_STD == (0.229, 0.224, 0.225)
