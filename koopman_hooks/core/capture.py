"""One hooked forward pass per batch: inputs, probed activations, output and labels.

Every pass over a user's loader -- fitting, evaluation, topology, unlearning statistics and
the baselines -- goes through :func:`iter_captures`, which checks in one place that the
layers ran once each and in order, that no activation is NaN/inf, that shapes match a
fitted probe's, and that the loader was not empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from koopman_hooks.core.batches import BatchSpec, Inputs, autocast, batch_size_of, call_model, move_inputs
from koopman_hooks.core.hooks import check_order, record, run_until_stop
from koopman_hooks.core.layers import module_device, unwrap_model
from koopman_hooks.core.select import OutputSelector
from koopman_hooks.errors import EmptyLoaderError, ShapeError


@dataclass(frozen=True)
class Captured:
    """One batch seen through the hooks. ``output`` is ``None`` when the pass stopped early."""

    inputs: Inputs
    activations: dict[str, torch.Tensor]
    output: Any
    labels: torch.Tensor | None


def check_finite(activations: Mapping[str, torch.Tensor]) -> None:
    for name, act in activations.items():
        if not torch.isfinite(act).all():
            bad = int((~torch.isfinite(act)).sum())
            raise ValueError(f"layer {name!r} produced {bad} non-finite (NaN/inf) activation values")


def check_rows(activations: Mapping[str, torch.Tensor], rows: int, selectors: Mapping[str, OutputSelector]) -> None:
    """Raise :class:`ShapeError` unless every activation holds one row per sample of the batch
    (its first dimension is the batch's ``rows``)."""
    for name, act in activations.items():
        if act.ndim == 0 or act.shape[0] != rows:
            select = selectors[name].describe() if name in selectors else None
            chosen = "the first tensor of its output" if select is None else f"select={select!r}"
            raise ShapeError(
                f"layer {name!r} gave a tensor of shape {tuple(act.shape)} ({chosen}), whose first dimension is not "
                f"the batch's {rows} samples: the probe reads one row per sample (batch first). Probe a batch-first "
                "tensor: run the module with batch_first=True (RNNs), probe another layer, or pass select= for "
                "another element of its output"
            )


def capture_batch(
    model: nn.Module,
    selectors: Mapping[str, OutputSelector],
    batch: Any,
    spec: BatchSpec = BatchSpec(),
    *,
    stop_early: bool = False,
    shapes: Mapping[str, Sequence[int]] | None = None,
    ordered: bool = True,
    hook_on: nn.Module | None = None,
) -> Captured:
    """Run ``model`` on one batch under :func:`~koopman_hooks.core.hooks.record`.

    ``selectors`` (in forward order) say which layers to record; with ``stop_early`` the pass
    ends after the last of them (``output`` is then ``None``). ``shapes`` are the per-sample
    activation shapes the caller expects, checked as each layer runs (before a later module can
    fail on the wrong shape). With ``ordered=False`` the layers may run in any
    order (each still exactly once). ``hook_on`` is the module whose layers are hooked when it is
    not ``model`` itself (a wrapper such as a patched model called around a shared model).
    """
    inputs, labels = spec.split(batch)
    device = module_device(unwrap_model(model))
    inputs = move_inputs(inputs, device)
    layers = list(selectors)
    target = unwrap_model(hook_on if hook_on is not None else model)
    with record(target, selectors, stop_after=layers[-1] if stop_early else None, shapes=shapes) as rec, \
            autocast(spec, device):
        output = run_until_stop(lambda: call_model(model, inputs))
    check_order(layers if ordered else [*rec.order, *(n for n in layers if n not in rec.activations)], rec)
    check_rows(rec.activations, batch_size_of(inputs), selectors)
    check_finite(rec.activations)
    return Captured(inputs, dict(rec.activations), output, labels)


def iter_captures(
    model: nn.Module,
    selectors: Mapping[str, OutputSelector],
    loader: Iterable[Any],
    spec: BatchSpec = BatchSpec(),
    *,
    stop_early: bool = False,
    shapes: Mapping[str, Sequence[int]] | None = None,
    ordered: bool = True,
    hook_on: nn.Module | None = None,
) -> Iterator[Captured]:
    """:func:`capture_batch` over every batch of ``loader`` (each pass under ``no_grad``).

    Raises :class:`EmptyLoaderError` after the iteration if the loader yielded nothing. The
    model's train/eval modes are the caller's business (see ``preserved_state``).
    """
    empty = True
    for batch in loader:
        empty = False
        with torch.no_grad():
            captured = capture_batch(model, selectors, batch, spec, stop_early=stop_early, shapes=shapes, ordered=ordered,
                                     hook_on=hook_on)
        yield captured  # outside no_grad: the consumer may train on it
    if empty:
        raise EmptyLoaderError()
