"""The one AdamW every training loop of the package uses: the fused kernel where it can run."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

#: devices where AdamW runs its fused kernel: the same update to float rounding, and much faster
#: on a CPU than torch's default there (a Python loop over the parameters: about a quarter of a
#: small model's training step)
FUSED_ADAM_DEVICES = ("cpu", "cuda")
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fusable(params: Iterable[torch.Tensor]) -> bool:
    """Whether AdamW's fused kernel can update ``params``: floating tensors, all on one device of
    :data:`FUSED_ADAM_DEVICES`."""
    devices = set()
    for p in params:
        if p.dtype not in _FUSED_DTYPES:
            return False
        devices.add(p.device)
    return len(devices) == 1 and next(iter(devices)).type in FUSED_ADAM_DEVICES


def adamw(params: Iterable[Any], lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``params`` (tensors or parameter groups), fused where
    :func:`fusable`, else with its ``foreach`` implementation."""
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    fused = fusable(tensors)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused, foreach=not fused)
