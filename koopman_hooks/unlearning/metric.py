"""The decoder's pull-back metric ``Σ J(z)ᵀ J(z)`` per group of rows, exact where the decoder allows.

The autoencoder's decoder is a linear map ``L`` plus (by default) one hidden GELU layer,
``ψ(z) = L z + W₂ gelu(W₁ z + b₁) + b₂``, whose Jacobian is ``J(z) = L + W₂ diag(g) W₁`` with
``g = gelu'(W₁ z + b₁)``. Summed over a group's ``n`` rows,

    Σ JᵀJ = n LᵀL + C + Cᵀ + W₁ᵀ ((W₂ᵀW₂) ∘ Σ g gᵀ) W₁,   C = Lᵀ W₂ diag(Σ g) W₁,

so streaming ``Σ g`` and ``Σ g gᵀ`` (``h²`` products per row, ``h`` hidden units) gives the
metric of *every* row; the ``d x d`` matrices are formed once per group at the end (or, when
``h > d``, per batch, so that a group holds ``d²`` numbers, never ``h²``). Any other decoder falls
back to the autograd Jacobians of a seeded sample of rows per batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from koopman_hooks.koopman.autoencoder import SkipMLP

Group = tuple[int, int]


def decoder_jacobian(decoder: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians of the decoder at rows ``z``: ``(b, out, d)`` float64 (autograd)."""
    z = z.detach().float()

    def one(v: torch.Tensor) -> torch.Tensor:
        return decoder(v.unsqueeze(0)).squeeze(0)

    with torch.enable_grad():
        jac = torch.func.vmap(torch.func.jacrev(one))(z)
    return jac.reshape(len(z), -1, z.shape[1]).double()


def _closed_form_parts(decoder: nn.Module) -> tuple[torch.Tensor, nn.Linear | None, nn.Linear | None] | None:
    """``(L, first, second)`` when the Jacobian has the closed form above (``first`` and
    ``second`` are ``None`` without a residual), else ``None``."""
    if not isinstance(decoder, SkipMLP):
        return None
    weight = decoder.linear.weight.detach().double()
    if decoder.residual is None:
        return weight, None, None
    parts = list(decoder.residual.children()) if isinstance(decoder.residual, nn.Sequential) else []
    if (len(parts) == 3 and isinstance(parts[0], nn.Linear) and isinstance(parts[2], nn.Linear)
            and type(parts[1]) is nn.GELU and parts[1].approximate == "none"):
        return weight, parts[0], parts[2]
    return None


def _gelu_slope(u: torch.Tensor) -> torch.Tensor:
    """``d/du [u Φ(u)] = Φ(u) + u φ(u)`` (the exact GELU's derivative)."""
    return torch.special.ndtr(u) + u * torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)


class PullbackMetric:
    """Streams ``Σ J(z)ᵀ J(z)`` of a decoder per group: exactly over every row for the
    autoencoder's decoder (``exact``), else over ``sample_rows`` seeded rows of each batch."""

    def __init__(self, decoder: nn.Module, sample_rows: int, generator: torch.Generator) -> None:
        self.decoder, self.sample_rows, self.generator = decoder, int(sample_rows), generator
        self._parts = _closed_form_parts(decoder)
        first = None if self._parts is None else self._parts[1]
        # exact: n, Σ g, Σ g gᵀ per group -- folded into Σ JᵀJ per batch where h² > d² numbers
        self._fold = first is not None and first.out_features > first.in_features
        self._terms: tuple[torch.Tensor, ...] = ()  # LᵀL, and LᵀW₂, W₁, W₂ᵀW₂ with a hidden layer (float64, CPU)
        if self._parts is not None:
            linear, first, second = self._parts
            self._terms = (linear.T @ linear,)
            if first is not None and second is not None:
                w1, w2 = first.weight.detach().double().cpu(), second.weight.detach().double().cpu()
                self._terms += (linear.T @ w2, w1, w2.T @ w2)
        self.sums: dict[Group, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self.sampled: dict[Group, tuple[int, torch.Tensor]] = {}  # folded or sampled: rows, Σ JᵀJ over them

    @property
    def exact(self) -> bool:
        return self._parts is not None

    def update(self, labels: torch.Tensor, keys: torch.Tensor, z: torch.Tensor) -> PullbackMetric:
        """Fold in a batch: each row's group ``(labels[i], keys[i])`` and latent ``z[i]``."""
        labels, keys = labels.reshape(-1).long().cpu(), keys.reshape(-1).long().cpu()
        if self._parts is not None:
            _, first, _ = self._parts
            if first is None:  # a linear decoder: J = L everywhere, only the counts matter
                slopes = torch.zeros(len(z), 0, dtype=torch.float64)
            else:
                u = z.double() @ first.weight.detach().double().T + first.bias.detach().double()
                slopes = _gelu_slope(u).cpu()
            for key, rows in row_groups(labels, keys):
                g = slopes[rows]
                if self._fold:
                    n, total = self.sampled.get(key, (0, 0.0))
                    self.sampled[key] = (n + len(g), total + self._metric(len(g), g.sum(0), g.T @ g))
                    continue
                n, s1, s2 = self.sums.get(key, (0, torch.zeros(g.shape[1], dtype=torch.float64),
                                                torch.zeros(g.shape[1], g.shape[1], dtype=torch.float64)))
                self.sums[key] = (n + len(g), s1 + g.sum(0), s2 + g.T @ g)
            return self
        rows = torch.randperm(len(z), generator=self.generator)[: self.sample_rows].sort().values
        jac = decoder_jacobian(self.decoder, z[rows.to(z.device)]).cpu()
        for key, sampled in row_groups(labels[rows], keys[rows]):
            j = jac[sampled]
            n, total = self.sampled.get(key, (0, torch.zeros(jac.shape[2], jac.shape[2], dtype=torch.float64)))
            self.sampled[key] = (n + len(j), total + torch.einsum("boi,boj->ij", j, j))
        return self

    def _metric(self, n: int, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        """``Σ JᵀJ`` over ``n`` rows whose GELU slopes sum to ``s1`` and ``s1``'s outer products to ``s2``."""
        total = n * self._terms[0]
        if len(self._terms) > 1:
            linear_w2, w1, gram2 = self._terms[1:]
            cross = (linear_w2 * s1) @ w1
            total = total + cross + cross.T + w1.T @ (gram2 * s2) @ w1
        return total

    def totals(self) -> tuple[dict[Group, torch.Tensor], dict[Group, int]]:
        """``(Σ JᵀJ, rows it sums over)`` per group."""
        metric = {key: torch.as_tensor(total, dtype=torch.float64) for key, (_, total) in self.sampled.items()}
        counts = {key: n for key, (n, _) in self.sampled.items()}
        for key, (n, s1, s2) in self.sums.items():
            metric[key], counts[key] = self._metric(n, s1, s2), n
        return metric, counts


def row_groups(labels: torch.Tensor, keys: torch.Tensor) -> list[tuple[Group, torch.Tensor]]:
    """Each ``(label, key)`` pair present (the statistics' groups) and the boolean mask of its rows."""
    pairs = torch.stack([labels, keys], 1).unique(dim=0).tolist()
    return [((int(c), int(s)), (labels == c) & (keys == s)) for c, s in pairs]
