"""Run part of a model: skip the modules whose output a patch replaces anyway.

A forward pass is traced once (which named module runs when, and what it returns). From the
trace, :func:`skip_plan` finds the top-most modules that run only inside a window of the pass
-- between ``src`` and ``dst``, or everything before ``dst`` -- and :func:`skipped` replaces
their ``forward`` with one that returns zeros of the traced shape (so the code between modules
still sees tensors of the right shape) while ``dst`` returns a given value. The zeros can be one
shared zero broadcast to the shape (no memory is written; an in-place write into it raises), so
skipping a large early layer costs nothing; callers fall back to fresh zeros where that fails. Whether the result
equals the full pass is a property of the model's code, not something a trace can prove: the
callers compare both paths on a real batch before they rely on the short one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from koopman_hooks.core.hooks import hooked, muted_forward_hooks
from koopman_hooks.core.layers import get_module, unwrap_model

T = TypeVar("T")
Template = Any  # a module output with every tensor replaced by (shape without batch, dtype)


def _template(output: Any) -> Template:
    if isinstance(output, torch.Tensor):
        return ("tensor", tuple(output.shape[1:]), output.dtype)
    if isinstance(output, tuple) and hasattr(output, "_fields"):
        return ("namedtuple", type(output), [_template(v) for v in output])
    if isinstance(output, (tuple, list)):
        return (type(output).__name__, [_template(v) for v in output])
    if isinstance(output, Mapping):
        return ("mapping", type(output), {k: _template(v) for k, v in output.items()})
    return ("constant", output)


def zeros_like_template(template: Template, batch: int, device: torch.device, shared: bool = False) -> Any:
    """An output of the traced structure with zero tensors for ``batch`` samples; with ``shared``
    each is a single zero expanded to the shape (read-only: writing into it raises)."""
    kind = template[0]
    if kind == "tensor":
        if shared:
            return torch.zeros((), dtype=template[2], device=device).expand(batch, *template[1])
        return torch.zeros(batch, *template[1], dtype=template[2], device=device)
    if kind == "namedtuple":
        return template[1](*(zeros_like_template(t, batch, device, shared) for t in template[2]))
    if kind in ("tuple", "list"):
        items = [zeros_like_template(t, batch, device, shared) for t in template[1]]
        return tuple(items) if kind == "tuple" else items
    if kind == "mapping":
        return template[1]({k: zeros_like_template(t, batch, device, shared) for k, t in template[2].items()})
    return template[1]


OVERLAP_ERROR = "more than one element of the written-to tensor"  # torch's message for a write into a broadcast


@contextmanager
def broadcast_writes_raise() -> Iterator[None]:
    """While open, the in-place writes torch lets through on broadcast tensors with only a
    deprecation warning (``masked_fill_``, ``index_put_``, ``tensor[mask] = x``) raise too."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r".*on expanded tensors is deprecated", category=UserWarning)
        yield


def is_broadcast_write(error: BaseException) -> bool:
    """Whether ``error`` is torch refusing an in-place write into a broadcast tensor."""
    return isinstance(error, RuntimeError) and OVERLAP_ERROR in str(error)


def zeros_that_work(check: Callable[[bool], bool]) -> bool | None:
    """``check(shared)`` without grad, with broadcast zeros first, then allocated ones (writes
    torch only warns about raising; an exception counts as a failed check): the first
    ``shared`` that passes, or ``None``."""
    for shared in (True, False):
        try:
            with torch.no_grad(), broadcast_writes_raise():
                if check(shared):
                    return shared
        except Exception:  # noqa: BLE001 - a path that cannot run does not pass
            continue
    return None


def call_with_zeros(call: Callable[[bool], T], shared: bool) -> tuple[T, bool]:
    """``call(shared)``, rerun with allocated zeros when it wrote into a broadcast one; returns
    the result and the zeros to use from now on."""
    try:
        return call(shared), shared
    except RuntimeError as error:  # a write the checked batch did not make
        if not (shared and is_broadcast_write(error)):
            raise
        return call(False), False


