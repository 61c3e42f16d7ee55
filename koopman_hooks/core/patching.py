"""Route a model's forward pass through a surrogate between two layers.

:class:`PatchedModel` replaces ``dst``'s output with ``surrogate(src's output)``. Its *fast*
path also skips the modules that run only between ``src`` and ``dst`` (their output is
replaced anyway), so the patched model costs less than the original; it is checked on the
first call in eval mode against the full path on the same batch and used only if every tensor
of both outputs agrees (a call of another kind, or after a weight update, is checked again; a
module in training mode and hooks on skipped modules or on ``dst`` take the full path).
:class:`~koopman_hooks.core.tail.TailRunner` gives the model's output for a supplied ``dst``
activation, skipping everything before ``dst``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from koopman_hooks.core.batches import MASK_KEY
from koopman_hooks.core.compare import output_structure, outputs_agree
from koopman_hooks.core.hooks import hooked
from koopman_hooks.core.layers import get_module
from koopman_hooks.core.select import OutputSelector, output_children
from koopman_hooks.core.skipping import (
    Trace,
    batch_of,
    call_with_zeros,
    skip_plan,
    skipped,
    traced,
    zeros_that_work,
)
from koopman_hooks.errors import LayerError, ShapeError

Path = Literal["pending", "fast", "full"]
MAX_KINDS = 256  # kinds of call whose verdict is kept


def _inert(hook: Callable[..., Any]) -> bool:
    """transformers' output-capturing hooks, put on every layer once hidden states or attentions
    were asked for, do nothing unless a call asks for them (and such a call is its own kind,
    checked against the full path): they do not keep the fast path off."""
    return getattr(hook, "__module__", None) == "transformers.utils.output_capturing"


def accepts_mask(module: nn.Module) -> bool:
    """Whether ``module``'s forward takes a ``mask`` argument (a Koopman surrogate does)."""
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return "mask" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def call_argument(signature: inspect.Signature | None, args: Sequence[Any], kwargs: Mapping[str, Any],
                  name: str | None) -> Any:
    """The value a forward with this ``signature`` gets for its argument ``name`` in this call
    (keyword or positional), else ``None``."""
    if name is None:
        return None
    if name in kwargs:
        return kwargs[name]
    if not args or signature is None or name not in signature.parameters:
        return None
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return None
    return bound.arguments.get(name)


def forward_signature(model: nn.Module) -> inspect.Signature | None:
    """``model.forward``'s signature (``None`` where it has none)."""
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def check_patch_layers(surrogate: nn.Module, src: str | None, dst: str | None) -> None:
    """Raise :class:`LayerError` where ``src``/``dst`` given to ``patch`` are not the layers the
    surrogate was made for (its ``src_layer``/``dst_layer``)."""
    for given, own in ((src, "src_layer"), (dst, "dst_layer")):
        have = getattr(surrogate, own, None)
        if given is not None and have is not None and given != have:
            raise LayerError(f"patch({own[:3]}={given!r}) but the surrogate's {own} is {have!r}: leave {own[:3]} out, "
                             "or pass a surrogate of those layers")


