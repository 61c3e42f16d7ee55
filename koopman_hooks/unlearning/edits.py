"""Class unlearning by editing the surrogate's *linear* latent dynamics, never the model's weights.

The surrogate reads ``x_L ≈ ψ(E K^k φ(x_0))`` with ``K`` and ``E`` homogeneous ``(d+1, d+1)``
matrices acting on ``[z, 1]``. :func:`unlearn` streams a loader once, collects per-class
float64 moments of the latent start ``z_0 = φ(x_0)`` and endpoint ``z_k = K^k z_0`` (memory
``O(classes · d²)``), and returns a new surrogate whose ``E`` (``"endpoint"``, ``"leace"``) or
``K`` (``"per_step"``) is edited in closed form so that the forgotten classes' latent
distribution lands on a retained class. ``probe.patch(edited)`` then gives the unlearned model.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from koopman_hooks.hooks import OutputSelector, preserved_state
from koopman_hooks.stats import StreamingMoments
from koopman_hooks.surrogate import KoopmanSurrogate

METHODS = ("endpoint", "per_step", "leace")
LABEL_SOURCES = ("loader", "model")


# --------------------------------------------------------------------------- statistics


@dataclass
class LatentClassStatistics:
    """Per-class streamed moments of the latent start (``z_0``) and endpoint (``z_k``).

    ``n_outputs`` is the width of the model's output (the number of classes it scores), or
    ``None`` when the output is not a ``(batch, classes)`` tensor.
    """

    latent_dim: int
    start: dict[int, StreamingMoments] = field(default_factory=dict)
    end: dict[int, StreamingMoments] = field(default_factory=dict)
    n_outputs: int | None = None
    seconds: float = 0.0

    @property
    def classes(self) -> list[int]:
        return sorted(self.end)

    def counts(self) -> dict[int, int]:
        return {c: self.end[c].n for c in self.classes}

    def update(self, labels: torch.Tensor, z0: torch.Tensor, zk: torch.Tensor) -> None:
        labels = labels.reshape(-1).long().cpu()
        if len(labels) != len(z0):
            raise ValueError(f"got {len(labels)} labels for a batch of {len(z0)} samples")
        for c in labels.unique().tolist():
            mask = (labels == c).to(z0.device)
            if c not in self.end:
                self.start[c] = StreamingMoments(self.latent_dim)
                self.end[c] = StreamingMoments(self.latent_dim)
            self.start[c].update(z0[mask])
            self.end[c].update(zk[mask])

    def pooled(self, classes: Iterable[int], where: str = "end") -> tuple[int, torch.Tensor, torch.Tensor]:
        """``(n, mean, population covariance)`` of the union of ``classes``."""
        moments = [(self.end if where == "end" else self.start)[c] for c in classes]
        n = sum(m.n for m in moments)
        mean = sum(m.n * m.mean_x for m in moments) / n
        cov = sum(m.n * (m.cov_xx + torch.outer(m.mean_x - mean, m.mean_x - mean)) for m in moments) / n
        return n, mean, cov


def _class_of(logits: Any) -> torch.Tensor:
    return OutputSelector(None, "model output").get(logits)


@torch.no_grad()
def latent_statistics(
    probe: Any, loader: Iterable, labels: str = "loader", surrogate: KoopmanSurrogate | None = None
) -> LatentClassStatistics:
    """Stream ``loader`` once through ``probe``'s hooks; per-class moments of ``z_0`` and ``z_k``.

    ``labels="loader"`` groups samples by the loader's labels, ``"model"`` by the model's own
    predictions (the argmax of its output). The model runs in eval mode without gradients;
    its train/eval flags are restored afterwards. The first batch always runs the full model
    (to read the number of output classes); with loader labels the others stop after the
    last probed layer.
    """
    if labels not in LABEL_SOURCES:
        raise ValueError(f"labels must be one of {LABEL_SOURCES}, got {labels!r}")
    start = time.perf_counter()
    surrogate = surrogate if surrogate is not None else probe.surrogate()
    device = surrogate.operator.device
    stats = LatentClassStatistics(surrogate.latent_dim)
    power = torch.linalg.matrix_power(surrogate.operator.double(), surrogate.steps)
    with preserved_state(probe.model):
        for i, batch in enumerate(loader):
            captured = probe._forward(batch, stop_early=labels == "loader" and i > 0)
            if captured.output is not None and i == 0:
                logits = _class_of(captured.output)
                stats.n_outputs = int(logits.shape[-1]) if logits.dim() == 2 else None
            if labels == "model":
                y = _class_of(captured.output).argmax(dim=-1)
            else:
                if captured.labels is None:
                    raise ValueError('labels="loader" needs labelled batches; pass labels="model" to use predictions')
                y = torch.as_tensor(captured.labels)
                if y.dim() != 1 or y.dtype.is_floating_point:
                    raise ValueError(f"expected integer class labels of shape (batch,), got {tuple(y.shape)} {y.dtype}")
            x0 = captured.activations[surrogate.src_layer].to(device, torch.float32)
            z0 = surrogate.encode(x0).double()
            zk = _apply(power, z0)
            stats.update(y, z0, zk)
    if not stats.end:
        raise ValueError("the loader yielded no batches")
    stats.seconds = time.perf_counter() - start
    return stats


def _apply(h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Rows ``z`` through the homogeneous map ``h``."""
    zh = torch.cat([z, torch.ones_like(z[:, :1])], dim=1) @ h.T.to(z)
    return zh[:, :-1] / zh[:, -1:]
