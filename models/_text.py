"""Hashed word tokens: a tokenizer with no vocabulary file, reproducible in a few lines."""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np

__all__ = ["tokenize"]

_WORD = re.compile(r"[a-z0-9]+")


def tokenize(texts: Sequence[str], buckets: int, length: int) -> np.ndarray:
    """Turn texts into fixed-length int64 word ids, shape ``(len(texts), length)``.

    The rule, so that anyone can reproduce it without this package:

    1. lowercase the text (``str.lower``);
    2. words are the matches of the regex ``[a-z0-9]+``; everything else, non-ASCII letters
       included, separates words;
    3. a word's id is ``zlib.crc32(word.encode("utf-8")) % (buckets - 1) + 1``, so ids are in
       ``[1, buckets - 1]`` and 0 is left for padding;
    4. keep the first ``length`` words and pad the rest of the row with 0.

    Args:
        texts: The texts, one per sample (a sequence, not a single string).
        buckets: Number of ids including the padding id 0 (``ModelSpec.text_buckets``).
        length: Tokens per text (``ModelSpec.text_length``).

    Returns:
        An int64 array; the same input always gives the same ids, on any machine.

    Raises:
        TypeError: ``texts`` is a single string.
        ValueError: ``buckets < 2`` or ``length < 1``.
    """
    if isinstance(texts, str):
        raise TypeError("tokenize takes a sequence of texts, not a single string")
    if buckets < 2 or length < 1:
        raise ValueError(f"need buckets >= 2 and length >= 1, got {buckets} and {length}")
    ids = np.zeros((len(texts), length), dtype=np.int64)
    for row, text in enumerate(texts):
        words = _WORD.findall(text.lower())[:length]
        ids[row, : len(words)] = [zlib.crc32(w.encode("utf-8")) % (buckets - 1) + 1 for w in words]
    return ids
