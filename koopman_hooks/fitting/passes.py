"""The passes of a fit over the user's data: calibrate on one batch, fit the adapters, fill the cache.

A fit runs the model at most twice over the fit data: once (stopping after the last probed
layer) to fit the adapters, once to cache every sample's adapted states, the model's scores
and labels; everything after that reads the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from koopman_hooks.core.batches import BatchSpec, Inputs, batch_size_of, call_model, mask_of, repeated_rows, select_rows
from koopman_hooks.core.capture import Captured, capture_batch, iter_captures
from koopman_hooks.core.patching import TailRunner
from koopman_hooks.core.select import MODEL_OUTPUT, OutputSelector
from koopman_hooks.core.skipping import Trace, skip_plan, trace
from koopman_hooks.errors import EmptyLoaderError
from koopman_hooks.fitting.cache import StateCache
from koopman_hooks.fitting.head import head_reduce
from koopman_hooks.fitting.sizing import module_macs
from koopman_hooks.koopman.adapters import AdapterFitter, LayerAdapter

TailInputs = Literal["repeated", "real"]
CALIBRATION_ROWS = 8


@dataclass
class Calibration:
    """What one real batch tells about the model before the fit proper."""

    example: Inputs
    trace: Trace
    n_outputs: int | None
    replaced_macs: int | None = None
    tail: TailRunner | None = None
    tail_inputs: TailInputs | None = None
    reduce: str | None = None  # the token reduction that follows the head at the last layer, if found
    notes: dict[str, str] = field(default_factory=dict)


def _per_sample_macs(model: nn.Module, example: Inputs, calib_trace: Trace, layers: Sequence[str]) -> int | None:
    """Multiply-adds per sample of the modules a fast patched path skips between ``layers[0]``
    and ``layers[-1]``, and of ``layers[-1]`` itself."""
    replaced = [*skip_plan(calib_trace, layers[-1], after=layers[0]), layers[-1]]
    try:
        counts = module_macs(model, select_rows(example, torch.tensor([0])))
    except Exception:  # noqa: BLE001 - a model the counter cannot follow: no budget
        return None
    total = sum(n for name, n in counts.items() if any(name == r or name.startswith(r + ".") for r in replaced))
    return total or None


def calibrate(model: nn.Module, captured: Captured, layers: Sequence[str], selectors: Mapping[str, OutputSelector],
              want_tail: bool, detect_head: bool = False, mask_key: str | None = None) -> Calibration:
    """Trace the model on (up to 8 rows of) the first batch; find its tail after the last probed
    layer and whether stand-in inputs (the first row repeated) are enough to run it; with
    ``detect_head``, the token reduction that follows what the head reads of the last layer."""
    rows = torch.arange(min(CALIBRATION_ROWS, batch_size_of(captured.inputs)))
    example = select_rows(captured.inputs, rows)
    calib_trace = trace(model, lambda: call_model(model, example))
    scores = None if captured.output is None else MODEL_OUTPUT.get(captured.output)
    n_outputs = int(scores.shape[-1]) if scores is not None and scores.dim() == 2 else None
    calibration = Calibration(example, calib_trace, n_outputs)
    last = layers[-1]
    calibration.replaced_macs = _per_sample_macs(model, example, calib_trace, layers)
    if detect_head and captured.activations[last].ndim == 3:
        mask = mask_of(example, mask_key)
        reading = head_reduce(model, last, selectors[last], example, captured.activations[last][rows], mask)
        calibration.reduce = reading.reduce
        calibration.notes["reduce"] = reading.reason
    labels = captured.labels
    classifier = (n_outputs is not None and isinstance(labels, torch.Tensor) and labels.dim() == 1
                  and not labels.dtype.is_floating_point and labels.dtype != torch.bool
                  and bool(((labels >= 0) & (labels < n_outputs)).all()))
    if not want_tail or not classifier:
        calibration.notes["tail"] = ("output loss switched off" if not want_tail
                                     else "not a classifier (no integer labels within the model's output width)")
        return calibration
    with torch.no_grad():
        reference = call_model(model, example)
        real = captured.activations[last][rows]
    try:
        runner = TailRunner(model, last, selectors[last], example)
    except Exception:  # noqa: BLE001 - a model the trace cannot follow has no tail runner
        runner = None
    if runner is not None and runner.check(repeated_rows(example, len(rows)), real, reference):
        calibration.tail, calibration.tail_inputs = runner, "repeated"
    elif runner is not None and runner.check(example, real, reference):
        calibration.tail, calibration.tail_inputs = runner, "real"
    else:
        calibration.notes["tail"] = f"the model's output after {last!r} could not be reproduced from it alone"
    return calibration


def fit_adapters(
    model: nn.Module, layers: Sequence[str], selectors: Mapping[str, OutputSelector], loader: Iterable[Any],
    spec: BatchSpec, reduce: Mapping[str, str | None], device: torch.device,
    on_first: Callable[[Captured], Mapping[str, str] | None] | None = None, mask_key: str | None = None,
) -> AdapterFitter:
    """Pass 1: stream every probed layer's reduced activations, stopping each forward pass after
    the last probed layer -- except on the first batch, which ``on_first(captured)`` sees whole
    (it may return reductions for layers left to the default)."""
    fitter = AdapterFitter(layers, reduce, device=device)
    seen = False
    for i, batch in enumerate(loader):
        seen = True
        with torch.no_grad():
            captured = capture_batch(model, selectors, batch, spec, stop_early=i > 0)
        if i == 0 and on_first is not None:
            chosen = on_first(captured) or {}
            fitter.reduce.update({name: r for name, r in chosen.items() if fitter.reduce.get(name) is None})
        fitter.update(captured.activations, mask_of(captured.inputs, mask_key))
    if not seen:
        raise EmptyLoaderError()
    return fitter


def fill_cache(
    cache: StateCache,
    model: nn.Module,
    layers: Sequence[str],
    selectors: Mapping[str, OutputSelector],
    adapters: Mapping[str, LayerAdapter],
    loader: Iterable[Any],
    spec: BatchSpec,
    shapes: Mapping[str, Sequence[int]],
    device: torch.device,
    keep_scores: bool,
    keep_inputs: bool,
    mask_key: str | None = None,
) -> int:
    """Pass 2: every sample's adapted states (``s0``, ``s1``, ...), scores, labels, attention
    ``mask`` and, with ``keep_inputs``, its inputs (``in`` or ``in.<key>``); returns the number
    of batches."""
    batches = 0
    for captured in iter_captures(model, selectors, loader, spec, stop_early=not keep_scores, shapes=shapes):
        fields: dict[str, torch.Tensor] = {}
        mask = mask_of(captured.inputs, mask_key)
        with torch.no_grad():
            for i, name in enumerate(layers):
                fields[f"s{i}"] = adapters[name](captured.activations[name].to(device, torch.float32),
                                                 None if mask is None else mask.to(device))
        if mask is not None:
            fields["mask"] = mask
        if keep_scores:
            fields["scores"] = MODEL_OUTPUT.get(captured.output).detach().float()
        if captured.labels is not None:
            fields["labels"] = torch.as_tensor(captured.labels).reshape(-1)
        if keep_inputs:
            if isinstance(captured.inputs, torch.Tensor):
                fields["in"] = captured.inputs
            else:
                fields.update({f"in.{k}": v for k, v in captured.inputs.items() if isinstance(v, torch.Tensor)})
        cache.append(fields)
        batches += 1
    return batches


def inputs_of(rows: Mapping[str, torch.Tensor], example: Inputs) -> Inputs:
    """The model inputs of cached rows (``in`` or ``in.<key>`` fields, non-tensors from ``example``)."""
    if "in" in rows:
        return rows["in"]
    assert isinstance(example, dict)
    return {k: rows.get(f"in.{k}", v) for k, v in example.items()}