class PatchedModel(nn.Module):
    """Same inputs and outputs as ``model``; ``dst_layer``'s output is replaced by
    ``surrogate(src_layer's output, like=...)``.

    With ``strict`` (default) the surrogate gets ``like=None``: a lossy reduction at ``dst`` is
    decoded from the training mean, never from the real forward pass, so every figure of the
    patched model is the surrogate's alone. ``strict=False`` passes ``like=`` the real output
    (the "mixed" diagnostic; it needs the full path). ``fast`` allows the fast path (strict only).
    The call's ``mask_key`` argument (the attention mask, e.g. of ``model(**batch)``) reaches a
    surrogate that takes ``mask=``, for token reductions that read it.
    The model is shared, not copied; hooks and replaced ``forward`` methods exist only during
    this wrapper's own forward, so ``model(x)`` still gives the original outputs.
    """

    def __init__(
        self,
        model: nn.Module,
        surrogate: nn.Module,
        src_layer: str,
        dst_layer: str,
        src_selector: OutputSelector | None = None,
        dst_selector: OutputSelector | None = None,
        strict: bool = True,
        fast: bool = True,
        mask_key: str | None = MASK_KEY,
    ) -> None:
        super().__init__()
        if not isinstance(surrogate, nn.Module):
            hint = f": to choose layers, pass src= / dst= (e.g. patch(dst={surrogate!r}))" if isinstance(surrogate, str) else ""
            raise TypeError(f"surrogate must be an nn.Module (a KoopmanSurrogate, or any module called as "
                            f"surrogate(x_src, like=...)), got {type(surrogate).__name__} {surrogate!r}{hint}")
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
        self.strict = strict
        self.mask_key = mask_key
        self._mask_aware = accepts_mask(surrogate)
        self._signature = forward_signature(model)  # read once: binding a call to it finds the mask
        self._fast_allowed = fast and strict
        self.path: Path = "pending" if self._fast_allowed else "full"
        self._trace: Trace | None = None
        self._skip: list[str] = []
        self._skipped_tree: list[nn.Module] = []  # skipped modules, dst and dst's submodules: see _hooks_on_skipped
        self._modules_seen: list[nn.Module] | None = None  # see _training and _weights_now
        self._checked_calls: dict[Any, tuple[bool, Any]] = {}  # kind of call -> (fast path agreed, output structure)
        self._weights: tuple[Any, ...] | None = None  # see _recheck_if_changed
        self._shared_zeros = True
        self._checking = False  # calibrated: every kind of call is checked (self.path: whether one agreed)

    def _predict(self, source: torch.Tensor, real: torch.Tensor | None, mask: Any = None) -> torch.Tensor:
        like = None if self.strict else real
        if self._mask_aware and isinstance(mask, torch.Tensor):
            predicted = self.surrogate(source, like=like, mask=mask)
        else:
            predicted = self.surrogate(source, like=like)
        if real is None:
            return predicted
        if tuple(predicted.shape) != tuple(real.shape):  # a prediction must fit what it replaces
            raise ShapeError(f"the surrogate's prediction of layer {self.dst_layer!r} has shape {tuple(predicted.shape)}, "
                             f"the layer's own output {tuple(real.shape)}: they must match (a surrogate must return the "
                             "shape of the tensor it replaces; a fitted probe's, the fitting data's shape)")
        return predicted.to(dtype=real.dtype, device=real.device)

    def _mask(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        return call_argument(self._signature, args, kwargs, self.mask_key) if self._mask_aware else None

    def _full(self, *args: Any, **kwargs: Any) -> Any:
        captured: dict[str, torch.Tensor] = {}
        mask = self._mask(args, kwargs)

        def capture(module: nn.Module, inputs: Any, output: Any) -> None:
            captured["src"] = self.src_selector.get(output).clone()  # safe from in-place ops after src

        replaced: list[bool] = []

        def replace(module: nn.Module, inputs: Any, output: Any) -> Any:
            if "src" not in captured:
                if replaced:
                    raise LayerError(f"{self.dst_layer!r} ran more than once in one forward pass; cannot patch it")
                raise LayerError(f"{self.dst_layer!r} ran before {self.src_layer!r}; cannot patch")
            replaced.append(True)
            return self.dst_selector.replace(output, self._predict(captured.pop("src"), self.dst_selector.get(output), mask))

        with hooked(self.model, {self.src_layer: capture}):
            # prepended, so other hooks on the layer (feature collectors) see the replaced output
            with hooked(self.model, {self.dst_layer: replace}, prepend=True):
                return self.model(*args, **kwargs)

    def _fast(self, *args: Any, **kwargs: Any) -> Any:
        out, self._shared_zeros = call_with_zeros(lambda shared: self._skipping(shared, *args, **kwargs),
                                                  self._shared_zeros)
        return out

    def _skipping(self, shared: bool, *args: Any, **kwargs: Any) -> Any:
        assert self._trace is not None
        found = batch_of(args, kwargs)
        if found is None:
            raise LayerError("the fast path needs a tensor argument to tell the batch size")
        batch, device = found
        captured: dict[str, torch.Tensor] = {}
        mask = self._mask(args, kwargs)

        def capture(module: nn.Module, inputs: Any, output: Any) -> None:
            captured["src"] = self.src_selector.get(output).clone()  # safe from in-place ops after src

        def supply(zeros: Any) -> Any:  # in dst's traced dtype: a change of the weights' dtype re-traces
            template = self.dst_selector.get(zeros)
            value = self._predict(captured.pop("src"), None, mask)
            return self.dst_selector.replace(zeros, value.to(dtype=template.dtype, device=template.device))

        with hooked(self.model, {self.src_layer: capture}):
            with skipped(self.model, self._trace, self._skip, batch, device, {self.dst_layer: supply}, shared=shared):
                return self.model(*args, **kwargs)

    def calibrate(self, *args: Any, **kwargs: Any) -> Any:
        """Run the full path on this batch (in the caller's grad mode, tracing which module runs
        when) and, where allowed, try the fast one (without grad): it is used from now on if both
        give the same output, every tensor of it. Returns the full path's output. A model with a
        module in training mode is not calibrated (dropout makes the paths differ, and every
        extra pass would update batch norm's running statistics): the call runs the full path
        once and the check waits for a call in eval mode; so it does while a forward hook sits
        on a module the fast path would skip, or on ``dst``."""
        if self.path != "pending" or self._training():
            return self._full(*args, **kwargs)
        if self._trace is None:
            try:
                self._trace, out = traced(self.model, lambda: self._full(*args, **kwargs), grad=True)
            except Exception:  # noqa: BLE001 - the model raised (bad inputs?), or cannot be traced
                out = self._full(*args, **kwargs)  # the model's own error raises again here: still pending
                self.path = "full"  # it runs, but cannot be traced: the full path from now on
                return out
            self._skip = skip_plan(self._trace, self.dst_layer, after=self.src_layer)
            self._skipped_tree = [m for name in (*self._skip, self.dst_layer) for m in get_module(self.model, name).modules()]
            self._weights = self._weights_now()
        else:
            out = self._full(*args, **kwargs)
        if not self._skip:
            self.path = "full"
            return out
        if self._hooks_on_skipped():  # they would see zeros: checked again on a call without them
            return out
        self._check(out, args, kwargs)
        return out

    def _check(self, full: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Compare the fast path with the full path's output ``full`` on this call and record the
        verdict for its kind: one kind's disagreement (e.g. a returned KV cache, which lacks the
        skipped layers) leaves the others to be checked on their own."""
        shared = zeros_that_work(
            lambda shared: outputs_agree(self._skipping(shared, *args, **kwargs), full, every_part=True))
        if len(self._checked_calls) >= MAX_KINDS:  # bounded: a new shape or string per call would grow it
            self._checked_calls.clear()
        self._checked_calls[self._call_key(args, kwargs)] = (shared is not None, output_structure(full))
        if shared is not None and self.path != "fast":
            self.path, self._shared_zeros = "fast", shared
        elif self.path == "pending":
            self.path = "full"  # until a kind of call agrees
        self._checking = True

    def _training(self) -> bool:
        """Whether a module of the model is in training mode: dropout (also ``F.dropout`` in a
        module's code) draws random numbers and batch norm updates its running statistics on
        every pass, so such calls take the full path, once."""
        return any(module.training for module in self._model_modules())

    def _model_modules(self) -> list[nn.Module]:
        """The model's modules, listed once (:meth:`reset` forgets them)."""
        if self._modules_seen is None:
            self._modules_seen = list(self.model.modules())
        return self._modules_seen

    def _hooks_on_skipped(self) -> bool:
        """Whether a forward hook now sits on a skipped module, on ``dst`` or inside it (or on
        every module): the fast path would call it with zeros or not at all, so the call takes
        the full path."""
        if getattr(nn.modules.module, "_global_forward_hooks", None) or getattr(
                nn.modules.module, "_global_forward_pre_hooks", None):
            return True
        return any(not _inert(hook) for m in self._skipped_tree
                   for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))

    def _weights_now(self) -> tuple[Any, ...]:
        """The first weight's dtype and device, and sums of every parameter's in-place version
        counter and storage address (a replaced parameter, or ``p.data = t``, moves the latter):
        a change means the fast path must be checked again. Buffers are left out (some models
        rebuild one on every call, e.g. a rotary cache); inference tensors have no version."""
        first: torch.Tensor | None = None
        versions = addresses = 0
        for module in self._model_modules():
            for p in module._parameters.values():
                if p is None:
                    continue
                first = p if first is None else first
                if not p.is_inference():
                    versions += p._version
                addresses += p.data_ptr()
        if first is None:
            first = next(self.model.buffers(), None)
        return () if first is None else (first.dtype, first.device, versions, addresses)

    def _recheck_if_changed(self) -> None:
        """After ``model.double()`` / ``.to(device)`` the trace's shapes and dtypes are re-made
        (the next call calibrates again); after a weight update every kind of call is checked
        again. (Writes through ``.data`` in place move nothing it sees: call :meth:`reset`.)"""
        now = self._weights_now()
        if now == self._weights:
            return
        if self._weights is not None and now[:2] != self._weights[:2]:
            self.reset()  # (before any calibration there is nothing to forget)
        self._checked_calls.clear()
        self._weights = now

    def reset(self) -> None:
        """Forget every check: the next call in eval mode calibrates the fast path again (after
        changing the model in a way the wrapper cannot see: ``p.data.fill_(...)``, or a
        submodule replaced after the first call)."""
        self.path = "pending" if self._fast_allowed else "full"
        self._trace, self._skip, self._skipped_tree, self._modules_seen = None, [], [], None
        self._checking = False
        self._checked_calls.clear()

    @staticmethod
    def _call_key(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        """What makes two calls the same kind: argument names, flags' values (``aux=True``, a
        string or ``None`` can change what runs; numbers count by their type) and tensors' shapes
        after the batch, dtypes and devices."""
        def part(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return ("T", tuple(value.shape[1:]), value.dtype, value.device)
            if value is None or isinstance(value, (bool, str)):  # flags; numbers (a time step) by their type
                return value
            children = output_children(value)
            return (type(value).__name__, tuple((key, part(child)) for key, child in children)) if children else \
                type(value).__name__
        return tuple(part(a) for a in args), tuple((k, part(v)) for k, v in sorted(kwargs.items()))

    def _fast_or_full(self, *args: Any, **kwargs: Any) -> Any:
        """The fast path's output where it agreed with the full one on a call of this kind (see
        :meth:`_call_key`; a call whose output holds more, e.g. ``hidden_states``, is checked
        again); else, and in training mode or with hooks on skipped modules, the full path's.
        A kind of call seen first runs both paths: the full one's output is returned."""
        if self._training() or self._hooks_on_skipped():
            return self._full(*args, **kwargs)
        key = self._call_key(args, kwargs)
        verdict = self._checked_calls.get(key)
        if verdict is not None and verdict[0]:
            fast = self._fast(*args, **kwargs)
            if output_structure(fast) == verdict[1]:
                return fast
        elif verdict is not None:
            return self._full(*args, **kwargs)
        full = self._full(*args, **kwargs)
        self._check(full, args, kwargs)
        return full

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._fast_allowed:
            self._recheck_if_changed()
        if self.path == "fast" or self._checking:
            return self._fast_or_full(*args, **kwargs)
        if self.path == "pending":
            return self.calibrate(*args, **kwargs)
        return self._full(*args, **kwargs)

    @property
    def skipped_modules(self) -> list[str]:
        """The modules the fast path does not run (empty until calibrated, or on the full path)."""
        return list(self._skip) if self.path == "fast" else []

    def extra_repr(self) -> str:
        mode = "strict" if self.strict else "mixed (lossy layers keep the real forward's ignored part)"
        path: str = self.path
        if path == "fast" and self._training():
            path = "fast (full while a module trains)"
        elif path == "fast" and self._hooks_on_skipped():
            path = "fast (full while hooks sit on skipped modules)"
        elif path == "full" and self._checking:
            path = "full (the fast path disagreed on every kind of call checked so far)"
        return f"{self.src_layer!r} -> {self.dst_layer!r}, path={path}, {mode}"


Hook = Callable[[nn.Module, Any, Any], Any]
