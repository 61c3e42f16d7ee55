"""A wrapper that routes a model's forward pass through a surrogate between two layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from koopman_hooks.core.hooks import hooked
from koopman_hooks.core.layers import get_module
from koopman_hooks.core.select import OutputSelector
from koopman_hooks.errors import LayerError


class PatchedModel(nn.Module):
    """Same inputs and outputs as ``model``; ``dst_layer``'s output is replaced by
    ``surrogate(src_layer's output, like=dst_layer's real output)``.

    The model is shared, not copied. Hooks exist only during this wrapper's own forward
    (:func:`~koopman_hooks.core.hooks.hooked`), so calling ``model(x)`` directly gives the
    original outputs.
    """

    def __init__(
        self,
        model: nn.Module,
        surrogate: nn.Module,
        src_layer: str,
        dst_layer: str,
        src_selector: OutputSelector | None = None,
        dst_selector: OutputSelector | None = None,
    ) -> None:
        super().__init__()
        dst_selector = dst_selector or OutputSelector(None, dst_layer)
        if not dst_selector.writable:
            dst_selector.replace(None, torch.empty(0))  # raises the clear error
        get_module(model, src_layer)
        get_module(model, dst_layer)
        self.model = model
        self.surrogate = surrogate
        self.src_layer = src_layer
        self.dst_layer = dst_layer
        self.src_selector = src_selector or OutputSelector(None, src_layer)
        self.dst_selector = dst_selector

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        captured: dict[str, torch.Tensor] = {}

        def capture(module: nn.Module, inputs: Any, output: Any) -> None:
            captured["src"] = self.src_selector.get(output)

        def replace(module: nn.Module, inputs: Any, output: Any) -> Any:
            if "src" not in captured:
                raise LayerError(f"{self.dst_layer!r} ran before {self.src_layer!r}; cannot patch")
            real = self.dst_selector.get(output)
            predicted = self.surrogate(captured.pop("src"), like=real)
            return self.dst_selector.replace(output, predicted.to(dtype=real.dtype, device=real.device))

        with hooked(self.model, {self.src_layer: capture}):
            # prepended, so other hooks on the layer (feature collectors) see the replaced output
            with hooked(self.model, {self.dst_layer: replace}, prepend=True):
                return self.model(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.src_layer!r} -> {self.dst_layer!r}"
