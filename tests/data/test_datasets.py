"""Tests of koopman_hooks/data/datasets.py."""

from __future__ import annotations

import pytest
import torch

from koopman_hooks.data import MissingDataError, YinYangDataset, load_mnist, yinyang_class


def test_yinyang_dataset_is_balanced_seeded_and_correct():
    ds = YinYangDataset(999, seed=3)
    assert torch.bincount(ds.targets).tolist() == [333, 333, 333]
    assert torch.equal(ds.inputs, YinYangDataset(999, seed=3).inputs)
    x, y = ds.inputs[:, 0].numpy(), ds.inputs[:, 1].numpy()
    assert (yinyang_class(x, y) == ds.targets.numpy()).all()
    assert torch.allclose(ds.inputs[:, 2:], 1 - ds.inputs[:, :2])



def test_mnist_subset_loads_from_data_root():
    test = load_mnist(False, limit=64)
    x, y = test.tensors
    assert x.shape == (64, 1, 28, 28) and y.shape == (64,) and y.dtype == torch.long
    assert load_mnist(False, limit=8, flatten=True).tensors[0].shape == (8, 784)



def test_missing_mnist_says_what_to_do(tmp_path):
    with pytest.raises(MissingDataError, match="KOOPMAN_HOOKS_DATA"):
        load_mnist(True, data_root=tmp_path)


