"""The spectrum of the latent operator: eigenvalues, modes and eigenfunctions of ``K``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KoopmanSpectrum:
    """``K = V diag(λ) V⁻¹`` for one step of the latent dynamics ``z_{t+1} = K z_t``.

    ``eigenvalues`` (``(d,)`` complex) are sorted by modulus, largest first; ``modes`` (``(d, d)``
    complex) holds the matching right eigenvectors as columns (``K v_i = λ_i v_i``, unit norm);
    ``offsets`` the step at which each probed layer is reached (``0`` for the first).
    ``condition`` is the condition number of ``V``: large values mean nearly parallel modes
    (a nearly defective ``K``), whose eigenfunctions are ill-determined. ``affine``: the map is
    ``z -> K z + b`` (an edited surrogate's), decomposed in homogeneous form ``[[K, b], [0, 1]]``:
    one more eigenvalue 1 (the constant function), and :meth:`eigenfunctions` reads ``[z, 1]``.
    """

    eigenvalues: torch.Tensor
    modes: torch.Tensor
    offsets: tuple[int, ...]
    condition: float
    affine: bool = False

    @property
    def moduli(self) -> torch.Tensor:
        """``|λ_i|``: per step, a mode grows (> 1), keeps (= 1) or decays (< 1)."""
        return self.eigenvalues.abs()

    @property
    def frequencies(self) -> torch.Tensor:
        """``arg λ_i`` in radians per step (0 for real, positive eigenvalues)."""
        return self.eigenvalues.angle()

    @property
    def timescales(self) -> torch.Tensor:
        """Steps for a mode to shrink by ``e``: ``-1 / ln|λ_i|`` (``inf`` where ``|λ_i| >= 1``)."""
        moduli = self.moduli.double()
        out = torch.full_like(moduli, math.inf)
        decaying = (moduli < 1) & (moduli > 0)
        out[decaying] = -1.0 / torch.log(moduli[decaying])
        out[moduli == 0] = 0.0
        return out

    def eigenfunctions(self, z: torch.Tensor) -> torch.Tensor:
        """The latent rows ``z`` (``(n, d)``, e.g. ``probe.surrogate().encode(x)``) in the modes'
        coordinates, ``c = V⁻¹ z``: ``(n, d)`` complex, with ``c_i(K z) = λ_i c_i(z)`` -- each
        column is a Koopman eigenfunction of the surrogate evaluated at those samples."""
        d = len(self.eigenvalues) - int(self.affine)
        if z.dim() != 2 or z.shape[1] != d:
            raise ValueError(f"expected latent rows of shape (n, {d}), got {tuple(z.shape)}")
        z = z.detach().cpu().double()
        if self.affine:
            z = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)
        return torch.linalg.solve(self.modes, z.to(self.modes.dtype).T).T

    def matrix(self) -> torch.Tensor:
        """``K`` rebuilt from the decomposition (float64; its imaginary part is rounding only)."""
        return (self.modes @ torch.diag(self.eigenvalues) @ torch.linalg.inv(self.modes)).real


def koopman_spectrum(operator: torch.Tensor, offsets: Sequence[int] = (0, 1), affine: bool = False) -> KoopmanSpectrum:
    """The :class:`KoopmanSpectrum` of a ``(d, d)`` operator (computed in float64); with
    ``affine``, of a homogeneous ``(d+1, d+1)`` one, ``[[K, b], [0, 1]]``."""
    if operator.dim() != 2 or operator.shape[0] != operator.shape[1]:
        raise ValueError(f"expected a square operator, got shape {tuple(operator.shape)}")
    k = operator.detach().double().cpu()
    if not bool(torch.isfinite(k).all()):
        raise ValueError("the operator holds NaN or infinite values")
    evals, evecs = torch.linalg.eig(k)
    order = torch.argsort(evals.abs(), descending=True, stable=True)
    evals, evecs = evals[order], evecs[:, order]
    return KoopmanSpectrum(evals, evecs, tuple(int(o) for o in offsets), float(torch.linalg.cond(evecs)), affine)
