"""Refine a readout edit on the model's own outputs, still as one affine latent map.

The least-squares redirect (:func:`~koopman_hooks.unlearning.redirect.redirect_map`) moves
latent *moments*: where one affine map cannot both collapse a forgotten class onto another
class's mean and hold every retained class in place, some forgotten samples keep their class
after decoding. :func:`refine_readout` starts from that redirect and minimises what the edit
is for, the cross-entropy of the patched model's outputs, on a bounded seeded sample of the
data: forgotten samples towards their runner-up retained class, retained samples towards the
model's best-ranked retained class (its own prediction, unless that is a forgotten class), with
a proximal pull to the starting map. Only the ``d × (d+1)`` readout is optimised (L-BFGS); the
model and the autoencoder are only read, and the result is still one homogeneous affine map of
the latent state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from koopman_hooks.core.batches import Inputs, batch_size_of, move_inputs, select_rows
from koopman_hooks.core.hooks import frozen_parameters, preserved_state
from koopman_hooks.core.select import MODEL_OUTPUT
from koopman_hooks.koopman.surrogate import KoopmanSurrogate


def _cat(parts: Sequence[Inputs]) -> Inputs:
    """Concatenate batches of inputs; dict entries of different lengths (dynamic padding) are
    right-padded with zeros (an attention mask of 0 hides the padding)."""
    if len({isinstance(p, torch.Tensor) for p in parts}) > 1:
        raise TypeError("the batches mix tensor inputs and dict inputs; give the model one kind of batch")
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(list(parts))  # type: ignore[arg-type]
    out: dict[str, Any] = {}
    for key, value in parts[0].items():
        if not isinstance(value, torch.Tensor):
            out[key] = value
            continue
        tensors = [p[key] for p in parts]  # type: ignore[index]
        if value.ndim > 1:
            length = max(t.shape[1] for t in tensors)
            tensors = [F.pad(t, (0, 0) * (t.ndim - 2) + (0, length - t.shape[1])) for t in tensors]
        out[key] = torch.cat(tensors)
    return out


@dataclass
class SampleReservoir:
    """A seeded uniform sample of at most ``size`` rows of a stream of batches.

    Keeps model ``inputs`` (a tensor or a dict of tensors), the source layer's adapted
    ``states`` (when given), class ``labels``, runner-up ``keys`` and the model's ``predictions``:
    its classes best first, ``(n, k)`` (given as ``(n,)``: the top class only; ``-1`` when unknown).
    Memory: ``size`` rows, whatever the stream length. Rows survive with equal probability
    (smallest random priorities), so :meth:`merge` of two reservoirs is a uniform sample of the union.
    """

    size: int
    seed: int = 0
    inputs: Inputs | None = None
    states: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    priority: torch.Tensor | None = field(default=None, repr=False)
    _generator: torch.Generator | None = field(default=None, repr=False)

    def update(self, inputs: Inputs, labels: torch.Tensor, keys: torch.Tensor, predictions: torch.Tensor | None,
               states: torch.Tensor | None = None) -> SampleReservoir:
        """Fold in a batch of rows."""
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        n = len(labels)
        if batch_size_of(inputs) != n:
            raise ValueError(f"got {batch_size_of(inputs)} input rows for {n} labels")
        preds = predictions if predictions is not None else torch.full((n,), -1, dtype=torch.long)
        batch = SampleReservoir(self.size, self.seed, move_inputs(_detached(inputs), "cpu"),
                                None if states is None else states.detach().float().cpu(), labels.reshape(-1).long().cpu(),
                                keys.reshape(-1).long().cpu(), preds.reshape(n, -1).long().cpu(),
                                torch.rand(n, generator=self._generator))
        return self.merge(batch)

    def merge(self, other: SampleReservoir) -> SampleReservoir:
        """Keep the ``size`` rows of smallest priority among both reservoirs; returns ``self``."""
        if other.labels is None:
            return self
        if self.labels is None:
            self.inputs, self.states, self.labels, self.keys = other.inputs, other.states, other.labels, other.keys
            self.predictions, self.priority = other.predictions, other.priority
        else:
            assert self.inputs is not None and other.inputs is not None
            self.inputs = _cat([self.inputs, other.inputs])
            both = self.states is not None and other.states is not None
            self.states = torch.cat([self.states, other.states]) if both else None  # type: ignore[list-item]
            self.labels = torch.cat([self.labels, other.labels])
            self.keys = torch.cat([self.keys, other.keys])  # type: ignore[list-item]
            self.predictions = _cat_ranked(self.predictions, other.predictions)  # type: ignore[arg-type]
            self.priority = torch.cat([self.priority, other.priority])  # type: ignore[list-item]
        assert self.priority is not None
        if len(self.priority) > self.size:
            rows = torch.topk(self.priority, self.size, largest=False).indices.sort().values
            self.inputs = select_rows(self.inputs, rows)  # type: ignore[arg-type]
            self.states = None if self.states is None else self.states[rows]
            self.labels, self.keys = self.labels[rows], self.keys[rows]  # type: ignore[index]
            self.predictions, self.priority = self.predictions[rows], self.priority[rows]  # type: ignore[index]
        return self

    def __len__(self) -> int:
        return 0 if self.labels is None else len(self.labels)


class _KnownCodes(nn.Module):
    """The surrogate's encoder, answering from a table for the one tensor whose codes are known:
    the refinement only moves the readout, so the sampled rows' codes never change."""

    def __init__(self, encoder: nn.Module, states: torch.Tensor, codes: torch.Tensor) -> None:
        super().__init__()
        self.encoder, self.states, self.codes = encoder, states, codes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.codes if x is self.states else self.encoder(x)


