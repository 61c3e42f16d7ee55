"""The caller's random streams, untouched: what a call draws from Python's and NumPy's global
generators (a user's loader may augment with them; scipy estimates norms with NumPy's) is
undone on exit, so the caller's streams continue as if the call had not happened."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np


@contextmanager
def preserved_host_streams(seed: int | None = None) -> Iterator[None]:
    """Restore Python's and NumPy's global random states on exit (also after an exception);
    with ``seed``, both global generators are seeded with it inside, so what draws from them
    inside does not depend on the caller's seed either."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        if seed is not None:
            random.seed(seed)
            np.random.seed(seed % 2**32)  # NumPy takes 32-bit seeds
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
