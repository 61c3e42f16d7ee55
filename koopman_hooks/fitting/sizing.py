"""Sizes of a fit chosen from the data when the user does not set them.

- steps per segment: one K step per module the segment spans (the siblings of the later probed
  layer that run after the earlier one, e.g. ``blocks.1 .. blocks.4`` for ``blocks.0 -> blocks.4``);
- adapted width: enough principal components for ``variance`` of every layer, narrowed to the
  widest whose surrogate costs no more multiply-adds per sample than the modules it replaces
  (unless that is below 32: tiny layers keep their components and cost more than they replace);
- latent dimension: the adapted width (which holds the linear model) plus a lifting of a quarter
  of it, 8 to 64 coordinates;
- residual width: the widest (8 to 128) whose surrogate costs no more multiply-adds per sample
  than the modules it replaces (at least 16 when even that costs more);
- batch size: about 50 steps per epoch, 64 to 512 rows.

Multiply-adds are counted on one real sample by hooks on the leaf modules that do them
(``Linear``, convolutions, ``Bilinear``, HuggingFace's ``Conv1D``); matrix products outside such modules, e.g. attention
scores, are not counted, so the budget errs on the cheap side for token models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from koopman_hooks.core.batches import Inputs, call_model
from koopman_hooks.core.layers import unwrap_model
from koopman_hooks.core.skipping import Trace

MIN_HIDDEN = 16
MAX_HIDDEN = 128
MIN_WIDTH = 32  # below this the budget is not enforced: tiny layers need their few components
STEP_ROWS = 128  # the autoencoder's smallest batch when the data allow MIN_STEPS steps per epoch
MIN_STEPS = 25


@dataclass(frozen=True)
class Sizes:
    """What a fit used, and why (``notes``)."""

    width: int
    latent_dim: int
    hidden: tuple[int, ...]
    steps: tuple[int, ...]
    batch_size: int
    surrogate_macs: int
    replaced_macs: int | None
    notes: dict[str, str] = field(default_factory=dict)


def _leaf_macs(module: nn.Module, output: Any) -> int:
    if not isinstance(output, torch.Tensor):
        return 0
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, nn.Bilinear):
        return output.numel() * module.in1_features * module.in2_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return output.numel() * int(weight.shape[0])  # HuggingFace's Conv1D: a Linear with weight (in, out)
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = 1
        for k in module.kernel_size:
            kernel *= k
        return output.numel() * (module.in_channels // module.groups) * kernel
    return 0


def module_macs(model: nn.Module, inputs: Inputs) -> dict[str, int]:
    """Multiply-adds of every named leaf module during one forward pass on ``inputs``."""
    counts: dict[str, int] = {}
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def count(module: nn.Module, args: Any, output: Any) -> None:
            counts[name] = counts.get(name, 0) + _leaf_macs(module, output)

        return count

    try:
        for name, module in unwrap_model(model).named_modules():
            if name and not any(True for _ in module.children()):
                handles.append(module.register_forward_hook(hook(name)))
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def surrogate_macs(features_in: int, features_out: int, width: int, latent_dim: int, hidden: Sequence[int]) -> int:
    """Multiply-adds per sample of a surrogate: adapters, φ, K (its power applied once), ψ."""
    def skip_mlp(dims: Sequence[int]) -> int:
        linear = dims[0] * dims[-1]
        residual = sum(a * b for a, b in zip(dims[:-1], dims[1:])) if len(dims) > 2 else 0
        return linear + residual

    return (features_in * width + skip_mlp([width, *hidden, latent_dim]) + latent_dim**2
            + skip_mlp([latent_dim, *reversed(hidden), width]) + width * features_out)


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def steps_from_trace(layers: Sequence[str], trace: Trace) -> tuple[tuple[int, ...], str]:
    """One step per sibling module each segment spans (1 where the layers are not siblings)."""
    steps = []
    for src, dst in zip(layers[:-1], layers[1:]):
        parent = _parent(dst)
        if _parent(src) != parent or src not in trace.calls or dst not in trace.calls:
            steps.append(1)
            continue
        after, until = trace.calls[src][0][1], trace.calls[dst][0][1]
        siblings = [n for n, calls in trace.calls.items()
                    if _parent(n) == parent and n != src and all(after < s and e <= until for s, e in calls)]
        steps.append(max(1, len(siblings)))
    return tuple(steps), "one step per module between consecutive probed layers"


def width_for(variance_width: int, features_in: int, features_out: int, replaced_macs: int | None) -> tuple[int, str]:
    """The adapted width: ``variance_width`` (the components the variance asks for), narrowed to
    the widest whose surrogate (with the smallest residual) fits the replaced modules'
    multiply-adds; kept when only a width below ``MIN_WIDTH`` would fit (tiny layers)."""
    reason = "principal components for the variance"
    if replaced_macs is None or variance_width <= MIN_WIDTH:
        return variance_width, reason

    def cost(w: int) -> int:
        return surrogate_macs(features_in, features_out, w, latent_dim_for(w)[0], [MIN_HIDDEN])

    if cost(variance_width) <= replaced_macs:
        return variance_width, reason
    fitting = [w for w in range(MIN_WIDTH, variance_width) if cost(w) <= replaced_macs]
    if not fitting:
        return variance_width, (f"{reason}: even {MIN_WIDTH} would cost more than the {replaced_macs} multiply-adds "
                                "per sample of the replaced modules")
    return max(fitting), f"{variance_width} {reason}, narrowed to fit the {replaced_macs} multiply-adds per sample of the replaced modules"


def latent_dim_for(width: int) -> tuple[int, str]:
    extra = min(64, max(8, round(width / 4)))
    return width + extra, f"adapted width {width} plus a lifting of {extra}"


def hidden_for(features_in: int, features_out: int, width: int, latent_dim: int,
               replaced_macs: int | None) -> tuple[tuple[int, ...], str]:
    """One residual layer, as wide as the multiply-add budget of the replaced modules allows;
    ``MAX_HIDDEN`` wide when the budget is not enforced (tiny layers, as in :func:`width_for`,
    or replaced modules that cannot be measured)."""
    widest = MAX_HIDDEN
    if replaced_macs is None:
        return (widest,), f"replaced modules not measurable: {widest}"
    if width <= MIN_WIDTH:  # a few components: any surrogate costs more than a tiny layer, and all cost little
        return (widest,), f"adapted width {width} <= {MIN_WIDTH}: tiny layers are not held to the budget; {widest}"
    best = None
    for h in range(8, widest + 1, 8):
        if surrogate_macs(features_in, features_out, width, latent_dim, [h]) <= replaced_macs:
            best = h
    if best is None:
        return (MIN_HIDDEN,), (f"even the smallest residual ({MIN_HIDDEN}) costs more than the replaced modules "
                               f"({replaced_macs} multiply-adds per sample); using {MIN_HIDDEN}")
    return (best,), f"widest residual within the {replaced_macs} multiply-adds per sample of the replaced modules"


def batch_size_for(n: int) -> tuple[int, str]:
    """About 50 steps per epoch over ``n`` training rows, 64 to 512 rows a step; at least
    ``STEP_ROWS`` rows a step while that still leaves ``MIN_STEPS`` steps per epoch: below it a
    step's fixed cost (Python, autograd, the optimiser) outweighs its arithmetic, so more, smaller
    steps buy little fidelity for their time (BERT in the zoo, 3,600 rows: 0.999 agreement at 64
    rows a step, 0.994 at 128 in half the fit time)."""
    size = 2 ** round(math.log2(max(n / 50, 1)))
    size = min(512, max(64, size))
    if size < STEP_ROWS <= n // MIN_STEPS:
        return STEP_ROWS, f"{n // STEP_ROWS} steps per epoch over {n} samples (at least {STEP_ROWS} rows a step)"
    return size, f"about 50 steps per epoch over {n} samples"
