"""The latent Koopman operator ``K`` and its parametrizations.

- ``dense``: ``K`` is a free matrix (initialised at the identity);
- ``exp``: ``K = exp(M / k)`` with ``k`` the total number of steps (the paper's default),
  so ``K^s = exp(s M / k)`` is computed without repeated products;
- ``lowrank``: ``K = U V^T`` of rank ``rank``.

"""

from __future__ import annotations

import math
import warnings
from typing import Literal, get_args

import torch
from torch import nn

Parametrization = Literal["dense", "exp", "lowrank"]
PARAMETRIZATIONS: tuple[str, ...] = get_args(Parametrization)


def advance(k: torch.Tensor, z: torch.Tensor, steps: int) -> torch.Tensor:
    """``z @ (K^steps).T`` for latent rows ``z``, the cheaper way: ``steps`` products with ``K``
    when there are fewer rows than latent dimensions (``steps · B · d²`` multiply-adds), else one
    product with ``K^steps`` (about ``log2(steps) · d³ + B · d²``)."""
    if steps == 0:
        return z
    if steps > 1 and z.shape[0] < k.shape[0]:
        for _ in range(steps):
            z = z @ k.T
        return z
    return z @ torch.linalg.matrix_power(k, steps).T


class KoopmanOperator(nn.Module):
    """A linear map of the latent space, applied ``steps`` times with :meth:`power`."""

    def __init__(self, dim: int, parametrization: Parametrization = "exp", total_steps: int = 1, rank: int | None = None) -> None:
        super().__init__()
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"unknown operator {parametrization!r}; choose from {PARAMETRIZATIONS}")
        self.dim = dim
        self.parametrization = parametrization
        self.total_steps = max(int(total_steps), 1)
        if parametrization == "dense":
            self.weight = nn.Parameter(torch.eye(dim))
        elif parametrization == "exp":
            self.generator = nn.Parameter(torch.zeros(dim, dim))
        else:
            self.rank = int(rank or max(dim // 2, 1))
            if not 1 <= self.rank <= dim:
                raise ValueError(f"rank must be in 1..{dim}, got {self.rank}")
            generator = torch.Generator().manual_seed(0)  # never the global RNG
            basis = torch.linalg.qr(torch.randn(dim, self.rank, generator=generator))[0]
            self.u = nn.Parameter(basis.clone())
            self.v = nn.Parameter(basis.clone())

    def matrix(self) -> torch.Tensor:
        """``K`` itself (one step)."""
        return self.power(1)

    def power(self, steps: int) -> torch.Tensor:
        """``K^steps``, acting on row vectors as ``z @ K^steps.T``. Inside a bfloat16 autocast
        (``train_amp``) its products are bfloat16 too: ``K^4`` at latent 240 in float32 cost the
        MNIST recipe's fit 2.0 s of 13.6 at the same agreement; the scores never run under it."""
        if steps == 0:
            return torch.eye(self.dim, device=self._device(), dtype=self._dtype())
        if self.parametrization == "exp":
            return torch.linalg.matrix_exp(self.generator * (steps / self.total_steps))
        if self.parametrization == "dense":
            return torch.linalg.matrix_power(self.weight, steps)
        # (U V^T)^s = U (V^T U)^(s-1) V^T keeps the product at rank r
        inner = torch.linalg.matrix_power(self.v.T @ self.u, steps - 1)
        return self.u @ inner @ self.v.T

    def step(self, z: torch.Tensor, steps: int = 1) -> torch.Tensor:
        """Advance latent row vectors ``z`` by ``steps``."""
        if self.parametrization == "dense":
            return advance(self.weight, z, steps)
        return z @ self.power(steps).T

    @torch.no_grad()
    def set_matrix(self, k: torch.Tensor) -> None:
        """Overwrite ``K`` (closed-form fits); only the dense parametrization stores it as is."""
        if self.parametrization != "dense":
            raise ValueError("a closed-form K needs operator='dense'")
        self.weight.copy_(k.to(self.weight))

    @torch.no_grad()
    def initialize(self, k: torch.Tensor) -> float:
        """Start at ``K = k`` as closely as the parametrisation allows; returns the relative error
        ``‖K − k‖ / ‖k‖`` (0 for ``dense``; for ``exp`` exact when ``k`` has a real logarithm,
        e.g. a symmetric positive-definite ``k``; ``lowrank`` keeps the best rank-``r`` part)."""
        k = k.double()
        if self.parametrization == "dense":
            self.weight.copy_(k.to(self.weight))
        elif self.parametrization == "exp":
            log = _real_log(k)
            if not bool(torch.isfinite(log).all()):  # a singular k has no logarithm at all
                self.generator.zero_()
                return math.inf
            self.generator.copy_((log * self.total_steps).to(self.generator))
        else:
            u, s, vh = torch.linalg.svd(k)
            root = s[: self.rank].sqrt()
            self.u.copy_((u[:, : self.rank] * root).to(self.u))
            self.v.copy_((vh[: self.rank].T * root).to(self.v))
        return float((self.matrix().double() - k).norm() / k.norm().clamp_min(1e-300))

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def _real_log(k: torch.Tensor) -> torch.Tensor:
    """The real part of the principal matrix logarithm of ``k`` (float64): scipy's Schur-based
    ``logm`` (right for defective matrices too) where scipy is installed, else from an
    eigendecomposition (right for diagonalisable ``k``)."""
    try:
        import scipy.linalg
    except ImportError:  # pragma: no cover - scipy is an optional extra
        evals, evecs = torch.linalg.eig(k)
        return (evecs @ torch.diag(torch.log(evals)) @ torch.linalg.inv(evecs)).real
    with warnings.catch_warnings():  # scipy warns where no accurate logarithm exists: the caller's error says it
        warnings.simplefilter("ignore")
        return torch.from_numpy(scipy.linalg.logm(k.detach().cpu().numpy()).real.copy()).to(k.device)

