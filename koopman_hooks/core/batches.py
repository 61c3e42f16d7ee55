"""Read model inputs and labels out of whatever a DataLoader yields, the way the model takes them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from koopman_hooks.core.precision import autocast_to
from koopman_hooks.errors import ConfigError

Inputs = torch.Tensor | dict[str, Any]

LABEL_KEYS = ("labels", "label", "targets", "target", "y")
MASK_KEY = "attention_mask"


@dataclass(frozen=True)
class BatchSpec:
    """How to split a batch into the model's inputs and the labels.

    - a tensor is all inputs;
    - an ``(x, y, ...)`` tuple or list gives ``x`` and ``y`` (a 1-tuple has no labels);
    - a dict goes to the model as keyword arguments, every key but the label's
      (``label_key``, else the first of ``labels/label/targets/target/y`` present) and
      ``ignore_keys``. With ``input_key``, ``batch[input_key]`` is the one positional input;
      any other key left over is then an error, so that no input is dropped silently.
    """

    input_key: str | None = None
    label_key: str | None = None
    ignore_keys: tuple[str, ...] = ()
    amp: Literal["bf16", "fp16"] | None = None  # autocast the model's forward to this precision

    def split(self, batch: Any) -> tuple[Inputs, torch.Tensor | None]:
        """``(inputs, labels)``; labels are ``None`` when the batch has none."""
        if isinstance(batch, torch.Tensor):
            return batch, None
        if isinstance(batch, Mapping):
            return self._split_mapping(batch)
        if isinstance(batch, Sequence) and not isinstance(batch, str):
            if len(batch) == 0:
                raise ValueError("got an empty tuple/list as a batch")
            return batch[0], (batch[1] if len(batch) > 1 else None)
        raise TypeError(
            f"cannot read a batch of type {type(batch).__name__}: expected a tensor, an (x, y, ...) tuple/list or a dict"
        )

    def _split_mapping(self, batch: Mapping[str, Any]) -> tuple[Inputs, torch.Tensor | None]:
        if self.label_key is not None and self.label_key not in batch:
            raise ConfigError(f"label_key {self.label_key!r} is not a key of the batch; keys: {sorted(batch)}")
        key = self.label_key if self.label_key is not None else next((k for k in LABEL_KEYS if k in batch), None)
        labels = batch[key] if key is not None else None
        rest = {k: v for k, v in batch.items() if k != key and k not in self.ignore_keys}
        if self.input_key is None:
            return rest, labels
        if self.input_key not in batch:
            raise ConfigError(f"input_key {self.input_key!r} is not a key of the batch; keys: {sorted(batch)}")
        dropped = sorted(k for k in rest if k != self.input_key)
        if dropped and key is None:
            raise ConfigError(
                f"the batch has keys {dropped} besides input_key={self.input_key!r}, and no label key (none of "
                f"{list(LABEL_KEYS)}): pass label_key={dropped[0]!r} if those are the labels, or list the keys the "
                "model must not see in ignore_keys"
            )
        if dropped:
            raise ConfigError(
                f"the batch has keys {dropped} besides input_key={self.input_key!r} and the label; they would not "
                "reach the model. Pass input_key=None to call model(**batch) with every key, or list the keys the "
                "model must not see in ignore_keys"
            )
        return batch[self.input_key], labels


def amp_dtype(amp: str | None) -> torch.dtype | None:
    """The dtype of an ``amp`` setting (``"bf16"``, ``"fp16"`` or ``None``)."""
    return None if amp is None else torch.bfloat16 if amp == "bf16" else torch.float16


def autocast(spec: BatchSpec, device: torch.device) -> Any:
    """The autocast context of ``spec.amp`` on ``device`` (a no-op without ``amp``)."""
    return autocast_to(device, amp_dtype(spec.amp))
def class_labels(labels: Any, n_classes: int | None, ignore_index: int | None = None) -> torch.Tensor:
    """``labels`` as a ``(batch,)`` integer tensor of classes ``0..n_classes-1`` (``n_classes``: the
    width of the model's ``(batch, classes)`` scores; ``None``: only ``>= 0`` is checked) or
    ``ignore_index`` (a row without a label), or a ``ValueError`` naming the first label out of range."""
    y = torch.as_tensor(labels).cpu()
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"expected integer class labels of shape (batch,), got {tuple(y.shape)} {y.dtype}")
    bad = y[(y < 0) | (y >= n_classes)] if n_classes is not None else y[y < 0]
    if ignore_index is not None:
        bad = bad[bad != ignore_index]
    if len(bad):
        classes = f"the model scores {n_classes} classes (0..{n_classes - 1})" if n_classes else "classes are >= 0"
        none = f"; {ignore_index}: none" if ignore_index is not None else ""
        raise ValueError(f"label {int(bad[0])} is out of range: {classes}{none}")
    return y.long()  # int64 whatever the loader's integer type: a uint8 index would select as a mask


def split_batch(batch: Any, input_key: str | None = None, label_key: str | None = None) -> tuple[Inputs, torch.Tensor | None]:
    """``BatchSpec(input_key, label_key).split(batch)``."""
    return BatchSpec(input_key, label_key).split(batch)


def padding_side(mask: torch.Tensor | None) -> str | None:
    """Where an attention mask's padding sits: ``"left"``, ``"right"``, ``"both"`` (rows of
    each), or ``None`` (no mask, or no padding)."""
    if mask is None or mask.dim() != 2 or not mask.shape[1]:
        return None
    left, right = bool((mask[:, 0] == 0).any()), bool((mask[:, -1] == 0).any())
    return "both" if left and right else "left" if left else "right" if right else None


def padding_differs(fitted: str | None, now: str | None) -> bool:
    """Whether batches padded on the ``now`` side misplace the tokens of a fit padded on ``fitted``."""
    return fitted in ("left", "right") and now in ("left", "right") and fitted != now


def mask_of(inputs: Inputs, key: str | None = MASK_KEY) -> torch.Tensor | None:
    """The ``(B, N)`` attention mask of dict inputs (``inputs[key]``), else ``None``.

    Token reductions (``"last"``, ``"mean"``) read it to find the real tokens of padded
    sequences; a tensor input, a missing key or ``key=None`` means there is no mask.
    """
    if key is None or not isinstance(inputs, Mapping):
        return None
    mask = inputs.get(key)
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"inputs[{key!r}] must be a (batch, tokens) attention mask, got {shape}")
    return mask


def move_inputs(inputs: Inputs, device: torch.device | str | None) -> Inputs:
    """Move a tensor or a dict of tensors to ``device`` (``None`` leaves it)."""
    if device is None:
        return inputs
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """``model(x)`` for a tensor, ``model(**inputs)`` for a dict (a model whose forward takes
    none of the dict's keys is told how to name its input: ``input_key``)."""
    if not isinstance(inputs, dict):
        try:
            return model(inputs)
        except TypeError as err:
            if "required positional argument" not in str(err):
                raise
            raise TypeError(f"{err}: the model was called as model(x) with one tensor, the first element of the batch "
                            "(a tuple batch is read as (inputs, labels, ...)); for a model of several inputs, give "
                            "dict batches keyed by its argument names (it is then called as model(**batch); labels under "
                            f"one of {list(LABEL_KEYS)} or label_key=...)") from err
    try:
        return model(**inputs)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        raise TypeError(f"{err}: the batch is a dict, so the model was called as model(**batch) with its keys "
                        f"{sorted(inputs)}; for a model that takes one tensor, pass input_key=<its key> (and "
                        f"label_key=... when the labels are not under one of {list(LABEL_KEYS)})") from err


def batch_size_of(inputs: Inputs) -> int:
    """Number of samples in a batch of inputs."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    for value in inputs.values():
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise ValueError("cannot tell the batch size: the input dict holds no tensor")


def select_rows(inputs: Inputs, rows: torch.Tensor) -> Inputs:
    """The rows ``rows`` of a batch of inputs (every tensor of a dict with the batch's length)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[rows.to(inputs.device)]
    n = batch_size_of(inputs)
    return {k: (v[rows.to(v.device)] if isinstance(v, torch.Tensor) and v.ndim and len(v) == n else v)
            for k, v in inputs.items()}


def repeated_rows(example: Inputs, batch: int) -> Inputs:
    """``batch`` copies of the example's first row (stand-in inputs for a model's tail)."""
    if isinstance(example, torch.Tensor):
        return example[:1].expand(batch, *example.shape[1:])
    return {k: (v[:1].expand(batch, *v.shape[1:]) if isinstance(v, torch.Tensor) and v.ndim else v)
            for k, v in example.items()}


def concat_inputs(parts: Sequence[Inputs]) -> Inputs:
    """Concatenate batches of inputs along the batch dimension (tensors or dicts of tensors)."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(list(parts))  # type: ignore[arg-type]
    first = parts[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, torch.Tensor):
            out[key] = torch.cat([p[key] for p in parts])  # type: ignore[index]
        else:
            out[key] = value
    return out
