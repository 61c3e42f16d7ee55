"""The redirect ``R``: one weighted least-squares problem over the groups' latent moments.

The surrogate reads ``x_L ≈ ψ(E K^k φ(x_0))`` with ``K`` and ``E`` homogeneous ``(d+1, d+1)``
matrices acting on ``[z, 1]``. With ``M_g = E_g[z̃ z̃ᵀ]`` the homogeneous second moment of the
endpoint of group ``g`` (see :mod:`~koopman_hooks.unlearning.statistics`)::

    R = argmin_R  Σ_g w_g E_g ‖R z̃ − T_g z̃‖²_{G_g}

- a retained group keeps its place, contracted towards its mean: ``T_g z = μ_g + β_R (z − μ_g)``;
- a forgotten group ``(f, s)`` lands on the mean of ``s``, the retained class the model ranks
  next for those samples (what a model retrained without ``f`` tends to predict):
  ``T_g z = μ_s + (β_F I + m A_OT)(z − μ_g)``, weighted ``strength`` times more;
- ``G_g = E_c[J_ψᵀ J_ψ] / scale + ε I`` is the decoder's pull-back metric averaged over the
  class ``c`` the group belongs to (retained) or is sent to (forgotten), so the fit keeps
  retained samples fixed in the directions the decoder (hence the head) reads, and leaves the
  ones it ignores free. Solved as one ``d(d+1)`` linear system (Kronecker form) or by
  conjugate gradients over one term per class; with Euclidean ``G`` it is
  ``R = (Σ w T M)(Σ w M)⁻¹``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from koopman_hooks.maths.linalg import gaussian_ot_map, homogeneous, solve_spd
from koopman_hooks.unlearning.options import EditOptions
from koopman_hooks.unlearning.statistics import Group, LatentGroupStatistics

# relative residual at which the conjugate-gradient solve stops: the moments' sampling noise is
# larger. Against 1e-4, on ResNet-18 and ViT (refine=0, classes 0/2/3) the same forget and retain
# accuracy to 0.1 points in half the edit time; with the output refinement the map moves much
# further than this anyway (MNIST ResMLP, classes 0/3/8: the same accuracies in 2/3 of the time)
CG_TOLERANCE = 1e-3
FLOAT32_ITERATIONS = 200  # the float32 solve stops here; float64 goes on if its residual still misses
DIRECT_LIMIT = 2500  # "auto" solves directly up to this many unknowns, d (d + 1)


@dataclass(frozen=True)
class Term:
    """One group's part of the least-squares problem."""

    group: Group
    weight: float
    metric: torch.Tensor | None  # G_g (shared by the groups of one class), or None (Euclidean)


def redirect_targets(stats: LatentGroupStatistics, retained: list[int], options: EditOptions) -> dict[Group, int]:
    """The retained class each forgotten group is sent to: its runner-up when retained, else
    the retained class whose mean is nearest (Mahalanobis, pooled within-class covariance)."""
    per_class = {c: stats.class_moments([c]) for c in stats.classes}
    n = sum(m.n for m in per_class.values())
    within = sum(m.n * m.cov_xx for m in per_class.values()) / n
    assert isinstance(within, torch.Tensor)
    eye = torch.eye(len(within), dtype=within.dtype)
    within = within + options.ridge * within.diagonal().mean().clamp_min(1e-12) * eye
    means = {c: per_class[c].mean_x for c in retained}
    out = {}
    for (c, s), m in stats.groups.items():
        if c not in stats.forget:
            continue
        if s in means:
            out[(c, s)] = s
        else:
            dist = {r: float((m.mean_x - mu) @ torch.linalg.solve(within, m.mean_x - mu)) for r, mu in means.items()}
            out[(c, s)] = min(dist, key=dist.__getitem__)
    return out


