"""Find layers in any ``nn.Module``, read their outputs, and hook them safely.

Hooks are registered inside context managers and removed in ``finally``; only our own
handles are ever removed, so hooks that other code put on the model are left alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

LayerSpec = str | nn.Module
Select = int | str | Callable[[Any], torch.Tensor] | None
Path = tuple[int | str, ...]


class LayerError(ValueError):
    """A layer specification does not match the model, or a layer misbehaves in forward."""


class StopForward(Exception):
    """Raised from a hook to end a forward pass early once every needed layer has run."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return ``model.module`` for ``DataParallel``/``DistributedDataParallel`` wrappers."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
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


def _is_glob(spec: str) -> bool:
    return any(ch in spec for ch in "*?")


def resolve_layers(model: nn.Module, layers: Sequence[LayerSpec]) -> list[str]:
    """Turn names, glob patterns and module objects into module names, in the given order.

    Raises :class:`LayerError` with close-match suggestions when a name is not found.
    """
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    named = [(name, module) for name, module in model.named_modules() if name]
    names = [name for name, _ in named]
    by_module = {id(module): name for name, module in named}
    resolved: list[str] = []
    for spec in layers:
        if isinstance(spec, nn.Module):
            if id(spec) not in by_module:
                raise LayerError(
                    f"module {type(spec).__name__} is not a submodule of {type(model).__name__}"
                )
            matches = [by_module[id(spec)]]
        elif isinstance(spec, str) and _is_glob(spec):
            regex = _glob_to_regex(spec)
            matches = [name for name in names if regex.match(name)]
            if not matches:
                raise LayerError(f"pattern {spec!r} matches no layer of {type(model).__name__}; {_hint(spec, names)}")
        elif isinstance(spec, str):
            if spec not in names:
                raise LayerError(f"no layer named {spec!r} in {type(model).__name__}; {_hint(spec, names)}")
            matches = [spec]
        else:
            raise TypeError(f"a layer is a name, a glob pattern or a module, got {type(spec).__name__}")
        resolved.extend(name for name in matches if name not in resolved)
    if len(resolved) < 2:
        raise LayerError(f"a probe needs at least two layers (first and last), got {resolved}")
    return resolved


