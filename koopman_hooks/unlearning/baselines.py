"""Standard class-unlearning baselines: retrain, fine-tune, NegGrad+ and LEACE erasure.

Each baseline returns ``(new_model, seconds)`` and leaves the given model's weights alone:
the training baselines work on a deep copy (or a fresh model), and LEACE wraps the model
without touching it.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from koopman_hooks.batches import call_model, move_inputs, split_batch
from koopman_hooks.training import train_classifier
from koopman_hooks.unlearning.metrics import Classes, class_list, layer_batches, resolve_module, split_by_class

# --------------------------------------------------------------------------- data splits


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """All labels of a map-style dataset, read from ``targets``/``labels``/tensors when present."""
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    for attr in ("targets", "labels"):
        targets = getattr(dataset, attr, None)
        if targets is not None and len(targets) == len(dataset):
            return torch.as_tensor(np.asarray(targets)).reshape(-1)
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) > 1:
        return dataset.tensors[1].reshape(-1)
    labels = [split_batch(dataset[i])[1] for i in range(len(dataset))]
    if any(y is None for y in labels):
        raise ValueError("the dataset's items carry no labels")
    return torch.as_tensor(np.asarray([int(y) for y in labels]))


def class_subsets(dataset: Dataset, forget_classes: Classes) -> tuple[Subset, Subset]:
    """``(retain_subset, forget_subset)``: the samples outside and inside ``forget_classes``."""
    forget, retain = split_by_class(dataset_targets(dataset), forget_classes)
    return (
        Subset(dataset, retain.nonzero().squeeze(1).tolist()),
        Subset(dataset, forget.nonzero().squeeze(1).tolist()),
    )


def class_loaders(
    dataset: Dataset, forget_classes: Classes, batch_size: int = 128, shuffle: bool = True, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    """``(retain_loader, forget_loader)`` over :func:`class_subsets`, shuffled with a seeded generator."""
    retain, forget = class_subsets(dataset, forget_classes)
    gen = torch.Generator().manual_seed(seed)
    return (
        DataLoader(retain, batch_size=batch_size, shuffle=shuffle, generator=gen),
        DataLoader(forget, batch_size=batch_size, shuffle=shuffle, generator=gen),
    )


# --------------------------------------------------------------------------- training baselines


def retrain(
    model_factory: Callable[[], nn.Module],
    retain_loader: DataLoader,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    device: str | torch.device = "cpu",
    verbose: bool = False,
) -> tuple[nn.Module, float]:
    """Gold standard: train ``model_factory()`` from scratch on the retain set only."""
    start = time.perf_counter()
    model = model_factory()
    train_classifier(model, retain_loader, epochs, lr, weight_decay, device, verbose, desc="retrain")
    return model, time.perf_counter() - start


def finetune(
    model: nn.Module,
    retain_loader: DataLoader,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    device: str | torch.device = "cpu",
    verbose: bool = False,
) -> tuple[nn.Module, float]:
    """Fine-tune a copy of ``model`` on the retain set (AdamW, one-cycle, as ``train_classifier``)."""
    start = time.perf_counter()
    tuned = copy.deepcopy(model)
    train_classifier(tuned, retain_loader, epochs, lr, weight_decay, device, verbose, desc="finetune")
    return tuned, time.perf_counter() - start


def _labelled(batch: Any, device: str | torch.device) -> tuple[Any, torch.Tensor]:
    x, y = split_batch(batch)
    if y is None:
        raise ValueError("unlearning baselines need labelled batches")
    return move_inputs(x, device), y.to(device)


def neggrad_plus(
    model: nn.Module,
    retain_loader: DataLoader,
    forget_loader: DataLoader,
    epochs: int,
    lr: float = 1e-3,
    alpha: float = 0.99,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, float]:
    """NegGrad+ (Kurmanji et al. 2023) on a copy: minimise ``alpha*CE(retain) - (1-alpha)*CE(forget)``.

    An epoch is one pass over ``retain_loader``, each retain batch paired with the next
    forget batch (the forget loader is cycled). AdamW with a one-cycle schedule, as
    :func:`finetune`, so the same ``lr`` scale applies; ``max_grad_norm`` clips if given.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if len(forget_loader) == 0 or len(retain_loader) == 0:
        raise ValueError("neggrad_plus needs non-empty retain and forget loaders")
    start = time.perf_counter()
    tuned = copy.deepcopy(model).to(device).train()
    optimiser = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=weight_decay)
    steps = max(epochs * len(retain_loader), 1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    forget_batches = itertools.cycle(forget_loader)
    for _ in range(epochs):
        for retain_batch in retain_loader:
            xr, yr = _labelled(retain_batch, device)
            xf, yf = _labelled(next(forget_batches), device)
            loss = alpha * loss_fn(call_model(tuned, xr), yr) - (1 - alpha) * loss_fn(call_model(tuned, xf), yf)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(tuned.parameters(), max_grad_norm)
            optimiser.step()
            schedule.step()
    tuned.eval()
    return tuned, time.perf_counter() - start


# --------------------------------------------------------------------------- LEACE


class LeaceStatistics:
    """Streaming float64 mean/covariance of ``x`` and cross-covariance with ``z`` (Chan et al. merge)."""

    def __init__(self, x_dim: int, z_dim: int) -> None:
        self.n = 0
        self.mean_x = torch.zeros(x_dim, dtype=torch.float64)
        self.mean_z = torch.zeros(z_dim, dtype=torch.float64)
        self.m_xx = torch.zeros(x_dim, x_dim, dtype=torch.float64)
        self.m_xz = torch.zeros(x_dim, z_dim, dtype=torch.float64)

    def update(self, x: torch.Tensor, z: torch.Tensor) -> LeaceStatistics:
        """Fold in a batch ``x (b, d)``, ``z (b, k)``."""
        x, z = x.detach().cpu().double(), z.detach().cpu().double()
        b = len(x)
        if b == 0:
            return self
        mx, mz = x.mean(0), z.mean(0)
        dx, dz = x - mx, z - mz
        delta_x, delta_z = mx - self.mean_x, mz - self.mean_z
        total = self.n + b
        weight = self.n * b / total
        self.m_xx += dx.T @ dx + weight * torch.outer(delta_x, delta_x)
        self.m_xz += dx.T @ dz + weight * torch.outer(delta_x, delta_z)
        self.mean_x += delta_x * (b / total)
        self.mean_z += delta_z * (b / total)
        self.n = total
        return self

    def eraser(self, rtol: float = 1e-8) -> LeaceEraser:
        """The LEACE eraser ``x - P (x - mean)`` with ``P = W^+ proj(W Σ_xz) W``, ``W = (Σ_xx^+)^{1/2}``."""
        if self.n < 2:
            raise ValueError("LEACE needs at least two samples")
        sigma = (self.m_xx + self.m_xx.T) / (2 * (self.n - 1))
        sigma_xz = self.m_xz / (self.n - 1)
        evals, evecs = torch.linalg.eigh(sigma)
        keep = evals > evals.max().clamp_min(0) * len(evals) * torch.finfo(torch.float64).eps
        root = torch.where(keep, evals.clamp_min(0).sqrt(), torch.zeros_like(evals))
        inv_root = torch.where(keep, 1.0 / root.clamp_min(1e-300), torch.zeros_like(evals))
        whiten = evecs @ torch.diag(inv_root) @ evecs.T
        unwhiten = evecs @ torch.diag(root) @ evecs.T
        u, s, _ = torch.linalg.svd(whiten @ sigma_xz, full_matrices=False)
        u = u[:, s > s.max().clamp_min(1e-300) * rtol] if s.numel() else u[:, :0]
        return LeaceEraser(self.mean_x, unwhiten @ u, u.T @ whiten)


class LeaceEraser(nn.Module):
    """``x -> x - P (x - mean)`` per sample (flattened), with ``P = left @ right`` of rank <= k."""

    def __init__(self, mean: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("left", left.clone())
        self.register_buffer("right", right.clone())

    @property
    def proj(self) -> torch.Tensor:
        """The dense ``(d, d)`` matrix ``P``."""
        return self.left @ self.right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(len(x), -1)
        centred = flat - self.mean.to(flat)
        return (flat - (centred @ self.right.to(flat).T) @ self.left.to(flat).T).reshape(x.shape)


class LeaceErasedModel(nn.Module):
    """``model`` (shared, not copied) with ``eraser`` applied to ``layer_name``'s output.

    The hook lives only inside this wrapper's ``forward`` and is prepended, so other hooks
    on that layer see the erased output; calling ``model`` directly is unaffected. As the
    model is a submodule, ``.to()``/``.eval()`` on the wrapper reach it too.
    """

    def __init__(self, model: nn.Module, layer_name: str, eraser: LeaceEraser) -> None:
        super().__init__()
        self.model = model
        self.layer_name = layer_name
        self.eraser = eraser

    def _hook(self, _module: nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return self.eraser(output)
        if isinstance(output, (tuple, list)):
            index = next(i for i, item in enumerate(output) if isinstance(item, torch.Tensor))
            items = list(output)
            items[index] = self.eraser(items[index])
            return type(output)(items)
        raise TypeError(f"cannot erase a module output of type {type(output).__name__}")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        layer = resolve_module(self.model, self.layer_name)
        handle = layer.register_forward_hook(self._hook, prepend=True)
        try:
            return self.model(*args, **kwargs)
        finally:
            handle.remove()


def fit_leace(
    model: nn.Module,
    layer_name: str,
    loader: Iterable,
    forget_classes: Classes,
    device: str | torch.device = "cpu",
) -> LeaceEraser:
    """Fit LEACE of the "is class c" indicators (one column per forget class) at ``layer_name``."""
    classes = torch.tensor(class_list(forget_classes))
    stats: LeaceStatistics | None = None
    for feats, labels in layer_batches(model, layer_name, loader, device):
        z = (labels.reshape(-1, 1) == classes.reshape(1, -1)).double()
        if stats is None:
            stats = LeaceStatistics(feats.shape[1], len(classes))
        stats.update(feats, z)
    if stats is None:
        raise ValueError("the loader yielded no batches")
    return stats.eraser()


def leace_erasure(
    model: nn.Module,
    layer_name: str,
    loader: Iterable,
    forget_classes: Classes,
    device: str | torch.device = "cpu",
) -> tuple[LeaceErasedModel, float]:
    """LEACE (Belrose et al. 2023) of the forget classes at ``layer_name``, wrapped around ``model``.

    Statistics stream over ``loader`` in float64; the eraser follows the model's device.
    """
    start = time.perf_counter()
    eraser = fit_leace(model, layer_name, loader, forget_classes, device).to(device)
    return LeaceErasedModel(model, layer_name, eraser), time.perf_counter() - start
