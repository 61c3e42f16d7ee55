"""Tests of koopman_hooks/unlearning/splits.py."""

from __future__ import annotations

import pytest
from torch.utils.data import TensorDataset

from koopman_hooks.data import YinYangDataset  # noqa: E402
from koopman_hooks.unlearning import (  # noqa: E402
    class_subsets,
)

pytest.importorskip("sklearn")


FORGET = 2


@pytest.fixture(scope="module")
def yinyang() -> YinYangDataset:
    return YinYangDataset(size=600, seed=0)



def test_class_subsets_split_by_targets(yinyang: YinYangDataset) -> None:
    retain, forget = class_subsets(yinyang, FORGET)
    assert len(retain) + len(forget) == len(yinyang)
    assert all(int(yinyang.targets[i]) == FORGET for i in forget.indices)
    assert all(int(yinyang.targets[i]) != FORGET for i in retain.indices)
    tensor_retain, _ = class_subsets(TensorDataset(yinyang.inputs, yinyang.targets), [FORGET])
    assert tensor_retain.indices == retain.indices
    nested_retain, nested_forget = class_subsets(retain, FORGET)  # Subset of a Subset
    assert len(nested_forget) == 0 and len(nested_retain) == len(retain)


