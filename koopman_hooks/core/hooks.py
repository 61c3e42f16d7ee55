"""Temporary hooks on a user's model, and guards that leave the model exactly as it was.

:func:`hooked` is the one place where hooks are registered: it yields while they are in place
and removes exactly its own handles in ``finally`` (hooks other code put on the model stay).
Everything else -- :func:`record`, :class:`~koopman_hooks.core.patching.PatchedModel`, the
LEACE wrapper -- is built on it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from koopman_hooks.core.layers import get_module
from koopman_hooks.core.select import OutputSelector
from koopman_hooks.core.shapes import check_shape
from koopman_hooks.errors import LayerError

ForwardHook = Callable[[nn.Module, Any, Any], Any]


class StopForward(Exception):
    """Raised from a hook to end a forward pass early once every needed layer has run."""


@contextmanager
def hooked(
    model: nn.Module,
    forward_hooks: Mapping[str, ForwardHook] | None = None,
    *,
    prepend: bool = False,
    forwards: Mapping[str, Callable[..., Any]] | None = None,
) -> Iterator[nn.Module]:
    """Run code with temporary forward hooks (and forward replacements) on named layers.

    Args:
        model: the model (``DataParallel`` wrappers are unwrapped for names).
        forward_hooks: ``{layer name: hook(module, args, output)}``; a hook may return a
            replacement output.
        prepend: register the hooks before any existing hook of the layer, so other hooks
            (feature collectors) see the replaced output.
        forwards: ``{layer name: fn}``: the layer's ``forward`` is ``fn`` while the context is
            open (its hooks still run); used to skip layers whose output is replaced anyway.

    Only the handles registered here are removed, in ``finally``; replaced ``forward``
    methods are restored, even when the body raises.
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []
    replaced: list[tuple[nn.Module, bool, Any]] = []
    try:
        for name, hook in (forward_hooks or {}).items():
            handles.append(get_module(model, name).register_forward_hook(hook, prepend=prepend))
        for name, fn in (forwards or {}).items():
            module = get_module(model, name)
            own = "forward" in module.__dict__
            replaced.append((module, own, module.__dict__.get("forward")))
            module.forward = fn
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for module, own, previous in reversed(replaced):
            if own:
                module.forward = previous
            else:
                del module.forward


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
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> Iterator[Recording]:
    """Record the selected output of each layer (detached) while the context is open.

    With ``stop_after``, the forward pass ends (:class:`StopForward`) once that layer has run;
    wrap the model call in :func:`run_until_stop`. A layer that runs twice in one forward pass
    is an error, since its trajectory position would be ambiguous. A layer of ``shapes`` whose
    per-sample shape differs raises :class:`~koopman_hooks.errors.ShapeError` as it runs.
    """
    recording = Recording()

    def make_hook(name: str, selector: OutputSelector) -> ForwardHook:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name in recording.activations:
                raise LayerError(f"layer {name!r} ran more than once in one forward pass; probe a layer that runs once")
            value = selector.get(output).detach().clone()  # as the layer returned it: later in-place ops cannot reach it
            if shapes is not None and name in shapes:
                check_shape(name, value, shapes[name])
            recording.activations[name] = value
            recording.order.append(name)
            if name == stop_after and len(recording.activations) == len(selectors):
                raise StopForward  # only once every layer ran: else let check_order see the real order

        return hook

    with hooked(model, {name: make_hook(name, sel) for name, sel in selectors.items()}):
        yield recording


def run_until_stop(fn: Callable[[], Any]) -> Any:
    """Call ``fn`` and swallow the :class:`StopForward` that ends a pass early (``None`` then)."""
    try:
        return fn()
    except StopForward:
        return None


def check_order(expected: Sequence[str], recording: Recording) -> None:
    """Fail clearly if a layer never ran or the layers ran in another order than given."""
    missing = [name for name in expected if name not in recording.activations]
    if missing:
        raise LayerError(f"layer(s) {missing} never executed during the forward pass; executed: {recording.order}")
    if list(recording.order) != list(expected):
        raise LayerError(f"layers must be given in forward order: given {list(expected)}, executed {recording.order}")


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
def muted_forward_hooks(modules: Iterable[nn.Module]) -> Iterator[None]:
    """While open, the forward hooks registered on ``modules`` themselves do not run (their
    forward pre-hooks do, and hooks inside them are left alone); restored in ``finally``. For
    modules that stand skipped in a forward pass: their output is a placeholder no hook should
    read as theirs."""
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for module in modules:
            saved.append((module, module._forward_hooks))
            module._forward_hooks = OrderedDict()
        yield
    finally:
        for module, hooks in reversed(saved):
            module._forward_hooks = hooks


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
