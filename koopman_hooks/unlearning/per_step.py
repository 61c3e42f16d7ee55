"""The ``"per_step"`` edit: a new one-step operator ``K'`` whose ``k``-th power carries the redirect."""

from __future__ import annotations

import torch

from koopman_hooks.maths.linalg import real_matrix_root
from koopman_hooks.unlearning.options import EditOptions
from koopman_hooks.unlearning.redirect import metric_terms
from koopman_hooks.unlearning.statistics import Group, LatentGroupStatistics


def per_step_operator(
    stats: LatentGroupStatistics,
    operator: torch.Tensor,
    readout: torch.Tensor,
    steps: int,
    endpoint: torch.Tensor,
    targets: dict[Group, int],
    options: EditOptions = EditOptions(),
) -> tuple[torch.Tensor, float]:
    """A one-step ``K'`` with ``E K'^k ≈ R E K^k``, so every one of the ``k`` steps moves the
    forgotten class.

    Minimises the redirect's own quadratic form, ``Σ_g w_g tr(G_g Δ M⁰_g Δᵀ)`` with
    ``Δ = E K'^k − R E K^k`` and ``M⁰_g`` the homogeneous moments of ``z_0``, by L-BFGS
    (``options.iterations``) from the real principal ``k``-th root of ``E⁻¹ R E K^k`` (exact
    only when that matrix has no negative real eigenvalue; ``R`` often has some in directions
    the decoder ignores) or from ``K``, whichever fits better. Returns ``K'`` and the relative
    residual ``‖E K'^k − R E K^k‖ / ‖R E K^k‖``.
    """
    d = stats.latent_dim
    k64, r64 = operator.double(), readout.double()
    goal = endpoint @ r64 @ torch.linalg.matrix_power(k64, steps)
    # terms that share a metric are one term with their weighted moments summed: at most one
    # per class (the metric is the class's), each a pair of d^3 products per evaluation
    parts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for term in metric_terms(stats, options, targets):
        key = id(term.metric)
        moment = term.weight * stats.start[term.group].second_moment()
        metric = term.metric if term.metric is not None else torch.eye(d, dtype=torch.float64)
        parts[key] = (metric, moment if key not in parts else parts[key][1] + moment)
    # float32: the objective is a smooth quadratic in the end map, far above its precision
    metrics = torch.stack([g for g, _ in parts.values()]).float()
    moments = torch.stack([m for _, m in parts.values()]).float()
    goal32, r32 = goal.float(), r64.float()
    last = torch.zeros(1, d + 1)
    last[0, d] = 1.0

    def loss_of(top: torch.Tensor) -> torch.Tensor:
        full = torch.cat([top, last])
        delta = (r32 @ torch.linalg.matrix_power(full, steps) - goal32)[:d]
        # Σ_p tr(G_p Δ M_p Δᵀ) = Σ_p Σ (G_p Δ M_p) ⊙ Δ, the weights already in M_p
        return ((metrics @ delta) * (delta @ moments)).sum()

    try:
        root = real_matrix_root(torch.linalg.solve(r64, goal), steps)
    except RuntimeError:  # singular readout
        root = k64.clone()
    candidates = [root[:d].float(), k64[:d].float()] if torch.isfinite(root).all() else [k64[:d].float()]
    with torch.no_grad():
        losses = [float(loss_of(c)) for c in candidates]
    top = candidates[losses.index(min(losses))].contiguous().clone().requires_grad_(True)  # L-BFGS views its gradient flat
    optimiser = torch.optim.LBFGS(
        [top], max_iter=options.iterations, line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-15
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        value = loss_of(top)
        value.backward()
        return value

    if options.iterations:
        with torch.enable_grad():
            optimiser.step(closure)
    with torch.no_grad():
        result = torch.cat([top.detach(), last]).double()
        delta = r64 @ torch.linalg.matrix_power(result, steps) - goal
        error = float(delta.norm() / goal.norm().clamp_min(1e-300))
    return result, error
