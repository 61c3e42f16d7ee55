"""A fast in-memory batch iterator for tensor datasets (no per-item collation)."""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Subset


def _count(value: Any) -> int:
    """``value`` as an int (also NumPy's), or -1 for a bool or anything that is not a whole number."""
    if isinstance(value, bool):
        return -1
    try:
        return operator.index(value)
    except TypeError:
        return -1


class TensorLoader:
    """Yields ``(x, y)`` batches by slicing whole tensors; a drop-in for a ``DataLoader``.

    With ``keys`` (one name per tensor) it yields dicts ``{key: slice}`` instead, e.g.
    ``{"input_ids", "attention_mask", "labels"}`` batches for ``model(**batch)``. Reshuffles
    every epoch with its own seeded generator when ``shuffle=True``.
    """

    def __init__(self, *tensors: torch.Tensor, batch_size: int = 256, shuffle: bool = False, seed: int = 0,
                 keys: Sequence[str] | None = None) -> None:
        if not tensors or any(len(t) != len(tensors[0]) for t in tensors):
            raise ValueError("TensorLoader needs one or more tensors of equal length")
        if keys is not None and (len(keys) != len(tensors) or len(set(keys)) != len(keys)):
            raise ValueError(f"TensorLoader needs one distinct key per tensor, got keys {list(keys)} for "
                             f"{len(tensors)} tensors")
        if _count(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.tensors = tensors
        self.keys = None if keys is None else tuple(keys)
        self.batch_size = _count(batch_size)
        self.shuffle = shuffle
        self._generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_dataset(
        cls, dataset: object, batch_size: int = 256, shuffle: bool = False, seed: int = 0, limit: int | None = None
    ) -> TensorLoader:
        """From a dataset exposing ``tensors`` (TensorDataset) or ``inputs``/``targets``, or a
        ``Subset`` of one; ``limit`` keeps the first ``limit`` samples. A dataset with ``keys``
        (one name per tensor, e.g. the token task's) gives dict batches."""
        if limit is not None and _count(limit) < 0:
            raise ValueError(f"limit must be an int >= 0 (the first rows kept), got {limit!r}")
        tensors = _tensors_of(dataset)
        if limit is not None:
            tensors = tuple(t[:limit] for t in tensors)
        return cls(*tensors, batch_size=batch_size, shuffle=shuffle, seed=seed, keys=_keys_of(dataset))

    def __len__(self) -> int:
        return -(-len(self.tensors[0]) // self.batch_size)

    def _batch(self, parts: tuple[torch.Tensor, ...]) -> Any:
        return parts if self.keys is None else dict(zip(self.keys, parts))

    def __iter__(self) -> Iterator[Any]:
        n = len(self.tensors[0])
        order = torch.randperm(n, generator=self._generator) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            if order is None:
                yield self._batch(tuple(t[start : start + self.batch_size] for t in self.tensors))
            else:
                idx = order[start : start + self.batch_size]
                yield self._batch(tuple(t[idx] for t in self.tensors))


def _keys_of(dataset: object) -> tuple[str, ...] | None:
    if isinstance(dataset, Subset):
        return _keys_of(dataset.dataset)
    keys = getattr(dataset, "keys", None)
    return tuple(keys) if isinstance(keys, (tuple, list)) else None


def _tensors_of(dataset: object) -> tuple[torch.Tensor, ...]:
    if isinstance(dataset, Subset):
        indices = torch.as_tensor(dataset.indices, dtype=torch.long)
        return tuple(t[indices] for t in _tensors_of(dataset.dataset))
    if hasattr(dataset, "tensors"):
        return tuple(dataset.tensors)
    if hasattr(dataset, "inputs") and hasattr(dataset, "targets"):
        return (dataset.inputs, dataset.targets)
    raise TypeError(f"TensorLoader needs a dataset of tensors, got {type(dataset).__name__}")
