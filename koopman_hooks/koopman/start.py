"""The closed-form start of a fit: the linear Koopman model of the adapted states, from moments.

Given the streamed moments of ``(a_0, a_j)`` for every later probed layer ``j``:

1. the ridge map ``M`` from ``a_0`` to the last layer's ``a_L`` is split by its polar
   decomposition ``M = U S`` (``U`` orthogonal, ``S`` symmetric positive semi-definite); the last
   layer's adapter is rotated by ``U``, so that in its new coordinates ``a_L ≈ S a_0``;
2. ``K = S^{1/k}`` with ``k`` the total number of steps: a real, symmetric operator with
   ``K^k = S`` exactly, whatever the eigenvalues of ``M`` (no real root of ``M`` is needed);
3. with more than two layers, ``K`` and the rotations of every later layer's adapter are then
   refined together on the whole trajectory, ``Σ_j E‖R_jᵀ a_j − K^{o_j} a_0‖²``, alternating
   orthogonal Procrustes for the rotations with L-BFGS for ``K`` (all from the moments), from
   three starts: the one above, and one step of the pooled layer-to-layer regression (EDMD) in
   the layers' own PCA coordinates, or after aligning each layer with the one before; the best
   one is kept.

With two layers this linear model *is* the ridge (DMD) baseline; adapters are only rotated,
so their inverses stay exact. The baselines are returned in the rotated coordinates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from koopman_hooks.koopman.adapters import LayerAdapter, procrustes_rotation
from koopman_hooks.maths.linalg import polar, psd_power
from koopman_hooks.maths.stats import StreamingMoments, ridge_regression


@dataclass(frozen=True)
class LinearStart:
    """The linear model a fit starts from."""

    adapters: dict[str, LayerAdapter]
    """The adapters, rotated."""
    operator: torch.Tensor
    """``K`` (``width x width``, float64, acting on column vectors)."""
    rotations: dict[str, torch.Tensor]
    """Per later layer, the rotation ``R`` of its adapted coordinates: new ``a = old a @ R``."""
    baselines: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Per later layer, the ridge DMD ``a_j ≈ a_0 W + b`` in the rotated coordinates (float32)."""


def linear_start(
    layers: Sequence[str],
    adapters: Mapping[str, LayerAdapter],
    moments: Sequence[StreamingMoments],
    offsets: Sequence[int],
    ridge: float = 1e-6,
    consecutive: Sequence[StreamingMoments] = (),
) -> LinearStart:
    """The closed-form start (see the module docstring). ``moments[j-1]`` holds ``(a_0, a_j)``,
    ``consecutive[j-1]`` holds ``(a_{j-1}, a_j)`` (needed for more than two layers), and
    ``offsets[j]`` the steps from ``layers[0]`` to ``layers[j]``."""
    if len(moments) != len(layers) - 1 or len(offsets) != len(layers):
        raise ValueError("need one moments object per later layer and one offset per layer")
    fits = [ridge_regression(m, ridge) for m in moments]  # a_j ≈ a_0 W + b (rows)
    last = layers[-1]
    rotation, symmetric = polar(fits[-1][0].T)  # column form: a_L ≈ M a_0, M = U S
    operator = psd_power(symmetric, 1.0 / offsets[-1])
    rotations = {last: rotation}
    for j in range(1, len(layers) - 1):
        rotations[layers[j]] = _procrustes(moments[j - 1], operator, offsets[j])
    if len(layers) > 2:
        candidates = [_refine(layers, moments, offsets, operator, rotations)]
        if len(consecutive) == len(layers) - 1:
            for align in (False, True):
                pooled = _pooled_operator(consecutive, offsets, ridge, align)
                start = {layers[j]: _procrustes(m, pooled, offsets[j]) for j, m in enumerate(moments, start=1)}
                candidates.append(_refine(layers, moments, offsets, pooled, start))
        operator, rotations = min(candidates, key=lambda c: c[2])[:2]
    rotated = {name: adapters[name].rotated(rotations[name].float()) if name in rotations else adapters[name]
               for name in layers}
    baselines = {}
    for name, (weight, bias) in zip(layers[1:], fits):
        r = rotations[name]
        baselines[name] = ((weight @ r).float(), (bias @ r).float())
    return LinearStart(rotated, operator, {name: r.float() for name, r in rotations.items()}, baselines)


