"""Read the tensor to probe out of a layer's output, and write a replacement back.

Outputs may be tensors, tuples, lists, dicts, namedtuples or dataclass/``ModelOutput``-like
objects; the selection is found once per call and written back without changing the
output's structure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from koopman_hooks.errors import ConfigError, LayerError

Select = int | str | Callable[[Any], torch.Tensor] | None
Path = tuple[int | str, ...]
T = TypeVar("T")


def output_children(output: Any) -> list[tuple[int | str, Any]]:
    """The (key, value) parts of a container output (mapping, tuple, list, dataclass); [] for a leaf."""
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
    for key, child in output_children(output):
        sub = _first_tensor_path(child)
        if sub is not None:
            return (key, *sub)
    return None


def _get(output: Any, key: int | str) -> Any:
    if isinstance(output, Mapping):
        return output[key]
    if isinstance(output, (tuple, list)) and isinstance(key, int):
        return output[key]
    if isinstance(key, int):
        raise TypeError(f"cannot index {type(output).__name__} with {key}")
    return getattr(output, key)  # a str key on a tuple is a namedtuple field


def _set(output: Any, key: int | str, value: Any) -> Any:
    """A shallow copy of ``output`` with ``key`` set to ``value``."""
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # namedtuple
        field = output._fields[key] if isinstance(key, int) else key
        return output._replace(**{field: value})  # type: ignore[attr-defined]
    if isinstance(output, tuple) and isinstance(key, int):
        return output[:key] + (value,) + output[key + 1 :]
    if isinstance(output, list):
        return [value if i == key else item for i, item in enumerate(output)]
    if isinstance(output, Mapping):
        copy = output.copy() if hasattr(output, "copy") else dict(output)
        copy[key] = value
        return copy
    if dataclasses.is_dataclass(output) and not isinstance(output, type) and isinstance(key, str):
        return dataclasses.replace(output, **{key: value})
    raise TypeError(f"cannot write into an output of type {type(output).__name__}")


def _replace_path(output: Any, path: Path, new: torch.Tensor) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    return _set(output, head, _replace_path(_get(output, head), rest, new))


class OutputSelector:
    """Reads the tensor to probe out of a layer's output, and writes a replacement back.

    ``select`` is ``None`` (the first tensor, searched depth-first through tuples, lists,
    dicts, namedtuples and dataclass/``ModelOutput``-like objects), an index or key, or a
    callable (read-only: such a layer cannot be patched).
    """

    def __init__(self, select: Select = None, layer: str = "?") -> None:
        if isinstance(select, bool) or not (select is None or isinstance(select, (int, str)) or callable(select)):
            raise LayerError(f"select for layer {layer!r} must be None, an int, a str or a callable, got {select!r}")
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
        assert isinstance(self.select, (int, str))
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
            raise LayerError(f"select for layer {self.layer!r} gave {type(value).__name__}, not a tensor")
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


class ModelOutputSelector(OutputSelector):
    """Reads a model's scores: ``logits`` of a dict/``ModelOutput``-like output that has them
    (a HuggingFace model given ``labels`` puts its ``loss`` first), else the first tensor."""

    def _path(self, output: Any) -> Path:
        if self.select is None and _has_logits(output):
            return ("logits",)
        return super()._path(output)


def _has_logits(output: Any) -> bool:
    if isinstance(output, Mapping):
        return isinstance(output.get("logits"), torch.Tensor)
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return isinstance(getattr(output, "logits", None), torch.Tensor)
    return False


#: Reads a model's output: its ``logits`` when it has them, else the first tensor of whatever
#: it returns (logits for classifiers).
MODEL_OUTPUT = ModelOutputSelector(None, "model output")


def per_layer(layers: Sequence[str], value: T | Sequence[T] | Mapping[str, T], what: str) -> dict[str, T | None]:
    """Spread one option over ``layers``: one value for all, a list with one per layer, or a
    ``{layer: value}`` dict (layers it leaves out get ``None``)."""
    if isinstance(value, Mapping):
        unknown = set(value) - set(layers)
        if unknown:
            raise LayerError(f"{what} names layers that are not probed: {sorted(unknown)}; probed: {list(layers)}")
        return {name: value.get(name) for name in layers}
    if isinstance(value, (list, tuple)):
        if len(value) != len(layers):
            raise LayerError(f"{what} has {len(value)} entries for {len(layers)} layers {list(layers)}")
        return dict(zip(layers, value))
    return {name: value for name in layers}  # type: ignore[misc]


def make_selectors(layers: Sequence[str], select: Select | Sequence[Select] | Mapping[str, Select]) -> dict[str, OutputSelector]:
    """One :class:`OutputSelector` per layer from a single ``select`` or one per layer."""
    spread: Mapping[str, Select] = per_layer(layers, select, "select")
    return {name: OutputSelector(s, name) for name, s in spread.items()}


def loaded_selectors(layers: Sequence[str], saved: Sequence[Select], callables: Sequence[str],
                     given: Select | Sequence[Select] | Mapping[str, Select] | None) -> dict[str, OutputSelector]:
    """The selectors of a probe read back from a file: the ``saved`` select of every layer, where
    ``given`` (``load(..., select=)``) leaves it out, and ``given``'s callables for the layers
    probed with one (``callables``; not saved). A given select that contradicts a saved one
    raises :class:`~koopman_hooks.errors.ConfigError`."""
    kept: dict[str, Select] = {name: (saved[i] if saved else None) for i, name in enumerate(layers)}
    asked: dict[str, Select] = dict.fromkeys(layers)
    if given is not None:
        asked.update(per_layer(layers, given, "select"))
    missing = [name for name in callables if not callable(asked.get(name))]
    if missing:
        raise ConfigError(f"layers {missing} were probed with a callable select, which files do not hold: pass it "
                          "again, e.g. select={" + ", ".join(f"{name!r}: fn" for name in missing) + "}")
    for name, value in asked.items():
        if value is None or name in callables:
            continue
        if kept.get(name) is not None and kept[name] != value:
            raise ConfigError(f"select={value!r} for {name!r} contradicts the select it was probed with "
                              f"({kept[name]!r}); leave it out to use the saved one")
        kept[name] = value
    for name in callables:
        kept[name] = asked[name]
    return {name: OutputSelector(kept.get(name), name) for name in layers}

