"""Forget/retain splits of labels and datasets."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from koopman_hooks.core.batches import split_batch

ArrayLike = torch.Tensor | np.ndarray | Sequence[int]
Classes = int | Iterable[int]


def class_list(classes: Classes) -> list[int]:
    """``forget_classes`` as a list of ints (a single int is one class)."""
    if isinstance(classes, (int, np.integer)):
        return [int(classes)]
    out = [int(c) for c in classes]
    if not out:
        raise ValueError("forget_classes is empty")
    return out


def split_by_class(labels: ArrayLike, forget_classes: Classes) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks ``(forget_mask, retain_mask)`` over ``labels``."""
    labels = torch.as_tensor(labels).reshape(-1)
    forget = torch.isin(labels, torch.tensor(class_list(forget_classes), dtype=labels.dtype))
    return forget, ~forget


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """All labels of a map-style dataset, read from ``targets``/``labels``/tensors when present."""
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    size = len(dataset)  # type: ignore[arg-type]
    for attr in ("targets", "labels"):
        targets = getattr(dataset, attr, None)
        if targets is not None and len(targets) == size:
            return torch.as_tensor(np.asarray(targets)).reshape(-1)
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) > 1:
        return dataset.tensors[1].reshape(-1)
    labels = [split_batch(dataset[i])[1] for i in range(size)]
    if any(y is None for y in labels):
        raise ValueError("the dataset's items carry no labels")
    return torch.as_tensor(np.asarray([int(y) for y in labels]))  # type: ignore[arg-type]


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
