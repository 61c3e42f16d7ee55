"""Tests of koopman_hooks/core/batches.py and of reading a model's scores (core/select.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from koopman_hooks import ConfigError
from koopman_hooks.core.batches import BatchSpec, mask_of
from koopman_hooks.core.select import MODEL_OUTPUT


def test_dict_batches_send_every_key_but_the_label():
    batch = {"input_ids": torch.ones(2, 3), "attention_mask": torch.ones(2, 3), "labels": torch.tensor([0, 1])}
    inputs, labels = BatchSpec().split(batch)
    assert set(inputs) == {"input_ids", "attention_mask"} and torch.equal(labels, batch["labels"])
    with pytest.raises(ConfigError, match=r"\['attention_mask'\].*would not reach the model"):
        BatchSpec(input_key="input_ids").split(batch)  # naming one input must not drop the mask silently
    inputs, _ = BatchSpec(input_key="input_ids", ignore_keys=("attention_mask",)).split(batch)  # explicit opt-in
    assert torch.equal(inputs, batch["input_ids"])
    with pytest.raises(ConfigError, match="label_key 'label'"):
        BatchSpec(label_key="label").split(batch)


def test_mask_of_reads_the_attention_mask_of_dict_inputs():
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(mask_of({"input_ids": torch.ones(1, 3), "attention_mask": mask}), mask)
    assert mask_of(torch.ones(1, 3)) is None
    assert mask_of({"input_ids": torch.ones(1, 3)}) is None
    assert mask_of({"attention_mask": mask}, key=None) is None
    assert torch.equal(mask_of({"pad": mask}, key="pad"), mask)
    with pytest.raises(ValueError, match=r"\(batch, tokens\) attention mask"):
        mask_of({"attention_mask": torch.ones(1, 3, 3)})


@dataclasses.dataclass
class Output:
    loss: torch.Tensor | None
    logits: torch.Tensor


def test_model_scores_are_the_logits_when_there_are_some():
    logits = torch.randn(2, 4)
    assert MODEL_OUTPUT.get({"loss": torch.tensor(1.0), "logits": logits}) is logits  # a model given labels
    assert MODEL_OUTPUT.get(Output(torch.tensor(1.0), logits)) is logits
    assert MODEL_OUTPUT.get((logits, torch.zeros(2))) is logits  # else the first tensor
    replaced = MODEL_OUTPUT.replace({"loss": torch.tensor(1.0), "logits": logits}, torch.zeros(2, 4))
    assert torch.equal(replaced["logits"], torch.zeros(2, 4))
