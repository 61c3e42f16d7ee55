"""Run a model's tail: its output for a supplied activation of one layer, skipping what runs before."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from koopman_hooks.core.batches import Inputs, batch_size_of, call_model
from koopman_hooks.core.compare import outputs_agree
from koopman_hooks.core.precision import autocast_to
from koopman_hooks.core.select import OutputSelector
from koopman_hooks.core.skipping import batch_of, call_with_zeros, skip_plan, skipped, trace, zeros_that_work


class TailRunner:
    """The model's output for a supplied ``dst`` activation: every module that runs only
    before ``dst`` is skipped. ``inputs`` still go to the model (code outside modules, e.g. an
    attention mask's use, may read them); :meth:`check` says whether this is exact."""

    def __init__(self, model: nn.Module, dst: str, dst_selector: OutputSelector, example: Inputs,
                 amp: torch.dtype | None = None) -> None:
        self.model, self.dst, self.selector, self.amp = model, dst, dst_selector, amp
        found = batch_of([], example) if isinstance(example, Mapping) else batch_of([example], {})
        with autocast_to(found[1] if found else torch.device("cpu"), amp):  # the model's forward as the probe runs it
            self._trace = trace(model, lambda: call_model(model, example))
        self._skip = skip_plan(self._trace, dst)
        self._shared_zeros = True

    def __call__(self, inputs: Inputs, value: torch.Tensor) -> Any:
        out, self._shared_zeros = call_with_zeros(lambda shared: self._run(shared, inputs, value), self._shared_zeros)
        return out

    def _run(self, shared: bool, inputs: Inputs, value: torch.Tensor) -> Any:
        def supply(zeros: Any) -> Any:
            template = self.selector.get(zeros)
            return self.selector.replace(zeros, value.to(dtype=template.dtype, device=template.device))

        with skipped(self.model, self._trace, self._skip, batch_size_of(inputs), value.device, {self.dst: supply},
                     shared=shared), autocast_to(value.device, self.amp):
            return call_model(self.model, inputs)

    def check(self, inputs: Inputs, value: torch.Tensor, expected: Any) -> bool:
        """Whether the tail of ``value`` (``dst``'s real output on ``inputs``) reproduces
        ``expected``: with the skipped modules' zeros broadcast from one where that works, else
        with allocated zeros."""
        shared = zeros_that_work(lambda shared: outputs_agree(self._run(shared, inputs, value), expected))
        if shared is None:
            return False
        self._shared_zeros = shared
        return True


def tail_runner(model: nn.Module, dst: str, selector: OutputSelector, inputs: Inputs, value: torch.Tensor,
                expected: Any) -> TailRunner | None:
    """A :class:`TailRunner` for ``dst`` checked on one real batch, or ``None`` if it is not exact."""
    try:
        runner = TailRunner(model, dst, selector, inputs)
    except Exception:  # noqa: BLE001 - a model the trace cannot follow has no tail runner
        return None
    return runner if runner.check(inputs, value, expected) else None
