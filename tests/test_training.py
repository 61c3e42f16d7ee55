"""Tests of koopman_hooks/training.py: the recipes' training loop and its augmentation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from koopman_hooks.data import TensorLoader
from koopman_hooks.errors import ConfigError
from koopman_hooks.recipes.config import UnlearningSection
from koopman_hooks.training import epoch_steps, train_classifier
from koopman_hooks.unlearning import finetune, neggrad_plus


def test_augmentation_transforms_every_training_batch_and_only_training_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    loader = TensorLoader(torch.randn(40, 1, 4, 4), torch.randint(0, 3, (40,)), batch_size=8)
    seen: list[torch.Tensor] = []

    def augment(x: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        return x.flip(-1)

    train_classifier(model, loader, 2, verbose=False, augment=augment)
    assert len(seen) == 2 * len(loader) and all(x.shape == (8, 1, 4, 4) for x in seen)
    retain, forget = TensorLoader(*loader.tensors, batch_size=8), TensorLoader(*loader.tensors, batch_size=4)
    seen.clear()
    neggrad_plus(model, retain, forget, 1, augment=augment)
    assert len(seen) == 2 * len(retain)  # each retain batch and its forget batch


def test_augmentation_refuses_inputs_that_are_not_one_tensor():
    model = nn.Linear(4, 2)
    batches = [{"x": torch.randn(3, 4), "labels": torch.tensor([0, 1, 0])}]

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    with pytest.raises(TypeError, match="augmentation transforms one input tensor per batch, got dict"):
        train_classifier(Wrapped(), batches, 1, verbose=False, augment=lambda x: x)


def test_fractional_epochs_run_that_share_of_the_steps_under_one_full_schedule():
    assert epoch_steps(2, 5) == [5, 5]
    assert epoch_steps(0.5, 10) == [5]
    assert epoch_steps(1.25, 8) == [8, 2]
    assert epoch_steps(0.01, 10) == [1]  # at least one step
    assert epoch_steps(0.3, 10) == [3]  # 0.3 * 10 is 3.0000000000000004: no fourth step
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="epochs"):
            epoch_steps(bad, 10)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    loader = TensorLoader(torch.randn(80, 1, 4, 4), torch.randint(0, 3, (80,)), batch_size=8)
    seen: list[int] = []

    def count(x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        return x

    history = train_classifier(model, loader, 1.5, verbose=False, augment=count)
    assert len(seen) == 15 and len(history) == 2
    seen.clear()
    finetune(model, loader, 0.5, augment=count)
    assert len(seen) == 5
    seen.clear()
    neggrad_plus(model, loader, loader, 0.25, augment=count)
    assert len(seen) == 2 * 3  # ceil(2.5) retain steps, each with a forget batch
    with pytest.raises(ConfigError, match="neggrad_epochs"):
        UnlearningSection(neggrad_epochs=0)


def test_training_on_an_empty_loader_or_for_no_epochs_is_refused():
    from koopman_hooks.errors import EmptyLoaderError
    from koopman_hooks.recipes.config import TrainSection

    model = nn.Linear(4, 2)
    with pytest.raises(EmptyLoaderError):
        train_classifier(model, [], 1, verbose=False)
    with pytest.raises(ConfigError, match="train.epochs"):
        TrainSection(epochs=0)
