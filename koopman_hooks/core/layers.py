"""Find layers in any ``nn.Module`` by name, glob pattern or module object."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

import torch
from torch import nn

from koopman_hooks.errors import LayerError

LayerSpec = str | nn.Module


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return ``model.module`` for ``DataParallel``/``DistributedDataParallel`` wrappers."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def module_name(model: nn.Module, module: nn.Module) -> str:
    """``module``'s name in ``model`` (a description when it is not one of ``model``'s modules)."""
    for name, candidate in unwrap_model(model).named_modules():
        if candidate is module:
            return name
    return f"a {type(module).__name__} module of another model"


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """``*`` matches within one dotted name part, ``**`` across parts, ``?`` one character."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?")


def suggest(name: str, names: Sequence[str]) -> str:
    """``"did you mean ...?"`` with close matches, else the top-level names."""
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    if close:
        return "did you mean " + ", ".join(repr(c) for c in close) + "?"
    top = [n for n in names if "." not in n][:10]
    return "top-level layers are " + ", ".join(repr(n) for n in top)


def resolve_layers(model: nn.Module, layers: Sequence[LayerSpec] | LayerSpec, minimum: int = 2) -> list[str]:
    """Turn names, glob patterns and module objects into module names, in the given order.

    Raises :class:`LayerError` naming close matches when a name is not found, and when a
    layer is named twice (directly, or by a pattern and a name); and for a ``torch.compile``d
    model, whose compiled graph runs without the hooks that read its layers.
    """
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise LayerError("the model is torch.compile'd: its compiled graph runs its layers without calling the hooks "
                         "that read them; probe the module it compiled (model._orig_mod), and compile the patched "
                         "model afterwards if you like")
    model = unwrap_model(model)
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    named = [(name, module) for name, module in model.named_modules() if name]
    names = [name for name, _ in named]
    by_module = {id(module): name for name, module in named}
    resolved: list[str] = []
    for spec in layers:
        if isinstance(spec, nn.Module):
            if id(spec) not in by_module:
                raise LayerError(f"module {type(spec).__name__} is not a submodule of {type(model).__name__}")
            matches = [by_module[id(spec)]]
        elif isinstance(spec, str) and is_glob(spec):
            regex = glob_to_regex(spec)
            matches = [name for name in names if regex.match(name)]
            if not matches:
                raise LayerError(f"pattern {spec!r} matches no layer of {type(model).__name__}; {suggest(spec, names)}")
        elif isinstance(spec, str):
            if spec not in names:
                raise LayerError(f"no layer named {spec!r} in {type(model).__name__}; {suggest(spec, names)}")
            matches = [spec]
        else:
            raise LayerError(f"a layer is a name, a glob pattern or a module, got {type(spec).__name__}")
        twice = [name for name in matches if name in resolved]
        if twice:
            raise LayerError(f"layer {twice[0]!r} is named more than once in layers={list(layers)!r}; name each layer once")
        resolved.extend(matches)
    if len(resolved) < minimum:
        need = {1: "one layer", 2: "two layers (first and last)"}.get(minimum, f"{minimum} layers")
        raise LayerError(f"a probe needs at least {need}, got {resolved}")
    return resolved


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``, with a :class:`LayerError` naming close matches if absent."""
    model = unwrap_model(model)  # names are resolved on the wrapped model (DataParallel)
    if name == "":
        return model
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise LayerError(f"no layer named {name!r} in {type(model).__name__}; {suggest(name, names)}") from None


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for a stateless module)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        return tensor.device
    return torch.device("cpu")
