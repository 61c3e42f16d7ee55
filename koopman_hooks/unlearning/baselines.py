"""Training baselines of class unlearning: retrain, fine-tune and NegGrad+.

Each returns ``(new_model, seconds)`` and leaves the given model's weights alone: they work on
a deep copy (or a fresh model). LEACE, which wraps the model, lives in
:mod:`koopman_hooks.unlearning.leace`.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from koopman_hooks.core.batches import BatchSpec, call_model, move_inputs
from koopman_hooks.core.optim import adamw
from koopman_hooks.core.select import MODEL_OUTPUT
from koopman_hooks.training import Augment, Loader, augmented, epoch_steps, labelled, train_classifier

# --------------------------------------------------------------------------- training baselines


def retrain(
    model_factory: Callable[[], nn.Module],
    retain_loader: Loader,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    device: str | torch.device = "cpu",
    verbose: bool = False,
    spec: BatchSpec = BatchSpec(),
    augment: Augment | None = None,
) -> tuple[nn.Module, float]:
    """Gold standard: train ``model_factory()`` from scratch on the retain set only (``spec``:
    how batches split into inputs and labels, as for the probe; ``augment``: as the model was
    trained)."""
    start = time.perf_counter()
    model = model_factory()
    train_classifier(model, retain_loader, epochs, lr, weight_decay, device, verbose, desc="retrain", spec=spec,
                     augment=augment)
    return model, time.perf_counter() - start


def finetune(
    model: nn.Module,
    retain_loader: Loader,
    epochs: float,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    device: str | torch.device = "cpu",
    verbose: bool = False,
    spec: BatchSpec = BatchSpec(),
    augment: Augment | None = None,
) -> tuple[nn.Module, float]:
    """Fine-tune a copy of ``model`` on the retain set (AdamW, one-cycle, ``augment``, fractional
    ``epochs``, as ``train_classifier``)."""
    start = time.perf_counter()
    tuned = copy.deepcopy(model)
    train_classifier(tuned, retain_loader, epochs, lr, weight_decay, device, verbose, desc="finetune", spec=spec,
                     augment=augment)
    return tuned, time.perf_counter() - start


def _labelled(batch: Any, device: str | torch.device, spec: BatchSpec,
              augment: Augment | None) -> tuple[Any, torch.Tensor]:
    x, y = labelled(batch, spec, "neggrad_plus")
    return move_inputs(augmented(x, augment), device), y.to(device)


def neggrad_plus(
    model: nn.Module,
    retain_loader: Loader,
    forget_loader: Loader,
    epochs: float,
    lr: float = 1e-3,
    alpha: float = 0.99,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    device: str | torch.device = "cpu",
    spec: BatchSpec = BatchSpec(),
    augment: Augment | None = None,
) -> tuple[nn.Module, float]:
    """NegGrad+ (Kurmanji et al. 2023) on a copy: minimise ``alpha*CE(retain) - (1-alpha)*CE(forget)``.

    An epoch is one pass over ``retain_loader``, each retain batch paired with the next
    forget batch (the forget loader is cycled); ``epochs`` may be fractional. AdamW with a
    one-cycle schedule, as :func:`finetune`, so the same ``lr`` scale applies;
    ``max_grad_norm`` clips if given; ``augment`` transforms both batches' inputs.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if len(forget_loader) == 0 or len(retain_loader) == 0:
        raise ValueError("neggrad_plus needs non-empty retain and forget loaders")
    plan = epoch_steps(epochs, len(retain_loader))
    start = time.perf_counter()
    tuned = copy.deepcopy(model).to(device).train()
    optimiser = adamw(tuned.parameters(), lr, weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=sum(plan))
    loss_fn = nn.CrossEntropyLoss()
    forget_batches = itertools.cycle(forget_loader)
    for steps in plan:
        for retain_batch in itertools.islice(retain_loader, steps):
            xr, yr = _labelled(retain_batch, device, spec, augment)
            xf, yf = _labelled(next(forget_batches), device, spec, augment)
            retain_logits = MODEL_OUTPUT.get(call_model(tuned, xr))
            forget_logits = MODEL_OUTPUT.get(call_model(tuned, xf))
            loss = alpha * loss_fn(retain_logits, yr) - (1 - alpha) * loss_fn(forget_logits, yf)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(tuned.parameters(), max_grad_norm)
            optimiser.step()
            schedule.step()
    tuned.eval()
    return tuned, time.perf_counter() - start
