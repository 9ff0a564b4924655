"""Deterministic use of Augmentor, which draws from the global random number generators.

Augmentor's operations call Python's ``random`` module (flip axis, rotation angle, zoom
factor, distortion grid, skew) and NumPy's legacy global generator (colour factors). Neither
accepts a generator argument, so the only way to make them reproducible is to seed the globals.
Seeding them for good would silently change the caller's own randomness (Optuna samplers,
data loaders), so this module seeds them inside a context and puts the previous states back.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np


def check_seed(seed: int) -> int:
    """Return ``seed`` if it is a non-negative integer, else raise.

    Raises:
        TypeError: If ``seed`` is not an int (bool is rejected too).
        ValueError: If ``seed`` is negative.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"augment seed must be an integer, got {seed!r}")
    if seed < 0:
        raise ValueError(f"augment seed must be non-negative, got {seed}")
    return int(seed)


@contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python's ``random`` and NumPy's global generator, restoring both on exit.

    The previous states are restored even if the body raises.

    Args:
        seed: A non-negative integer. Any size is accepted: NumPy's legacy seed only takes
            32 bits, so it is derived through a ``SeedSequence`` instead of truncated.
    """
    seed = check_seed(seed)
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    try:
        random.seed(seed)
        np.random.seed(np.random.SeedSequence(seed).generate_state(4))
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
