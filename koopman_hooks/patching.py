"""A wrapper that routes a model's forward pass through a surrogate between two layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from koopman_hooks.hooks import LayerError, OutputSelector, get_module


class PatchedModel(nn.Module):
    """Same inputs and outputs as ``model``; ``dst_layer``'s output is replaced by
    ``surrogate(src_layer's output)``.

    The model is shared, not copied. Hooks exist only during this wrapper's own forward and
    are removed in ``finally``, so calling ``model(x)`` directly gives the original outputs.
    """

    def __init__(
        self,
        model: nn.Module,
        surrogate: nn.Module,
        src_layer: str,
        dst_layer: str,
        src_selector: OutputSelector,
        dst_selector: OutputSelector,
    ) -> None:
        super().__init__()
        if not dst_selector.writable:
            dst_selector.replace(None, torch.empty(0))  # raises the clear error
        self.model = model
        self.surrogate = surrogate
        self.src_layer = src_layer
        self.dst_layer = dst_layer
        self._src_selector = src_selector
        self._dst_selector = dst_selector
        get_module(model, src_layer)
        get_module(model, dst_layer)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        captured: dict[str, torch.Tensor] = {}

        def capture(module: nn.Module, inputs: Any, output: Any) -> None:
            captured["src"] = self._src_selector.get(output)

        def replace(module: nn.Module, inputs: Any, output: Any) -> Any:
            if "src" not in captured:
                raise LayerError(f"{self.dst_layer!r} ran before {self.src_layer!r}; cannot patch")
            real = self._dst_selector.get(output)
            predicted = self.surrogate(captured.pop("src"), like=real)
            return self._dst_selector.replace(output, predicted.to(dtype=real.dtype, device=real.device))

        handles = [
            get_module(self.model, self.src_layer).register_forward_hook(capture),
            # prepended, so other hooks on the layer (feature collectors) see the replaced output
            get_module(self.model, self.dst_layer).register_forward_hook(replace, prepend=True),
        ]
        try:
            return self.model(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    def extra_repr(self) -> str:
        return f"{self.src_layer!r} -> {self.dst_layer!r}"