def _hint(spec: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(spec, names, n=5, cutoff=0.5)
    if close:
        return "did you mean " + ", ".join(repr(c) for c in close) + "?"
    top = [n for n in names if "." not in n][:10]
    return "top-level layers are " + ", ".join(repr(n) for n in top)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``, with a :class:`LayerError` naming close matches if absent."""
    model = unwrap_model(model)  # names are resolved on the wrapped model (DataParallel)
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        raise LayerError(f"no layer named {name!r} in {type(model).__name__}; {_hint(name, names)}") from None


# ----------------------------------------------------------------------------- output selection


def _children(output: Any) -> list[tuple[int | str, Any]]:
    if isinstance(output, Mapping):
        return list(output.items())
    if isinstance(output, (tuple, list)):
        return list(enumerate(output))
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [(f.name, getattr(output, f.name)) for f in dataclasses.fields(output)]
    return []


def _first_tensor_path(output: Any) -> Path | None:
    if isinstance(output, torch.Tensor):
        return ()
    for key, child in _children(output):
        sub = _first_tensor_path(child)
        if sub is not None:
            return (key, *sub)
    return None


def _get(output: Any, key: int | str) -> Any:
    if isinstance(output, Mapping) or (isinstance(output, (tuple, list)) and not isinstance(key, str)):
        return output[key]  # a str key on a tuple is a namedtuple field, read below
    return getattr(output, key)


def _set(output: Any, key: int | str, value: Any) -> Any:
    """A shallow copy of ``output`` with ``key`` set to ``value``."""
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # namedtuple
        field = output._fields[key] if isinstance(key, int) else key
        return output._replace(**{field: value})
    if isinstance(output, tuple):
        return output[:key] + (value,) + output[key + 1 :]
    if isinstance(output, list):
        return [value if i == key else item for i, item in enumerate(output)]
    if isinstance(output, Mapping):
        copy = output.copy() if hasattr(output, "copy") else dict(output)
        copy[key] = value
        return copy
    if dataclasses.is_dataclass(output):
        return dataclasses.replace(output, **{key: value})
    raise TypeError(f"cannot write into an output of type {type(output).__name__}")


class OutputSelector:
    """Reads the tensor to probe out of a layer's output, and writes a replacement back.

    ``select`` is ``None`` (the first tensor, searched depth-first through tuples, lists,
    dicts, namedtuples and dataclass/``ModelOutput``-like objects), an index or key, or a
    callable (read-only: such a layer cannot be patched).
    """

    def __init__(self, select: Select = None, layer: str = "?") -> None:
        if not (select is None or isinstance(select, (int, str)) or callable(select)):
            raise TypeError(f"select for layer {layer!r} must be None, an int, a str or a callable")
        self.select = select
        self.layer = layer

    @property
    def writable(self) -> bool:
        return not callable(self.select)

    def _path(self, output: Any) -> Path:
        if self.select is None:
            path = _first_tensor_path(output)
            if path is None:
                raise LayerError(
                    f"layer {self.layer!r} returned {type(output).__name__} holding no tensor; "
                    "pass select=... to say what to probe"
                )
            return path
        return (self.select,)

    def get(self, output: Any) -> torch.Tensor:
        if callable(self.select):
            value = self.select(output)
        else:
            value = output
            try:
                for key in self._path(output):
                    value = _get(value, key)
            except (KeyError, IndexError, AttributeError, TypeError) as err:
                raise LayerError(
                    f"select={self.select!r} does not apply to the output of layer {self.layer!r} "
                    f"({type(output).__name__}): {err}"
                ) from None
        if not isinstance(value, torch.Tensor):
            raise LayerError(
                f"select for layer {self.layer!r} gave {type(value).__name__}, not a tensor"
            )
        return value

    def replace(self, output: Any, new: torch.Tensor) -> Any:
        if not self.writable:
            raise LayerError(
                f"layer {self.layer!r} uses a callable select, so its output cannot be replaced; "
                "use an index or key to patch it"
            )
        return _replace_path(output, self._path(output), new)

    def describe(self) -> int | str | None:
        """A serialisable form of ``select`` (``None`` for the default and for callables)."""
        return None if callable(self.select) else self.select


def _replace_path(output: Any, path: Path, new: torch.Tensor) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    return _set(output, head, _replace_path(_get(output, head), rest, new))


def make_selectors(layers: Sequence[str], select: Select | Sequence[Select] | Mapping[str, Select]) -> dict[str, OutputSelector]:
    """One :class:`OutputSelector` per layer from a single ``select`` or one per layer."""
    if isinstance(select, Mapping):
        unknown = set(select) - set(layers)
        if unknown:
            raise LayerError(f"select names layers that are not probed: {sorted(unknown)}")
        return {name: OutputSelector(select.get(name), name) for name in layers}
    if isinstance(select, (list, tuple)):
        if len(select) != len(layers):
            raise ValueError(f"select has {len(select)} entries for {len(layers)} layers")
        return {name: OutputSelector(s, name) for name, s in zip(layers, select)}
    return {name: OutputSelector(select, name) for name in layers}


# ----------------------------------------------------------------------------- hooking


class Recording:
    """What a :func:`record` context saw during one forward pass."""

    def __init__(self) -> None:
        self.activations: dict[str, torch.Tensor] = {}
        self.order: list[str] = []

    def clear(self) -> None:
        self.activations.clear()
        self.order.clear()


@contextmanager
def record(
    model: nn.Module,
    selectors: Mapping[str, OutputSelector],
    stop_after: str | None = None,
) -> Iterator[Recording]:
    """Record the selected output of each layer (detached) while the context is open.

    With ``stop_after``, the forward pass ends (:class:`StopForward`) once that layer has run;
    wrap the model call in :func:`run_until_stop`. A layer that runs twice in one forward pass
    is an error, since its trajectory position would be ambiguous.
    """
    recording = Recording()
    handles = []

    def make_hook(name: str, selector: OutputSelector) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name in recording.activations:
                raise LayerError(
                    f"layer {name!r} ran more than once in one forward pass; probe a layer that runs once"
                )
            recording.activations[name] = selector.get(output).detach()
            recording.order.append(name)
            if name == stop_after and len(recording.activations) == len(selectors):
                raise StopForward  # only once every layer ran: else let check_order see the real order

        return hook

    try:
        for name, selector in selectors.items():
            module = get_module(model, name)
            handles.append(module.register_forward_hook(make_hook(name, selector)))
        yield recording
    finally:
        for handle in handles:
            handle.remove()


def run_until_stop(fn: Callable[[], Any]) -> Any:
    """Call ``fn`` and swallow the :class:`StopForward` that ends a pass early."""
    try:
        return fn()
    except StopForward:
        return None


def check_order(expected: Sequence[str], recording: Recording) -> None:
    """Fail clearly if a layer never ran or the layers ran in another order than given."""
    missing = [name for name in expected if name not in recording.activations]
    if missing:
        raise LayerError(
            f"layer(s) {missing} never executed during the forward pass; executed: {recording.order}"
        )
    if list(recording.order) != list(expected):
        raise LayerError(
            f"layers must be given in forward order: given {list(expected)}, executed {recording.order}"
        )


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter of ``model`` (no graph is built through
    its weights) and restore each flag on exit, even after an exception."""
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and restore every submodule's train/eval flag on exit."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training
