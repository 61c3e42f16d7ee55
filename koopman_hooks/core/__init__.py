"""Touching a user's model: layers, output selection, hooks, batches, capture, patching, files."""

from koopman_hooks.core.batches import BatchSpec, Inputs, batch_size_of, call_model, move_inputs, split_batch
from koopman_hooks.core.capture import Captured, capture_batch, iter_captures
from koopman_hooks.core.hooks import frozen_parameters, hooked, preserved_state, record
from koopman_hooks.core.layers import LayerSpec, get_module, module_device, resolve_layers, unwrap_model
from koopman_hooks.core.patching import PatchedModel
from koopman_hooks.core.select import MODEL_OUTPUT, OutputSelector, Select, make_selectors, per_layer

__all__ = [
    "MODEL_OUTPUT",
    "BatchSpec",
    "Captured",
    "Inputs",
    "LayerSpec",
    "OutputSelector",
    "PatchedModel",
    "Select",
    "batch_size_of",
    "call_model",
    "capture_batch",
    "frozen_parameters",
    "get_module",
    "hooked",
    "iter_captures",
    "make_selectors",
    "module_device",
    "move_inputs",
    "per_layer",
    "preserved_state",
    "record",
    "resolve_layers",
    "split_batch",
    "unwrap_model",
]
