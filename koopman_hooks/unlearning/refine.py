"""Refine a readout edit on the model's own outputs, still as one affine latent map.

The least-squares redirect (:func:`~koopman_hooks.unlearning.edits.redirect_map`) moves
latent *moments*: where one affine map cannot both collapse a forgotten class onto another
class's mean and hold every retained class in place, some forgotten samples keep their class
after decoding. :func:`refine_readout` starts from that redirect and minimises what the edit
is for, the cross-entropy of the patched model's outputs, on a bounded seeded sample of the
data: forgotten samples towards their runner-up retained class, retained samples towards the
model's own prediction, with a proximal pull to the starting map. Only the ``d × (d+1)``
readout is optimised (L-BFGS); the model and the autoencoder are only read, and the result
is still one homogeneous affine map of the latent state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from koopman_hooks.batches import call_model
from koopman_hooks.hooks import OutputSelector, frozen_parameters, preserved_state


@dataclass
class SampleReservoir:
    """A seeded uniform sample of at most ``size`` rows of a stream of batches.

    Keeps model ``inputs`` (tensors), class ``labels``, runner-up ``keys`` and the model's
    ``predictions`` (``-1`` when unknown). Memory: ``size`` rows, whatever the stream length.
    """

    size: int
    seed: int = 0
    inputs: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    predictions: torch.Tensor | None = None
    _priority: torch.Tensor | None = field(default=None, repr=False)
    _generator: torch.Generator | None = field(default=None, repr=False)

    def update(self, inputs: Any, labels: torch.Tensor, keys: torch.Tensor, predictions: torch.Tensor | None) -> None:
        """Fold in a batch; rows survive with equal probability (smallest random priorities)."""
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(
                f"refinement samples model inputs, which must be one tensor per batch, got {type(inputs).__name__}; "
                "pass refine=0 to skip the refinement"
            )
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        n = len(labels)
        preds = predictions if predictions is not None else torch.full((n,), -1, dtype=torch.long)
        batch = [inputs.detach().cpu(), labels.reshape(-1).long().cpu(), keys.reshape(-1).long().cpu(),
                 preds.reshape(-1).long().cpu(), torch.rand(n, generator=self._generator)]
        if self.inputs is None:
            kept = batch
        else:
            assert self.labels is not None and self.keys is not None and self.predictions is not None
            kept = [torch.cat([old, new]) for old, new in
                    zip((self.inputs, self.labels, self.keys, self.predictions, self._priority), batch)]
        if len(kept[-1]) > self.size:
            rows = torch.topk(kept[-1], self.size, largest=False).indices.sort().values
            kept = [t[rows] for t in kept]
        self.inputs, self.labels, self.keys, self.predictions, self._priority = kept

    def __len__(self) -> int:
        return 0 if self.labels is None else len(self.labels)


def refinement_targets(reservoir: SampleReservoir, forget: list[int], retained: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Target class per row (runner-up retained class if forgotten, else the model's prediction,
    else the label) and whether the row is forgotten. Rows without a usable target get ``-1``."""
    assert reservoir.labels is not None and reservoir.keys is not None and reservoir.predictions is not None
    forgotten = torch.isin(reservoir.labels, torch.tensor(forget))
    own = torch.where(reservoir.predictions >= 0, reservoir.predictions, reservoir.labels)
    target = torch.where(forgotten, reservoir.keys, own)
    usable = torch.isin(target, torch.tensor(retained))
    return torch.where(usable, target, torch.full_like(target, -1)), forgotten


def refine_readout(
    probe: Any,
    surrogate: Any,
    readout: torch.Tensor,
    reservoir: SampleReservoir,
    forget: list[int],
    retained: list[int],
    iterations: int = 20,
    proximal: float = 1e-2,
    retain_weight: float = 0.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Minimise the patched model's cross-entropy over ``readout``'s top ``d`` rows, from ``readout``.

    The forgotten and the retained rows' mean losses are weighted ``1 - retain_weight`` and
    ``retain_weight``. Returns the refined homogeneous ``(d+1, d+1)`` readout and the loss
    before and after.
    """
    targets, forgotten = refinement_targets(reservoir, forget, retained)
    keep = targets >= 0
    if not keep.any() or not forgotten[keep].any():
        return readout, {"refine_loss_before": float("nan"), "refine_loss_after": float("nan")}
    device = surrogate.operator.device
    inputs = reservoir.inputs[keep].to(device)  # type: ignore[index]
    targets, forgotten = targets[keep].to(device), forgotten[keep].to(device)
    start = readout.float().to(device)
    d = start.shape[0] - 1
    top = start[:d].clone().requires_grad_(True)
    scale = float(start[:d].pow(2).sum().clamp_min(1e-12))
    editable = surrogate.edited()
    patched = probe.patch(editable)
    select = OutputSelector(None, "model output")
    weights = torch.where(forgotten, (1.0 - retain_weight) / forgotten.sum(), retain_weight / (~forgotten).sum().clamp_min(1))

    def loss_fn() -> torch.Tensor:
        editable.readout = torch.cat([top, start[d:]])  # differentiable buffer: gradients reach `top` only
        logits = select.get(call_model(patched, inputs)).float()
        ce = F.cross_entropy(logits, targets, reduction="none")
        return (weights * ce).sum() + proximal * (top - start[:d]).pow(2).sum() / scale

    optimiser = torch.optim.LBFGS([top], max_iter=int(iterations), line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = loss_fn()
        (grad,) = torch.autograd.grad(loss, [top])  # only the readout: the model never gets a .grad
        top.grad = grad
        return loss

    with preserved_state(probe.model), frozen_parameters(probe.model):
        with torch.no_grad():
            before = float(loss_fn())
        optimiser.step(closure)
        with torch.no_grad():
            after = float(loss_fn())
    out = readout.clone()
    out[:d] = top.detach().to(out)
    return out, {"refine_loss_before": before, "refine_loss_after": after}
