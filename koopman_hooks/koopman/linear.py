"""Closed-form linear fits from streamed moments: the DMD baseline and the ridge (EDMD) operator.

Both are fitters in the concept-erasure style: ``update(...)`` folds a batch in and returns
``self``, ``merge(other)`` combines two disjoint sets of samples exactly, and ``finalize()``
returns the fitted matrices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from koopman_hooks.maths.stats import StreamingMoments, ridge_regression


class LinearBaselineFitter:
    """Ridge DMD from the first probed layer's adapted state to every later layer's.

    The "linear surrogate without lifting": ``a_j ≈ a_0 W_j + b_j`` for ``j = 1 .. L-1``.
    """

    def __init__(self, n_layers: int, width: int, device: torch.device | str = "cpu") -> None:
        if n_layers < 2:
            raise ValueError(f"a linear baseline needs at least 2 layers, got {n_layers}")
        self.moments = [StreamingMoments(width, width, device=device) for _ in range(n_layers - 1)]

    @torch.no_grad()
    def update(self, states: Sequence[torch.Tensor]) -> LinearBaselineFitter:
        """Fold in one batch of adapted states, one ``(B, width)`` tensor per probed layer."""
        if len(states) != len(self.moments) + 1:
            raise ValueError(f"expected {len(self.moments) + 1} layers' states, got {len(states)}")
        for moments, target in zip(self.moments, states[1:]):
            moments.update(states[0], target)
        return self

    def merge(self, other: LinearBaselineFitter) -> LinearBaselineFitter:
        for mine, theirs in zip(self.moments, other.moments, strict=True):
            mine.merge(theirs)
        return self

    def finalize(self, ridge: float = 1e-6) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(W_j, b_j)]`` (float32) for ``j = 1 .. L-1``; ``W_j`` is ``(width, width)``."""
        out = []
        for moments in self.moments:
            weight, bias = ridge_regression(moments, ridge)
            out.append((weight.float(), bias.float()))
        return out


class RidgeOperatorFitter:
    """Ridge EDMD of one latent operator from consecutive latent pairs ``z_i -> z_{i+1}``
    (no intercept): ``K = argmin Σ ‖z_{i+1} − K z_i‖² + ridge``."""

    def __init__(self, latent_dim: int, device: torch.device | str = "cpu") -> None:
        self.moments = StreamingMoments(latent_dim, latent_dim, device=device)

    @torch.no_grad()
    def update(self, latents: Sequence[torch.Tensor]) -> RidgeOperatorFitter:
        """Fold in one batch of latent states, one ``(B, d)`` tensor per probed layer."""
        for z_in, z_out in zip(latents[:-1], latents[1:]):
            self.moments.update(z_in, z_out)
        return self

    def merge(self, other: RidgeOperatorFitter) -> RidgeOperatorFitter:
        self.moments.merge(other.moments)
        return self

    def finalize(self, ridge: float = 1e-6) -> torch.Tensor:
        """``K`` (float64, ``(d, d)``, acting on column vectors)."""
        weight, _ = ridge_regression(self.moments, ridge, intercept=False)
        return weight.T