def _second_moments(m: StreamingMoments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``E[a_0 a_0ᵀ]``, ``E[a_j a_0ᵀ]``, ``E[a_j a_jᵀ]`` (uncentred) of one pair's moments."""
    assert m.mean_y is not None
    xx = m.cov_xx + torch.outer(m.mean_x, m.mean_x)
    yx = m.cov_xy.T + torch.outer(m.mean_y, m.mean_x)
    yy = m.cov_yy + torch.outer(m.mean_y, m.mean_y)
    return xx, yx, yy


def _procrustes(m: StreamingMoments, operator: torch.Tensor, steps: int) -> torch.Tensor:
    """The rotation ``R`` that best maps layer ``j``'s coordinates onto ``K^{steps} a_0``."""
    _, yx, _ = _second_moments(m)
    reach = torch.linalg.matrix_power(operator, steps)
    return procrustes_rotation(yx @ reach.T)  # maximises tr(Rᵀ E[a_j (K^s a_0)ᵀ])


def _pooled_operator(consecutive: Sequence[StreamingMoments], offsets: Sequence[int], ridge: float,
                     align: bool) -> torch.Tensor:
    """One step of the pooled layer-to-layer regression (EDMD), with ``align`` each layer first
    rotated onto the one before it (real principal root of the pooled map when a segment spans
    several steps)."""
    # rotation of layer j-1's coordinates
    frame = torch.eye(consecutive[0].dim, dtype=torch.float64, device=consecutive[0].mean_x.device)
    xx = torch.zeros_like(frame)
    yx = torch.zeros_like(frame)
    for m in consecutive:
        pxx, pyx, _ = _second_moments(m)
        pxx, pyx = frame.T @ pxx @ frame, pyx @ frame  # a_{j-1} in its aligned frame
        frame = procrustes_rotation(pyx) if align else torch.eye(len(frame), dtype=frame.dtype, device=frame.device)
        xx, yx = xx + pxx, yx + frame.T @ pyx
    scale = xx.diagonal().mean().clamp_min(1e-12)
    pooled = torch.linalg.solve(xx + ridge * scale * torch.eye(len(xx), dtype=xx.dtype, device=xx.device), yx.T).T
    steps = max(1, round(offsets[-1] / (len(offsets) - 1)))
    if steps == 1:
        return pooled
    evals, evecs = torch.linalg.eig(pooled)
    return (evecs @ torch.diag(evals ** (1.0 / steps)) @ torch.linalg.inv(evecs)).real


def _minimise(loss: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, iterations: int) -> torch.Tensor:
    """L-BFGS on a matrix from ``start``."""
    k = start.detach().clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([k], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        value = loss(k)
        value.backward()
        return value

    with torch.enable_grad():
        optimiser.step(closure)
    return k.detach()


def _refine(layers: Sequence[str], moments: Sequence[StreamingMoments], offsets: Sequence[int], operator: torch.Tensor,
            rotations: dict[str, torch.Tensor], rounds: int = 4,
            iterations: int = 50) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    """Alternate Procrustes (rotations) and L-BFGS (K) on the trajectory's squared error;
    returns ``K``, the rotations and the final relative error (in float64). L-BFGS runs in
    float32 (half the cost of float64 on a CPU; the error it moves is about 1e-3 of the total,
    far above float32's rounding), the rotations and the final error in float64."""
    rotations = dict(rotations)
    terms = [_second_moments(m) for m in moments]
    steps = [offsets[j] for j in range(1, len(layers))]
    xx = terms[0][0]
    if any(not torch.equal(other, xx) for other, _, _ in terms[1:]):
        raise ValueError("every pair's first block must be layers[0]'s states (one E[a_0 a_0ᵀ])")
    # E‖Rᵀa_j − P a_0‖² = tr(yy) − 2 tr(Rᵀ yx Pᵀ) + tr(P xx Pᵀ) with P = K^{o_j}. With xx = L Lᵀ
    # (its eigenvectors scaled by the roots of its positive eigenvalues; yx vanishes on the
    # others) both traces read Q = P L only: tr(P xx Pᵀ) = Σ Q ∘ Q and tr(Rᵀ yx Pᵀ) = Σ C ∘ Q
    # with C = Rᵀ yx V Λ^{-1/2}; Q_j = K^{o_j - o_{j-1}} Q_{j-1}, one product per step, where
    # the powers of K and P xx took two per layer
    evals, evecs = torch.linalg.eigh(xx)
    keep = evals > evals.max().clamp_min(1e-300) * 1e-12
    roots = evals[keep].sqrt()
    factor = evecs[:, keep] * roots

    def align(dtype: torch.dtype) -> list[torch.Tensor]:
        """``C`` of every later layer under the current rotations."""
        return [((rotations[layers[j]].T @ yx @ evecs[:, keep]) / roots).to(dtype)
                for j, (_, yx, _) in enumerate(terms, start=1)]

    norm = torch.stack([yy.trace() for _, _, yy in terms]).sum()  # the error of predicting zero
    fixed = {dtype: (factor.to(dtype), norm.to(dtype)) for dtype in (torch.float32, torch.float64)}

    def loss(k: torch.Tensor, aligned: Sequence[torch.Tensor]) -> torch.Tensor:
        q, scale = fixed[k.dtype]
        total = scale
        reached = 0
        for c, s in zip(aligned, steps, strict=True):
            for _ in range(s - reached):
                q = k @ q
            reached = s
            total = total - 2 * (c * q).sum() + (q * q).sum()
        return total / scale

    k = operator.float()
    for _ in range(rounds):
        k = _minimise(partial(loss, aligned=align(torch.float32)), k, iterations)
        for j, m in enumerate(moments, start=1):
            rotations[layers[j]] = _procrustes(m, k.double(), offsets[j])
    k = k.double()
    with torch.no_grad():
        error = float(loss(k, align(torch.float64)))
    return k, rotations, error