def metric_terms(stats: LatentGroupStatistics, options: EditOptions, targets: dict[Group, int]) -> list[Term]:
    """Weight and metric of every non-empty group's least-squares term."""
    d = stats.latent_dim
    eye = torch.eye(d, dtype=torch.float64)
    total = stats.n
    use_metric = options.metric == "decoder" and stats.metric is not None
    scale = 1.0
    if use_metric:
        scale = stats.metric_trace_total() / (total * d) or 1.0
    metrics: dict[int, torch.Tensor] = {}  # one per class: its samples' mean pull-back metric

    def class_metric(c: int) -> torch.Tensor:
        if c not in metrics:
            keys = [g for g in stats.groups if g[0] == c]
            num = torch.stack([stats.metric_total(g) for g in keys]).sum(0)
            metrics[c] = num / (sum(stats.groups[g].n for g in keys) * scale) + options.metric_eps * eye
        return metrics[c]

    out = []
    for key, m in stats.groups.items():
        if m.n == 0:
            continue
        forgotten = key[0] in stats.forget
        weight = m.n / total * (options.strength if forgotten else 1.0)
        metric = class_metric(targets[key] if forgotten else key[0]) if use_metric else None
        out.append(Term(key, weight, metric))
    return out


def _spread_map(source: torch.Tensor, target: torch.Tensor, options: EditOptions) -> torch.Tensor:
    """Linear part of a forgotten group's target: ``spread · I + match · A_OT``."""
    eye = torch.eye(len(source), dtype=torch.float64)
    out = options.spread * eye
    if options.match:
        source = source + options.ridge * source.diagonal().mean().clamp_min(1e-12) * eye
        out = out + options.match * gaussian_ot_map(source, target)
    return out


def _uses_cg(latent_dim: int, solver: str) -> bool:
    """Whether a metric redirect of this size is solved by conjugate gradients (else directly)."""
    return solver == "cg" or (solver == "auto" and latent_dim * (latent_dim + 1) > DIRECT_LIMIT)


def solve_metric_least_squares(
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], ridge: float, identity: torch.Tensor, solver: str,
    rtol: float = CG_TOLERANCE,
) -> torch.Tensor:
    """Solve ``Σ_p G_p (X M_p − TM_p) + ρ (X − I) = 0`` for ``X`` (``d × (d+1)``), given
    ``parts = [(G_p, M_p, TM_p)]`` with the terms that share a metric already summed
    (conjugate gradients stop at the relative residual ``rtol``)."""
    d, d1 = identity.shape
    rhs = torch.stack([g @ tm for g, _, tm in parts]).sum(0) + ridge * identity
    if not _uses_cg(d, solver):
        big = torch.stack([torch.kron(m, g) for g, m, _ in parts]).sum(0)
        big = big + ridge * torch.eye(d * d1, dtype=torch.float64)
        # column-major vec: vec(G X M) = (Mᵀ ⊗ G) vec(X)
        return torch.linalg.solve(big, rhs.T.reshape(-1)).reshape(d1, d).T
    # conjugate gradients on the same SPD operator, from the Euclidean solution; the
    # preconditioner inverts the Kronecker average X -> Ḡ X M̄. First in float32 (twice as fast;
    # the stopping residual is far above its precision), stopped after FLOAT32_ITERATIONS steps;
    # when its true (float64) residual is not within 10 rtol (ill-conditioned moments whose
    # float32 products break CG), again in float64 from there, and the better of the two is kept.
    # Measured on ResNet-18 and ViT (latent 320, moments conditioned beyond 1e5): the same
    # iterations and the same edit in float32.
    weight = sum(float(m[-1, -1]) for _, m, _ in parts)  # Σ w: the moments' constant entry is 1
    m_bar = torch.stack([m for _, m, _ in parts]).sum(0) + ridge * torch.eye(d1, dtype=torch.float64)
    g_bar = torch.stack([float(m[-1, -1]) * g for g, m, _ in parts]).sum(0) / weight
    start = torch.linalg.solve(m_bar.T, (torch.stack([tm for _, _, tm in parts]).sum(0) + ridge * identity).T).T
    m_inv, g_inv = torch.linalg.inv(m_bar), torch.linalg.inv(g_bar)
    best: tuple[float, torch.Tensor] | None = None
    for dtype, max_iter in ((torch.float32, FLOAT32_ITERATIONS), (torch.float64, 10 * d1)):
        gs = torch.stack([g.to(dtype) for g, _, _ in parts])
        ms = torch.stack([m.to(dtype) for _, m, _ in parts])

        def operator(x: torch.Tensor, gs: torch.Tensor = gs, ms: torch.Tensor = ms) -> torch.Tensor:
            return (gs @ x @ ms).sum(0) + ridge * x

        def precondition(r: torch.Tensor, g: torch.Tensor = g_inv.to(dtype), m: torch.Tensor = m_inv.to(dtype)) -> torch.Tensor:
            return g @ r @ m

        x = solve_spd(operator, rhs.to(dtype), start.to(dtype), precondition, rtol=rtol, max_iter=max_iter).double()
        residual = float((torch.stack([g @ x @ m for g, m, _ in parts]).sum(0) + ridge * x - rhs).norm() / rhs.norm())
        if math.isfinite(residual) and (best is None or residual < best[0]):
            best, start = (residual, x), x  # the float64 pass goes on from the float32 solution
        if best is not None and best[0] <= 10 * rtol:
            break
    if best is None:
        raise FloatingPointError("the redirect's conjugate-gradient solve diverged (non-finite residual)")
    return best[1]


