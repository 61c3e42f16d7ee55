"""Small linear-algebra helpers: homogeneous affine maps, matrix functions, an SPD solve.

Homogeneous matrices ``[[A, b], [0, 1]]`` act on column vectors ``[z, 1]``, so an affine map of
latent *rows* ``z`` is ``apply_homogeneous(h, z) = z @ Aᵀ + b``. scipy (an optional extra) is
imported only by the functions that need it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from koopman_hooks.maths.rng import preserved_host_streams


def homogeneous(matrix: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``[[matrix, bias], [0, 1]]`` for column vectors (``bias`` defaults to zero)."""
    d = matrix.shape[0]
    out = torch.eye(d + 1, dtype=matrix.dtype, device=matrix.device)
    out[:d, :d] = matrix
    if bias is not None:
        out[:d, d] = bias
    return out


def apply_homogeneous(h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Rows ``z`` through the homogeneous map ``h`` (in ``z``'s dtype)."""
    zh = torch.cat([z, torch.ones_like(z[:, :1])], dim=1) @ h.T.to(z)
    return zh[:, :-1] / zh[:, -1:]


def psd_power(a: torch.Tensor, power: float) -> torch.Tensor:
    """``a^power`` of a symmetric positive semi-definite matrix (eigenvalues clamped at a tiny
    fraction of the largest, so negative powers stay finite)."""
    evals, evecs = torch.linalg.eigh((a + a.mT) / 2)
    evals = evals.clamp_min(evals.max().clamp_min(torch.finfo(a.dtype).tiny) * 1e-12)
    return (evecs * evals.pow(power)) @ evecs.mT


def _blas_threads(limit: int) -> contextlib.AbstractContextManager[Any]:
    """scipy's BLAS held to ``limit`` threads while open (threadpoolctl, where installed): it
    otherwise takes every core whatever ``torch.set_num_threads`` says, which collapses when
    other jobs share the machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn, an optional extra
        return contextlib.nullcontext()
    return threadpool_limits(limits=limit, user_api="blas")


def top_eigh(a: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest eigenvalues (decreasing) and their eigenvectors (columns) of a
    symmetric matrix; all of them when ``k`` is ``None``. On the CPU, with scipy installed and
    ``k`` under a third of the size, LAPACK's subset solver computes only those (float64 exact,
    ~3x faster than the full ``eigh`` at 3,000 features); otherwise ``torch.linalg.eigh``."""
    n = a.shape[0]
    k = n if k is None else min(k, n)
    if k < 1:
        return a.new_zeros(0), a.new_zeros(n, 0)
    if a.device.type == "cpu" and n >= 256 and 3 * k < n:
        try:
            from scipy.linalg import eigh
        except ImportError:  # pragma: no cover - scipy is an optional extra
            pass
        else:
            with _blas_threads(torch.get_num_threads()):  # torch's thread count, not OpenBLAS's own
                evals, evecs = eigh(a.detach().numpy(), subset_by_index=[n - k, n - 1], driver="evr")
            return (torch.from_numpy(evals[::-1].copy()).to(a.dtype),
                    torch.from_numpy(evecs[:, ::-1].copy()).to(a.dtype))
    evals, evecs = torch.linalg.eigh(a)
    return evals.flip(0)[:k], evecs.flip(1)[:, :k]


def psd_sqrt(a: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Symmetric square root of an SPD matrix (or its inverse)."""
    return psd_power(a, -0.5 if inverse else 0.5)


def gaussian_ot_map(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Linear part of the optimal-transport map between centred Gaussians of covariances
    ``source`` and ``target``: ``A = Σ_t^½ (Σ_t^½ Σ_s Σ_t^½)^-½ Σ_t^½``, so ``A Σ_s Aᵀ = Σ_t``."""
    root_t = psd_sqrt(target)
    return root_t @ psd_sqrt(root_t @ source @ root_t, inverse=True) @ root_t


def real_matrix_root(a: torch.Tensor, k: int) -> torch.Tensor:
    """The real part of the principal ``k``-th root of a square matrix (scipy's Schur-Padé
    ``fractional_matrix_power``), in ``a``'s dtype.

    Exact (``root^k == a``) when a real principal root exists, e.g. when ``a`` has no eigenvalue
    on the closed negative real axis; otherwise the real part is the nearest real candidate and
    the caller should check the residual.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k == 1:
        return a.clone()
    from scipy.linalg import fractional_matrix_power

    with preserved_host_streams(seed=0):  # its norm estimates draw from NumPy's global generator
        root = fractional_matrix_power(a.detach().double().cpu().numpy(), 1.0 / k)
    return torch.as_tensor(np.real(root), dtype=a.dtype, device=a.device)


def polar(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Polar decomposition ``a = u p``: ``u`` orthogonal, ``p`` symmetric positive semi-definite."""
    left, s, right = torch.linalg.svd(a)
    return left @ right, (right.mT * s) @ right


def solve_spd(
    operator: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    x0: torch.Tensor | None = None,
    preconditioner: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rtol: float = 1e-4,
    max_iter: int | None = None,
) -> torch.Tensor:
    """Solve ``operator(x) = rhs`` for a symmetric positive-definite linear ``operator`` on
    matrices by (preconditioned) conjugate gradients, scipy's ``cg``, in ``rhs``'s dtype."""
    from scipy.sparse.linalg import LinearOperator, cg

    shape, dtype = rhs.shape, rhs.dtype
    size = rhs.numel()
    np_dtype = np.float32 if dtype == torch.float32 else np.float64

    def wrap(fn: Callable[[torch.Tensor], torch.Tensor]) -> LinearOperator:
        def matvec(v: np.ndarray) -> np.ndarray:
            out = fn(torch.from_numpy(np.ascontiguousarray(v, dtype=np_dtype)).reshape(shape))
            return out.reshape(-1).numpy()

        return LinearOperator((size, size), matvec=matvec, dtype=np_dtype)

    x, _ = cg(
        wrap(operator),
        rhs.reshape(-1).numpy(),
        x0=None if x0 is None else x0.to(dtype).reshape(-1).numpy(),
        M=None if preconditioner is None else wrap(preconditioner),
        rtol=rtol,
        maxiter=max_iter,
    )
    return torch.from_numpy(np.asarray(x, dtype=np_dtype)).reshape(shape)