def _cat_ranked(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Stack two ``(n, k)`` rankings of classes, the shorter padded with ``-1`` (unranked)."""
    width = max(a.shape[1], b.shape[1])
    return torch.cat([F.pad(t, (0, width - t.shape[1]), value=-1) for t in (a, b)])


def _detached(inputs: Inputs) -> Inputs:
    if isinstance(inputs, torch.Tensor):
        return inputs.detach()
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def refinement_targets(reservoir: SampleReservoir, forget: list[int], retained: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Target class per row and whether the row is forgotten. A forgotten row's target is its
    runner-up retained class; a retained row's is the model's best-ranked retained class (what
    the model says once the forgotten classes are gone: its prediction, or for a row it gives
    to a forgotten class, the next retained class), else its label when the model's ranking is
    unknown. Rows without a usable target get ``-1``."""
    assert reservoir.labels is not None and reservoir.keys is not None and reservoir.predictions is not None
    forgotten = torch.isin(reservoir.labels, torch.tensor(forget))
    ranked = reservoir.predictions
    allowed = torch.isin(ranked, torch.tensor(retained))
    best = ranked.gather(1, allowed.long().argmax(1, keepdim=True)).squeeze(1)  # the first retained class
    unknown = ranked[:, 0] < 0
    own = torch.where(unknown, reservoir.labels, torch.where(allowed.any(1), best, torch.full_like(best, -1)))
    target = torch.where(forgotten, reservoir.keys, own)
    usable = torch.isin(target, torch.tensor(retained))
    return torch.where(usable, target, torch.full_like(target, -1)), forgotten


def refinement_rows(reservoir: SampleReservoir, forget: list[int], retained: list[int], rows: int,
                    retain_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the reservoir's rows the refinement fits on, and each row's loss weight.

    At most ``rows`` rows, drawn (seeded) from three strata of the usable rows: forgotten rows
    (up to a quarter), retained rows whose runner-up class is forgotten (up to half the rest:
    the rows an edit can flip) and the other retained rows. The forgotten rows share
    ``1 - retain_weight`` equally; each retained stratum shares ``retain_weight`` in proportion
    to its size in the reservoir, so the loss is the reservoir's, estimated with more rows
    where an edit can cost accuracy. A reservoir of at most ``rows`` usable rows is used whole,
    every forgotten and every retained row then weighing the same.
    """
    targets, forgotten = refinement_targets(reservoir, forget, retained)
    assert reservoir.keys is not None
    usable = targets >= 0
    at_risk = usable & ~forgotten & torch.isin(reservoir.keys, torch.tensor(forget))
    strata = [usable & forgotten, at_risk, usable & ~forgotten & ~at_risk]
    sizes = [int(s.sum()) for s in strata]
    take = [min(sizes[0], rows // 4)]
    take.append(min(sizes[1], (rows - take[0]) // 2))
    take.append(min(sizes[2], rows - take[0] - take[1]))
    for i in (1, 0):  # rows a stratum leaves unused go to the others
        take[i] = min(sizes[i], take[i] + rows - sum(take))
    generator = torch.Generator().manual_seed(reservoir.seed)
    chosen, weights = [], []
    n_retained = max(sizes[1] + sizes[2], 1)
    shares = [1.0 - retain_weight, retain_weight * sizes[1] / n_retained, retain_weight * sizes[2] / n_retained]
    for stratum, size, n, share in zip(strata, sizes, take, shares):
        if n:
            members = stratum.nonzero().squeeze(1)
            chosen.append(members[torch.randperm(size, generator=generator)[:n]])
            weights.append(torch.full((n,), share / n))
    order = torch.cat(chosen).sort()
    return order.values, torch.cat(weights)[order.indices]


Outputs = Callable[[KoopmanSurrogate, Inputs, torch.Tensor | None], Any]


def refine_readout(
    outputs: Outputs,
    model: nn.Module,
    surrogate: KoopmanSurrogate,
    readout: torch.Tensor,
    reservoir: SampleReservoir,
    forget: list[int],
    retained: list[int],
    iterations: int = 20,
    proximal: float = 1e-2,
    retain_weight: float = 0.5,
    sample_rows: int = 0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Minimise the patched model's cross-entropy over ``readout``'s top ``d`` rows, from ``readout``.

    ``outputs(surrogate, inputs, states)`` must return the patched model's output for the
    sampled rows (``states``: their source-layer adapted states, when kept; a caller that can
    run the model's tail on its own needs nothing else). It fits on ``sample_rows`` rows of the
    reservoir (all when 0), chosen and weighted by :func:`refinement_rows`: the forgotten and
    the retained rows' losses weigh ``1 - retain_weight`` and ``retain_weight``. Returns the refined
    homogeneous ``(d+1, d+1)`` readout and the loss before and after.
    """
    targets, forgotten = refinement_targets(reservoir, forget, retained)
    if not (forgotten & (targets >= 0)).any():
        return readout, {"refine_loss_before": float("nan"), "refine_loss_after": float("nan")}
    rows, weights = refinement_rows(reservoir, forget, retained, sample_rows or len(reservoir), retain_weight)
    device = surrogate.operator.device
    assert reservoir.inputs is not None
    inputs = move_inputs(select_rows(reservoir.inputs, rows), device)
    states = None if reservoir.states is None else reservoir.states[rows].to(device)
    targets, weights = targets[rows].to(device), weights.to(device)
    start = readout.float().to(device)
    d = start.shape[0] - 1
    top = start[:d].clone().requires_grad_(True)
    scale = float(start[:d].pow(2).sum().clamp_min(1e-12))
    editable = surrogate.edited()
    if states is not None:
        with torch.no_grad():
            editable.encoder = _KnownCodes(editable.encoder, states, editable.encoder(states))

    def loss_fn() -> torch.Tensor:
        editable.readout = torch.cat([top, start[d:]])  # differentiable buffer: gradients reach `top` only
        logits = MODEL_OUTPUT.get(outputs(editable, inputs, states)).float()
        ce = F.cross_entropy(logits, targets, reduction="none")
        return (weights * ce).sum() + proximal * (top - start[:d]).pow(2).sum() / scale

    optimiser = torch.optim.LBFGS([top], max_iter=int(iterations), line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = loss_fn()
        (grad,) = torch.autograd.grad(loss, [top])  # only the readout: the model never gets a .grad
        top.grad = grad
        return loss

    with preserved_state(model), frozen_parameters(model):
        with torch.no_grad():
            before = float(loss_fn())
        optimiser.step(closure)
        with torch.no_grad():
            after = float(loss_fn())
    out = readout.clone()
    out[:d] = top.detach().to(out)
    return out, {"refine_loss_before": before, "refine_loss_after": after}