def prepare_solver(latent_dim: int, options: EditOptions) -> None:
    """Import the conjugate-gradient solver now if an edit of this size will need it: scipy's
    import (~0.2 s) then belongs to the statistics pass, once, not to the first edit."""
    if options.metric == "decoder" and _uses_cg(latent_dim, options.solver):
        try:
            import scipy.sparse.linalg  # noqa: F401
        except ImportError as error:
            raise ImportError(f"the decoder-metric edit at latent_dim={latent_dim} solves its redirect by scipy's conjugate "
                              "gradients: pip install 'koopman_hooks[unlearning]' (or pass metric='euclidean')") from error


def redirect_map(stats: LatentGroupStatistics, retained: list[int], options: EditOptions = EditOptions(),
                 rtol: float = CG_TOLERANCE) -> torch.Tensor:
    """The homogeneous ``(d+1, d+1)`` float64 redirect (see the module docstring); a
    conjugate-gradient solve stops at the relative residual ``rtol``."""
    d = stats.latent_dim
    targets = redirect_targets(stats, retained, options)
    target_moments = {c: stats.class_moments([c]) for c in retained}
    merged: dict[int, list[torch.Tensor]] = {}  # id(G) -> [G, Σ w M, Σ w T M]: one entry per distinct metric
    euclid = [torch.zeros(d + 1, d + 1, dtype=torch.float64), torch.zeros(d, d + 1, dtype=torch.float64)]
    trace = 0.0
    for term in metric_terms(stats, options, targets):
        m = stats.groups[term.group]
        moment = m.second_moment()
        if term.group in targets:
            goal = target_moments[targets[term.group]]
            spread = _spread_map(m.cov_xx, goal.cov_xx, options)
            target_moment = homogeneous(spread, goal.mean_x - spread @ m.mean_x)[:d] @ moment
        else:  # [β I, (1 - β) μ] M without the d³ product: a retained group's target contracts to its mean
            beta = options.contract
            target_moment = beta * moment[:d] + (1 - beta) * torch.outer(m.mean_x, moment[d])
        trace += term.weight * float(moment[:d, :d].diagonal().mean())
        if term.metric is None:
            euclid[0] += term.weight * moment
            euclid[1] += term.weight * target_moment
        else:
            entry = merged.setdefault(id(term.metric), [term.metric, torch.zeros_like(moment), torch.zeros(d, d + 1, dtype=torch.float64)])
            entry[1] = entry[1] + term.weight * moment
            entry[2] = entry[2] + term.weight * target_moment
    ridge = options.ridge * trace
    identity = torch.eye(d + 1, dtype=torch.float64)[:d]
    if not merged:  # Euclidean: E = (Σ w T M + ρ I)(Σ w M + ρ I)⁻¹
        lhs = euclid[0] + ridge * torch.eye(d + 1, dtype=torch.float64)
        top = torch.linalg.solve(lhs.T, (euclid[1] + ridge * identity).T).T
    else:
        top = solve_metric_least_squares([(g, mm, tm) for g, mm, tm in merged.values()], ridge, identity, options.solver, rtol)
    out = torch.eye(d + 1, dtype=torch.float64)
    out[:d] = top
    return out
