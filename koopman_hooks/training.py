"""A plain supervised training loop for the recipes and the retraining baselines.

Batches are read as the probe reads them (:class:`~koopman_hooks.core.batches.BatchSpec`):
``(x, y)`` tuples, or dicts that go to the model as ``model(**inputs)`` with every key but the
label (``labels`` by default). The loss reads the output's ``logits`` (a ``ModelOutput``) or its
first tensor.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from koopman_hooks.core.batches import BatchSpec, Inputs, call_model, move_inputs
from koopman_hooks.core.hooks import preserved_state
from koopman_hooks.core.optim import adamw
from koopman_hooks.core.select import MODEL_OUTPUT
from koopman_hooks.errors import EmptyLoaderError

Augment = Callable[[torch.Tensor], torch.Tensor]


class Loader(Protocol):
    """What the training loops read: an iterable of batches with a length (a ``DataLoader``,
    a :class:`~koopman_hooks.data.TensorLoader`, a list of batches)."""

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...


def epoch_steps(epochs: float, batches: int) -> list[int]:
    """Optimiser steps in each epoch of a run of ``epochs`` (a fraction allowed: the last epoch
    stops after that share of the loader's ``batches``, at least one step in all)."""
    if not epochs > 0 or math.isinf(epochs):
        raise ValueError(f"epochs must be a positive number, got {epochs}")
    if batches < 1:
        raise EmptyLoaderError()
    total = max(math.ceil(round(epochs * batches, 6)), 1)
    full, rest = divmod(total, batches)
    return [batches] * full + ([rest] if rest else [])


def train_classifier(
    model: nn.Module,
    loader: Loader,
    epochs: float,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    device: str | torch.device = "cpu",
    verbose: bool = True,
    desc: str = "train",
    spec: BatchSpec = BatchSpec(),
    augment: Augment | None = None,
) -> list[float]:
    """Train ``model`` with AdamW (fused where it can run) and a one-cycle schedule; return the
    mean loss per epoch. ``epochs`` may be fractional (``0.5``: the first half of the loader's
    batches in the last epoch; shuffle the loader for a random half).
    ``spec`` says how batches split into the model's inputs and the labels; ``augment`` (e.g.
    :class:`~koopman_hooks.data.RandomShift`) transforms each batch's input tensor."""
    plan = epoch_steps(epochs, len(loader))
    model.to(device).train()
    optimiser = adamw(model.parameters(), lr, weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=sum(plan))
    loss_fn = nn.CrossEntropyLoss()
    history: list[float] = []
    bar = tqdm(plan, desc=desc, disable=not verbose, leave=False)
    for steps in bar:
        total, count = 0.0, 0
        for batch in itertools.islice(loader, steps):  # a partial epoch: its first `steps` batches
            x, y = labelled(batch, spec, "train_classifier")
            x = augmented(x, augment)
            loss = loss_fn(MODEL_OUTPUT.get(call_model(model, move_inputs(x, device))), y.to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(y)
            count += len(y)
        history.append(total / max(count, 1))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    model.eval()
    return history


def augmented(x: Inputs, augment: Augment | None) -> Inputs:
    """``augment(x)``, for tensor inputs only."""
    if augment is None:
        return x
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"augmentation transforms one input tensor per batch, got {type(x).__name__} inputs")
    return augment(x)


def labelled(batch: Any, spec: BatchSpec, who: str) -> tuple[Inputs, torch.Tensor]:
    """``spec.split(batch)``, refusing a batch without labels (``who`` names the caller)."""
    x, y = spec.split(batch)
    if y is None:
        raise ValueError(f"{who} needs labelled batches: (x, y) tuples, or dicts with a label key such as 'labels'")
    return x, torch.as_tensor(y)


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu",
            spec: BatchSpec = BatchSpec()) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of ``model`` over a labelled loader, in eval mode (every submodule's
    mode restored afterwards)."""
    logits, labels = [], []
    with preserved_state(model):
        for batch in loader:
            x, y = labelled(batch, spec, "predict")
            logits.append(MODEL_OUTPUT.get(call_model(model, move_inputs(x, device))).float().cpu())
            labels.append(y.cpu())
    if not logits:
        raise EmptyLoaderError()
    return torch.cat(logits), torch.cat(labels)