@dataclass(frozen=True)
class Trace:
    """When each named module ran in one forward pass: ``calls[name]`` is a list of
    ``(start, end)`` event indices; ``templates[name]`` the structure of its (first) output."""

    calls: dict[str, list[tuple[int, int]]]
    templates: dict[str, Template]


def trace(model: nn.Module, run: Callable[[], Any]) -> Trace:
    """Call ``run`` (a forward pass of ``model``) once without grad and record when every named
    module of ``model`` ran."""
    return traced(model, run)[0]


def traced(model: nn.Module, run: Callable[[], T], grad: bool = False) -> tuple[Trace, T]:
    """:func:`trace`, returning ``run``'s result too; with ``grad`` in the caller's grad mode
    (the pass then serves as the caller's forward)."""
    inner = unwrap_model(model)
    events = 0
    calls: dict[str, list[tuple[int, int]]] = {}
    starts: dict[str, list[int]] = {}
    templates: dict[str, Template] = {}
    handles = []

    def pre(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            nonlocal events
            starts.setdefault(name, []).append(events)
            events += 1

        return hook

    def post(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            nonlocal events
            calls.setdefault(name, []).append((starts[name].pop(), events))
            templates.setdefault(name, _template(output))
            events += 1

        return hook

    try:
        for name, module in inner.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(pre(name)))
                handles.append(module.register_forward_hook(post(name)))
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            result = run()
    finally:
        for handle in handles:
            handle.remove()
    return Trace(calls, templates), result


def _is_within(name: str, other: str) -> bool:
    """Whether module ``name`` is ``other`` or one of its submodules."""
    return name == other or name.startswith(other + ".")


def skip_plan(trace: Trace, dst: str, after: str | None = None) -> list[str]:
    """The top-most modules to skip so that ``dst``'s output can be supplied: every module that
    runs only before ``dst`` starts -- and, with ``after``, only after ``after`` has finished --
    except ``dst``'s ancestors and, with ``after``, ``after`` and what contains or precedes it."""
    if dst not in trace.calls or len(trace.calls[dst]) != 1:
        return []
    dst_start = trace.calls[dst][0][0]
    lower = -1
    if after is not None:
        if after not in trace.calls or len(trace.calls[after]) != 1:
            return []
        lower = trace.calls[after][0][1]
    window = [name for name, intervals in trace.calls.items()
              if not _is_within(dst, name) and not _is_within(name, dst)
              and (after is None or not _is_within(after, name))
              and all(lower < start and end < dst_start for start, end in intervals)]
    chosen = set(window)
    return sorted((name for name in window if not any(_is_within(name, p) and p != name for p in chosen)),
                  key=lambda n: trace.calls[n][0][0])


def batch_of(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[int, torch.device] | None:
    """Batch size and device of a call, from its first tensor argument."""
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.ndim:
            return value.shape[0], value.device
    return None


@contextmanager
def skipped(
    model: nn.Module, trace_: Trace, names: Sequence[str], batch: int, device: torch.device,
    supply: Mapping[str, Callable[..., Any]] | None = None, shared: bool = False,
) -> Iterator[None]:
    """While open, the modules ``names`` return zeros of their traced output structure for
    ``batch`` samples instead of computing anything (``shared``: broadcast from one zero, see
    :func:`zeros_like_template`), and each module in ``supply`` returns ``supply[name](fresh
    zeros of its traced output)`` (their ``forward`` is replaced; restored in ``finally``). The
    forward hooks of ``supply``'s modules run (they see what is supplied); those of the modules
    ``names`` do not (zeros are not their output; their pre-hooks run)."""

    def placeholder(name: str, fill: Callable[[Any], Any] | None = None) -> Callable[..., Any]:
        template = trace_.templates[name]

        def forward(*args: Any, **kwargs: Any) -> Any:
            if fill is None:
                return zeros_like_template(template, batch, device, shared)
            return fill(zeros_like_template(template, batch, device))

        return forward

    forwards = {name: placeholder(name) for name in names}
    forwards.update({name: placeholder(name, fill) for name, fill in (supply or {}).items()})
    with hooked(model, forwards=forwards), muted_forward_hooks(get_module(model, name) for name in names
                                                               if name not in (supply or {})):
        yield
