"""Read model inputs and labels out of whatever a DataLoader yields."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

Inputs = torch.Tensor | dict[str, Any]

_LABEL_KEYS = ("labels", "label", "targets", "target", "y")


def split_batch(
    batch: Any, input_key: str | None = None, label_key: str | None = None
) -> tuple[Inputs, torch.Tensor | None]:
    """Split a batch into ``(inputs, labels)``; labels are ``None`` when the batch has none.

    - a tensor is all inputs;
    - an ``(x, y, ...)`` tuple or list gives ``x`` and ``y`` (a 1-tuple has no labels);
    - a dict gives ``batch[input_key]``, or, with ``input_key=None``, every other key as
      keyword arguments; the label is ``batch[label_key]`` or the first of
      ``labels/label/targets/target/y`` present.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        key = label_key if label_key is not None else next((k for k in _LABEL_KEYS if k in batch), None)
        if label_key is not None and label_key not in batch:
            raise KeyError(f"label_key {label_key!r} not in batch keys {sorted(batch)}")
        labels = batch[key] if key is not None else None
        if input_key is not None:
            if input_key not in batch:
                raise KeyError(f"input_key {input_key!r} not in batch keys {sorted(batch)}")
            return batch[input_key], labels
        return {k: v for k, v in batch.items() if k != key}, labels
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        if len(batch) == 0:
            raise ValueError("got an empty tuple/list as a batch")
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(
        f"cannot read a batch of type {type(batch).__name__}: expected a tensor, an (x, y, ...) "
        "tuple/list or a dict"
    )


def move_inputs(inputs: Inputs, device: torch.device | str | None) -> Inputs:
    """Move a tensor or a dict of tensors to ``device`` (``None`` leaves it)."""
    if device is None:
        return inputs
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """``model(x)`` for a tensor, ``model(**inputs)`` for a dict."""
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def batch_size_of(inputs: Inputs) -> int:
    """Number of samples in a batch of inputs."""
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    for value in inputs.values():
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise ValueError("cannot tell the batch size: the input dict holds no tensor")
