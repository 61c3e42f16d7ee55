"""What the model's head reads of a token layer, found by perturbing one real batch.

:func:`head_reduce` adds noise to chosen token positions of a ``(B, N, D)`` layer output (all
rows at once, each row its own position) and sees whether the model's output moves:

- only position 0 reaches the output -> ``"cls"`` (a BERT pooler, a ViT with a class token);
- only each row's last real token (by the attention mask) -> ``"last"`` (GPT-style classifiers);
- every real token, equally: moving one real token up and another down by the same amount
  leaves the output alone -> ``"mean"`` (mean pooling);
- anything else (later layers attend to every token, padding reaches the output, ...) -> no
  token reduction: the layer is taken whole (``"flatten"``) when small enough.

:func:`ignored_part_reaches_output` checks a lossy reduction afterwards: the layer's output
with what the reduction ignores replaced by its training mean must give the model's outputs.
:func:`output_reads` checks that the output reads the probed tensor at all (a head that reads
another element of the layer's output, e.g. a GRU's ``h_n`` where the probe takes its
sequence, would leave a patched model's output exactly the model's, and an edit without effect).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from koopman_hooks.core.batches import Inputs, call_model
from koopman_hooks.core.hooks import hooked
from koopman_hooks.core.select import MODEL_OUTPUT, OutputSelector
from koopman_hooks.errors import LayerError
from koopman_hooks.koopman.adapters import LayerAdapter
from koopman_hooks.koopman.reduce import last_positions

OTHER_PROBES = 3  # random "other" real positions tested per row
RELATIVE_TOLERANCE = 1e-4  # output changes below this (relative to the output's scale) are float noise


@dataclass(frozen=True)
class HeadReading:
    """The token reduction that follows the head (``None``: none does) and why."""

    reduce: str | None
    reason: str


def _scores(output: Any) -> torch.Tensor:
    scores = MODEL_OUTPUT.get(output).detach().float()
    return scores.reshape(len(scores), -1)


def _runner(model: nn.Module, layer: str, selector: OutputSelector, inputs: Inputs) -> Callable[[torch.Tensor], torch.Tensor]:
    """``run(delta)``: the model's scores with ``delta`` added to ``layer``'s selected output."""

    def run(delta: torch.Tensor) -> torch.Tensor:
        def add(module: nn.Module, args: Any, output: Any) -> Any:
            value = selector.get(output)
            return selector.replace(output, value + delta.to(dtype=value.dtype, device=value.device))

        with torch.no_grad(), hooked(model, {layer: add}, prepend=True):
            return _scores(call_model(model, inputs))

    return run


def _pick(valid: torch.Tensor, exclude: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row a random position where ``valid & ~exclude`` (and whether the row has one)."""
    allowed = valid & ~exclude
    weights = allowed.float() + 1e-12 * (~allowed.any(1, keepdim=True)).float()
    return torch.multinomial(weights, 1, generator=generator).squeeze(1), allowed.any(1)


