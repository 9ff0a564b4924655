"""Fixtures for the augment tests: tiny synthetic image sets, made in memory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

MARKER = 3
"""Side of the square marker, in pixels."""


@dataclass
class Split:
    """A small labelled split: the arrays ``augment.balance`` takes."""

    images: dict[str, np.ndarray]
    labels: np.ndarray


def make_split(counts: list[int], *, size: int = 16, seed: int = 0) -> Split:
    """Random rgb + depth images, ``counts[c]`` rows of class ``c``; every row is unique noise."""
    rng = np.random.default_rng(seed)
    n = sum(counts)
    return Split(
        images={
            "rgb": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            "depth": rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8),
        },
        labels=np.repeat(np.arange(len(counts)), counts).astype(np.int64),
    )


def marked_pair(
    size: tuple[int, int], top_left: tuple[int, int], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image and a depth map with different dark backgrounds and one shared bright marker.

    The backgrounds differ (noise vs a ramp) so the test would notice if the two images were
    transformed differently; both stay below the marker threshold.
    """
    height, width = size
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    ramp = np.linspace(0, 80, width).astype(np.uint8)
    depth = np.broadcast_to(ramp[None, :, None], (height, width, 1)).copy()
    y, x = top_left
    rgb[y : y + MARKER, x : x + MARKER] = 255
    depth[y : y + MARKER, x : x + MARKER] = 255
    return rgb, depth


def marker_centroid(image: np.ndarray) -> np.ndarray | None:
    """Centroid ``(row, col)`` of the bright marker, or None if it left the image."""
    rows, cols = np.nonzero(image.max(axis=-1) > 160)
    if rows.size == 0:
        return None
    return np.array([rows.mean(), cols.mean()])


@pytest.fixture
def imbalanced() -> Split:
    """Three classes of 16 px rgb + depth images: 6, 3 and 1 rows."""
    return make_split([6, 3, 1])


@pytest.fixture(name="marked_pair")
def marked_pair_fixture() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """``marked_pair(size, top_left, seed)``: an aligned RGB + depth pair with one marker."""
    return marked_pair


@pytest.fixture(name="marker_centroid")
def marker_centroid_fixture() -> Callable[[np.ndarray], np.ndarray | None]:
    """``marker_centroid(image)``: where the marker is, or None."""
    return marker_centroid


@pytest.fixture
def split_factory() -> Callable[..., Split]:
    """``make_split`` for tests that need other counts, sizes or seeds."""
    return make_split
