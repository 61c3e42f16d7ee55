"""Whether two model outputs agree (every tensor, or the scores), and the shape of an output's nesting."""

from __future__ import annotations

from typing import Any

import torch

from koopman_hooks.core.select import MODEL_OUTPUT, output_children


def _tensors_agree(x: torch.Tensor, y: torch.Tensor, rtol: float, atol: float) -> bool:
    if x.shape != y.shape:
        return False
    x, y = x.detach().float(), y.detach().float()
    scale = float(x.abs().max()) if x.numel() else 1.0
    return bool(torch.allclose(x, y, rtol=rtol, atol=atol * max(scale, 1.0)))


def output_structure(output: Any) -> Any:
    """The shape of an output's nesting (container types, keys, lengths; tensors as ``"T"``):
    two calls whose outputs differ here returned different things (e.g. ``hidden_states``)."""
    if isinstance(output, torch.Tensor):
        return "T"
    children = output_children(output)
    if not children:
        return type(output).__name__
    return (type(output).__name__, tuple((key, output_structure(child)) for key, child in children))


def _every_part_agrees(a: Any, b: Any, rtol: float, atol: float) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _tensors_agree(a, b, rtol, atol)
    left, right = output_children(a), output_children(b)
    if not left and not right:
        try:
            return type(a) is type(b) and bool(a == b)
        except Exception:  # noqa: BLE001 - a leaf without a plain truth value (an array) compares by identity
            return a is b
    return (len(left) == len(right) and all(ka == kb for (ka, _), (kb, _) in zip(left, right))
            and all(_every_part_agrees(x, y, rtol, atol) for (_, x), (_, y) in zip(left, right)))


def outputs_agree(a: Any, b: Any, rtol: float = 1e-4, atol: float = 1e-5, every_part: bool = False) -> bool:
    """Whether two model outputs have equal scores (the first tensor of each), up to float noise;
    with ``every_part``, every tensor of the outputs and the same structure around them."""
    if every_part:
        return _every_part_agrees(a, b, rtol, atol)
    return _tensors_agree(MODEL_OUTPUT.get(a), MODEL_OUTPUT.get(b), rtol, atol)