def head_reduce(model: nn.Module, layer: str, selector: OutputSelector, inputs: Inputs, activation: torch.Tensor,
                mask: torch.Tensor | None, seed: int = 0) -> HeadReading:
    """The token reduction that reads what ``model``'s output reads of ``layer`` (see the module
    docstring), from ``inputs`` (a few real rows) whose ``layer`` output is ``activation``.

    The model runs a handful of times on these rows under ``no_grad``; its modes are the
    caller's business. ``mask`` is the inputs' ``(B, N)`` attention mask, or ``None``.
    """
    if activation.ndim != 3:
        return HeadReading(None, f"{layer!r} is not a (batch, tokens, features) layer")
    batch, tokens, _ = activation.shape
    aligned = mask is None or tuple(mask.shape) == (batch, tokens)
    valid = (mask.to(activation.device) != 0) if (mask is not None and aligned) else torch.ones(
        batch, tokens, dtype=torch.bool, device=activation.device)
    if tokens < 2 or not valid.any(1).all():
        return HeadReading(None, "too few tokens to tell which positions the head reads")
    generator = torch.Generator().manual_seed(seed)
    scale = float(activation[valid].float().std()) or 1.0
    noise = torch.randn(batch, activation.shape[2], generator=generator).to(activation.device) * scale
    run = _runner(model, layer, selector, inputs)
    reference = run(torch.zeros_like(activation))
    tolerance = RELATIVE_TOLERANCE * (1.0 + float(reference.abs().max()))
    rows = torch.arange(batch, device=activation.device)

    def moved(*changes: tuple[torch.Tensor, float]) -> torch.Tensor:
        delta = torch.zeros_like(activation)
        for positions, sign in changes:
            delta[rows, positions] += sign * noise.to(delta.dtype)
        return (run(delta) - reference).abs().amax(1) > tolerance

    first = torch.zeros(batch, dtype=torch.long, device=activation.device)
    last = last_positions(valid, batch, tokens, activation.device)
    ends = torch.zeros_like(valid)
    ends[rows, first], ends[rows, last] = True, True
    reads_first, reads_last = moved((first, 1.0)), moved((last, 1.0))
    distinct = last != first  # rows where "first" and "last" are different tokens
    others, reads_other = [], []
    for _ in range(OTHER_PROBES):
        position, has = _pick(valid, ends, generator)
        others.append(has)
        reads_other.append(moved((position, 1.0)) & has)
    any_other = torch.stack(reads_other).any(0)
    has_other = torch.stack(others).any(0)
    pad, has_pad = _pick(~valid, torch.zeros_like(valid), generator)
    reads_pad = moved((pad, 1.0)) & has_pad
    if bool(reads_pad.any()):
        return HeadReading(None, f"padding tokens of {layer!r} reach the output")
    if not bool(distinct.any()):  # e.g. one-token rows: token 0 is every row's last real token too
        return HeadReading(None, f"every row's first token of {layer!r} is its last real one: these rows cannot tell "
                                 "which position the head reads")
    if bool(reads_first.all()) and not bool((reads_last & distinct).any()) and not bool(any_other.any()):
        return HeadReading("cls", f"only token 0 of {layer!r} reaches the output")
    if aligned and bool(reads_last.all()) and not bool((reads_first & distinct).any()) and not bool(any_other.any()):
        return HeadReading("last", f"only the last real token of {layer!r} reaches the output")
    every = bool(reads_first.all()) and bool(reads_last.all()) and bool((any_other | ~has_other).all())
    if aligned and every:
        second, has_second = _pick(valid, torch.nn.functional.one_hot(last, tokens).bool(), generator)
        zero_sum = moved((last, 1.0), (second, -1.0)) & has_second
        if not bool(zero_sum.any()):
            return HeadReading("mean", f"the output reads the mean of the real tokens of {layer!r}")
    return HeadReading(None, f"tokens of {layer!r} other than one position or their mean reach the output")


@torch.no_grad()
def template_outputs(model: nn.Module, layer: str, selector: OutputSelector, adapter: LayerAdapter, inputs: Inputs,
                     mask: torch.Tensor | None) -> Any:
    """The model's output with ``layer``'s output replaced by ``adapter.with_template`` of it."""

    def fill(module: nn.Module, args: Any, output: Any) -> Any:
        value = selector.get(output)
        return selector.replace(output, adapter.with_template(value, mask).to(dtype=value.dtype, device=value.device))

    with hooked(model, {layer: fill}, prepend=True):
        return call_model(model, inputs)


def outputs_differ(a: Any, b: Any) -> torch.Tensor:
    """Per row: whether two model outputs' scores differ by more than float noise."""
    x, y = _scores(a), _scores(b)
    tolerance = RELATIVE_TOLERANCE * (1.0 + float(y.abs().max()))
    return (x - y).abs().amax(1) > tolerance


def ignored_part_reaches_output(model: nn.Module, layer: str, selector: OutputSelector, adapter: LayerAdapter,
                                inputs: Inputs, mask: torch.Tensor | None) -> bool | None:
    """Whether what ``adapter``'s lossy reduction ignores at ``layer`` reaches the model's output on
    these inputs: replaced by its training mean, do the outputs change? ``None`` for an exact
    reduction."""
    if not adapter.lossy or adapter.template is None:
        return None
    with torch.no_grad():
        reference = call_model(model, inputs)
    return bool(outputs_differ(template_outputs(model, layer, selector, adapter, inputs, mask), reference).any())


def output_reads(model: nn.Module, layer: str, selector: OutputSelector, inputs: Inputs, activation: torch.Tensor,
                 seed: int = 0) -> bool | None:
    """Whether the model's scores on ``inputs`` move when noise as large as the spread of
    ``activation`` (``layer``'s selected output on them) is added to it; ``None`` where it cannot
    be told: the selection cannot be written back (a callable ``select``), is not floating
    point, or the output holds no scores."""
    if not selector.writable or not activation.is_floating_point():
        return None
    generator = torch.Generator().manual_seed(seed)
    scale = float(activation.float().std()) if activation.numel() > 1 else 0.0
    noise = torch.randn(activation.shape, generator=generator).to(activation.device) * (scale or 1.0)
    try:
        run = _runner(model, layer, selector, inputs)
        reference = run(torch.zeros_like(activation))
        moved = run(noise)
    except LayerError:  # the output holds no scores to compare
        return None
    tolerance = RELATIVE_TOLERANCE * (1.0 + float(reference.abs().max()))
    return bool(((moved - reference).abs() > tolerance).any())
