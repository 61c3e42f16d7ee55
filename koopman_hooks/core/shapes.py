"""The shape contract of a fitted probe, checked wherever an activation or a model enters.

A fitted probe records every probed layer's per-sample activation shape; an activation of
another shape is refused with a :class:`~koopman_hooks.errors.ShapeError` naming the layer, the
shape fitted on and the one received. A probe file records the shapes of the probed layers'
parameters, so loading it onto a model of other widths is refused as well.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from koopman_hooks.errors import ShapeError


def check_shape(layer: str, value: torch.Tensor, expected: Sequence[int]) -> None:
    """Raise :class:`ShapeError` unless ``value`` (a batch) has per-sample shape ``expected``."""
    received = tuple(value.shape[1:])
    if received != tuple(expected):
        raise ShapeError(
            f"layer {layer!r} gave activations of shape {received} per sample, but the probe was fitted on "
            f"{tuple(expected)}: the inputs differ from the fitting data (another image size or sequence length?)"
        )


def check_fit_batch(activations: Mapping[str, torch.Tensor], first: Mapping[str, Sequence[int]], batch: int) -> None:
    """Raise :class:`ShapeError` unless batch ``batch`` of a fit's data has the per-sample shapes of
    its first batch (``first``) at every layer."""
    for layer, expected in first.items():
        received = tuple(activations[layer].shape[1:])
        if received != tuple(expected):
            raise ShapeError(
                f"layer {layer!r} gave activations of shape {received} per sample in batch {batch} of the fitting "
                f"data, but {tuple(expected)} in its first batch: a fit needs one shape throughout (pad every "
                "batch of tokens to one length, e.g. padding='max_length'; give every image one size)"
            )


def check_shapes(activations: Mapping[str, torch.Tensor], shapes: Mapping[str, Sequence[int]]) -> None:
    """:func:`check_shape` for every layer of ``shapes`` found in ``activations``."""
    for name, expected in shapes.items():
        if name in activations:
            check_shape(name, activations[name], expected)


def parameter_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of every parameter and buffer of ``module`` (its fingerprint of widths)."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return {name: tuple(tensor.shape) for name, tensor in tensors if tensor is not None}


def parameters_digest(module: nn.Module) -> str:
    """A hash of the name, dtype, shape and bytes of every parameter and buffer of ``module``:
    changes with any value, however it was written (an optimiser step, ``.data``, a swap).
    Tensors whose bytes cannot be read as one block (sparse, on the ``meta`` device, subclasses
    such as DTensor) count by their name, layout, dtype and shape only. About 1 GB/s on a CPU."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in (*module.named_parameters(), *module.named_buffers()):
        if tensor is None:
            continue
        value = tensor.detach()
        shape = "nested" if value.is_nested else tuple(value.shape)
        digest.update(f"{name}:{value.layout}:{value.dtype}:{shape};".encode())
        if type(value) is torch.Tensor and value.layout == torch.strided and not value.is_meta and not value.is_nested:
            try:
                digest.update(value.reshape(-1).cpu().contiguous().view(torch.uint8).numpy().data)  # not copied
            except (RuntimeError, TypeError, NotImplementedError):  # e.g. a quantized dtype numpy cannot hold
                pass
    return digest.hexdigest()


def parameter_mismatch(layer: str, saved: Mapping[str, Sequence[int]], module: nn.Module) -> str | None:
    """What differs between ``saved`` parameter shapes and ``module``'s (``None`` if nothing)."""
    current = parameter_shapes(module)
    for name in [*saved, *(n for n in current if n not in saved)]:
        want, got = saved.get(name), current.get(name)
        if want is None or got is None or tuple(want) != got:
            def shown(shape: Sequence[int] | None) -> str:
                return "none" if shape is None else str(tuple(shape))

            return (f"the probe was fitted on a model whose layer {layer!r} has parameter {name!r} of shape "
                    f"{shown(want)}; this model's is {shown(got)}")
    return None
