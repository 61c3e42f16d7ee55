from __future__ import annotations

import random
from contextlib import nullcontext

import numpy as np
import pytest

from koopman_hooks.maths.rng import preserved_host_streams


def _draws() -> tuple[float, float]:
    return random.random(), float(np.random.rand())


@pytest.mark.parametrize("fails", [False, True])
def test_the_caller_streams_continue_as_without_the_block(fails):
    random.seed(3)
    np.random.seed(3)
    expected = _draws()
    random.seed(3)
    np.random.seed(3)
    with pytest.raises(RuntimeError) if fails else nullcontext():
        with preserved_host_streams():
            _draws()
            if fails:
                raise RuntimeError("inside")
    assert _draws() == expected


def test_a_seed_makes_what_numpy_draws_inside_independent_of_the_caller():
    inside = []
    for caller_seed in (1, 2):
        np.random.seed(caller_seed)
        with preserved_host_streams(seed=0):
            inside.append(float(np.random.rand()))
    assert inside[0] == inside[1]

