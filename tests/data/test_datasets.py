"""Tests of koopman_hooks/data/datasets.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from koopman_hooks.data import MissingDataError, TensorLoader, YinYangDataset, load_mnist, yinyang_class


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




def test_token_dataset_is_balanced_seeded_padded_and_labelled_by_its_rule():
    from koopman_hooks.data import TensorLoader, TokenSequenceDataset, token_class

    data = TokenSequenceDataset(400, seed=3)
    again = TokenSequenceDataset(400, seed=3)
    assert torch.equal(data.input_ids, again.input_ids) and torch.equal(data.targets, again.targets)
    assert not torch.equal(data.input_ids, TokenSequenceDataset(400, seed=4).input_ids)
    assert torch.bincount(data.targets).tolist() == [100] * 4
    lengths = data.attention_mask.sum(1)
    assert data.input_ids.shape == (400, 17) and lengths.min() >= 7 and lengths.max() <= 17  # [CLS] + 6..16 tokens
    assert len(set(lengths.tolist())) > 5  # variable lengths: the mask matters
    for ids, mask, label in zip(*data.tensors):
        n = int(mask.sum())
        assert ids[0] == 1 and (ids[n:] == 0).all() and (ids[1:n] >= 2).all() and mask[:n].all()
        assert token_class(ids[1:n].numpy(), data.vocab_size) == label
    item = data[0]
    assert set(item) == {"input_ids", "attention_mask", "labels"}
    batches = list(TensorLoader.from_dataset(data, 128))
    assert len(batches) == 4 and set(batches[0]) == set(item) and batches[-1]["labels"].shape == (16,)
    with pytest.raises(ValueError, match="one distinct key per tensor"):
        TensorLoader(data.input_ids, data.targets, keys=("x",))


def test_random_shift_matches_a_pad_and_crop_oracle_and_leaves_the_global_rng_alone():
    from koopman_hooks.data import RandomShift

    images = torch.randn(32, 2, 9, 11)
    state = torch.random.get_rng_state()
    shifted = RandomShift(2, seed=5)(images)
    assert torch.equal(torch.random.get_rng_state(), state)
    offsets = torch.randint(-2, 3, (32, 2), generator=torch.Generator().manual_seed(5))  # (dx, dy) per image
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate")  # border pixels fill the gap
    for i, (dx, dy) in enumerate(offsets.tolist()):
        assert torch.equal(shifted[i], padded[i, :, 2 - dy:2 - dy + 9, 2 - dx:2 - dx + 11])
    assert len({tuple(o) for o in offsets.tolist()}) > 5  # each image its own offset
    assert torch.equal(RandomShift(2, seed=5)(images), shifted)  # seeded
    assert RandomShift(0)(images) is images


@pytest.mark.parametrize("dtype, size", [(torch.uint8, (9, 11)), (torch.bfloat16, (64, 200)), (torch.float16, (224, 224))])
def test_random_shift_is_exact_in_every_dtype_and_at_every_size(dtype, size):
    from koopman_hooks.data import RandomShift

    height, width = size
    images = (torch.rand(6, 3, height, width) * 255).to(dtype)
    shifted = RandomShift(3, seed=1)(images)
    offsets = torch.randint(-3, 4, (6, 2), generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(images.float(), (3, 3, 3, 3), mode="replicate").to(dtype)
    assert shifted.dtype == dtype
    for i, (dx, dy) in enumerate(offsets.tolist()):
        assert torch.equal(shifted[i], padded[i, :, 3 - dy:3 - dy + height, 3 - dx:3 - dx + width])
    assert RandomShift(3)(images[:0]).shape == (0, 3, height, width)


def test_random_shift_refuses_what_it_cannot_translate():
    from koopman_hooks.data import RandomShift

    with pytest.raises(ValueError, match="pixels must be an int >= 0"):
        RandomShift(-1)
    with pytest.raises(ValueError, match=r"\(batch, channels, height, width\)"):
        RandomShift(1)(torch.randn(4, 784))


@pytest.mark.parametrize("batch_size", [0, -1, 2.7, True])
def test_tensor_loader_refuses_a_batch_size_that_is_not_a_positive_int(batch_size):
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        TensorLoader(torch.zeros(10, 2), batch_size=batch_size)


def test_tensor_loader_limit_keeps_the_first_rows_and_refuses_a_negative_one():
    data = YinYangDataset(30, seed=0)
    assert len(TensorLoader.from_dataset(data, np.int64(8), limit=np.int64(20)).tensors[0]) == 20
    with pytest.raises(ValueError, match="limit must be an int >= 0"):
        TensorLoader.from_dataset(data, 8, limit=-5)
