"""Class unlearning by editing the surrogate's *linear* latent dynamics, never the model's weights.

The surrogate reads ``x_L ≈ ψ(E K^k φ(x_0))`` with ``K`` and ``E`` homogeneous ``(d+1, d+1)``
matrices acting on ``[z, 1]``. :func:`unlearn` streams a loader once, collects float64 moments
of the latent start ``z_0`` and endpoint ``z_k = E K^k z_0`` per *group* (class × the class the
model ranks next), plus the decoder's averaged pull-back metric ``E_g[J_ψᵀ J_ψ]`` (memory
``O(groups · d²)``, whatever the dataset size), and returns a new surrogate with an edited
``E`` or ``K``. ``probe.patch(edited)`` is then the unlearned model; the model is only read.

The redirect ``R`` (the core of every method) is one weighted least-squares problem over the
groups' homogeneous second moments ``M_g = E_g[z̃ z̃ᵀ]``::

    R = argmin_R  Σ_g w_g E_g ‖R z̃ − T_g z̃‖²_{G_g}

- a retained group keeps its place, contracted towards its mean: ``T_g z = μ_g + β_R (z − μ_g)``;
- a forgotten group ``(f, s)`` lands on the mean of ``s``, the retained class the model ranks
  next for those samples (what a model retrained without ``f`` tends to predict):
  ``T_g z = μ_s + (β_F I + m A_OT)(z − μ_g)``, weighted ``strength`` times more;
- ``G_g = E_c[J_ψᵀ J_ψ] / scale + ε I`` is the decoder's pull-back metric averaged over the
  class ``c`` the group belongs to (retained) or is sent to (forgotten), so the fit keeps
  retained samples fixed in the directions the decoder (hence the head) reads, and leaves
  the ones it ignores free. Solved as one ``d(d+1)`` linear system (Kronecker form) or by
  conjugate gradients over one term per class; with Euclidean ``G`` it is
  ``R = (Σ w T M)(Σ w M)⁻¹``.

With ``refine > 0`` (the default) ``R`` is then refined on the patched model's own outputs
(:mod:`koopman_hooks.unlearning.refine`): a few L-BFGS steps on the cross-entropy of a seeded
sample of ``refine_rows`` rows, forgotten ones towards their runner-up class and retained ones
towards the model's prediction. One affine map cannot always collapse a class that another one
wraps around (Yin-Yang's yin and yang) by moments alone; the outputs say where it must.
Each step runs the whole network on the sample, so large models set ``refine=0``.

Methods:

- ``"endpoint"``: ``E' = R E``.
- ``"per_step"``: ``K' = S K`` with ``E K'^k ≈ R E K^k``: L-BFGS on the redirect's own
  quadratic form (``z_0`` moments) from the principal real ``k``-th root, so every one of the
  ``k`` steps moves the forgotten class (an exact root rarely exists: ``R`` has negative
  eigenvalues in directions the decoder ignores).
- ``"leace"``: ``E' = L R E`` with ``L = I − P`` the LEACE eraser of the forgotten classes'
  indicators, computed in closed form from the redirected moments and anchored at the
  retained mean; the redirect spreads forgotten samples over half the target class's
  Gaussian-OT spread (``match=0.5``) so they blend into it rather than collapse.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from koopman_hooks.hooks import OutputSelector, preserved_state
from koopman_hooks.stats import StreamingMoments
from koopman_hooks.surrogate import KoopmanSurrogate, homogeneous
from koopman_hooks.unlearning.baselines import LeaceStatistics
from koopman_hooks.unlearning.refine import SampleReservoir, refine_readout

METHODS = ("endpoint", "per_step", "leace")
LABEL_SOURCES = ("loader", "model")
REDIRECTS = ("runner_up", "nearest")
METRICS = ("decoder", "euclidean")
SOLVERS = ("auto", "direct", "cg")

#: Default options of :func:`unlearn` (tuned on Yin-Yang; see the module docstring).
DEFAULTS: dict[str, Any] = {
    "strength": 1.5,  # weight of the forgotten samples relative to the retained ones
    "contract": 0.7,  # β_R: retained groups may shrink towards their own mean
    "spread": 0.0,  # β_F: forgotten samples keep this fraction of their spread around the target
    "match": 0.0,  # and this fraction of the target class's spread (Gaussian optimal transport)
    "metric": "decoder",  # "decoder" pull-back metric or "euclidean"
    "metric_eps": 0.1,  # ε added to the normalised pull-back metric
    "metric_rows": 64,  # rows per batch whose decoder Jacobian estimates the pull-back metric
    "refine": 10,  # L-BFGS iterations refining the redirect on the patched model's outputs (0: off)
    "refine_rows": 2048,  # seeded sample of the data the refinement sees
    "proximal": 1e-2,  # pull of the refinement towards the least-squares redirect
    "retain_weight": 0.8,  # share of the refinement loss on retained (vs forgotten) samples
    "redirect": "runner_up",  # target of a forgotten sample: the model's runner-up retained class
    "ridge": 1e-6,  # relative ridge towards the identity edit
    "iterations": 100,  # L-BFGS iterations of the per-step operator fit
    "solver": "auto",  # metric least squares: "direct" (Kronecker), "cg", or "auto" (direct when small)
}
#: Per-method overrides of :data:`DEFAULTS`: LEACE spreads the forgotten samples over half the
#: target class's (Gaussian optimal-transport) spread, so they blend in rather than collapse.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"leace": {"match": 0.5}}
_CG_TOLERANCE = 1e-4  # relative residual at which the conjugate-gradient solve stops (the moments are noisier)
NO_GROUP = -1  # the "runner-up" key when outputs are not per-class scores (redirect="nearest")


# --------------------------------------------------------------------------- statistics


@dataclass
class LatentGroupStatistics:
    """Streamed float64 moments of the latent endpoint ``z_k`` (``groups``) and start ``z_0``
    (``start``) per ``(class, runner-up)`` group.

    ``metric[g]`` sums the decoder's ``Jᵀ J`` over the group (``None`` when not collected).
    ``n_outputs`` is the width of the model's ``(batch, classes)`` output, else ``None``.
    Memory is ``O(groups · d²)`` whatever the number of samples.
    """

    latent_dim: int
    forget: tuple[int, ...]
    groups: dict[tuple[int, int], StreamingMoments] = field(default_factory=dict)
    start: dict[tuple[int, int], StreamingMoments] = field(default_factory=dict)
    metric: dict[tuple[int, int], torch.Tensor] | None = None
    metric_n: dict[tuple[int, int], int] = field(default_factory=dict)
    n_outputs: int | None = None
    seconds: float = 0.0
    labels: str = "loader"
    redirect: str = "runner_up"
    metric_kind: str = "decoder"
    src: str | None = None
    dst: str | None = None
    power: torch.Tensor | None = None  # E K^k of the surrogate the latents came from
    reservoir: SampleReservoir | None = None  # a bounded sample of the rows, for the refinement

    @property
    def classes(self) -> list[int]:
        return sorted({c for c, _ in self.groups})

    def counts(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for (c, _), m in self.groups.items():
            out[c] = out.get(c, 0) + m.n
        return dict(sorted(out.items()))

    def class_moments(self, classes: Iterable[int]) -> tuple[int, torch.Tensor, torch.Tensor]:
        """``(n, mean, population covariance)`` of the union of ``classes`` (Chan merge)."""
        wanted = set(classes)
        parts = [m for (c, _), m in self.groups.items() if c in wanted and m.n > 0]
        return _pool([(m.n, m.mean_x, m.cov_xx) for m in parts])

    def metric_total(self, key: tuple[int, int]) -> torch.Tensor:
        """Estimated sum of ``Jᵀ J`` over the whole group, from the rows where it was sampled."""
        assert self.metric is not None
        if self.metric_n.get(key):
            return self.metric[key] * (self.groups[key].n / self.metric_n[key])
        return self._pooled_metric() * self.groups[key].n  # never sampled: the average

    def _pooled_metric(self) -> torch.Tensor:
        assert self.metric is not None
        return sum(self.metric.values()) / max(sum(self.metric_n.values()), 1)

    def metric_trace_total(self) -> float:
        """``Σ_g trace(metric_total(g))`` without forming the matrices."""
        assert self.metric is not None
        pooled = None
        out = 0.0
        for key, m in self.groups.items():
            if self.metric_n.get(key):
                out += float(self.metric[key].trace()) * m.n / self.metric_n[key]
            else:
                pooled = float(self._pooled_metric().trace()) if pooled is None else pooled
                out += pooled * m.n
        return out

    def update(
        self,
        labels: torch.Tensor,
        keys: torch.Tensor,
        z0: torch.Tensor,
        z: torch.Tensor,
        jac: torch.Tensor | None,
        jac_rows: torch.Tensor | None = None,
    ) -> None:
        """Fold a batch in: class ``labels``, group ``keys``, ``z_0``, ``z_k`` and decoder Jacobians
        (``jac`` holds the Jacobians of the rows ``jac_rows`` only; all rows by default)."""
        labels, keys = labels.reshape(-1).long().cpu(), keys.reshape(-1).long().cpu()
        if len(labels) != len(z):
            raise ValueError(f"got {len(labels)} labels for a batch of {len(z)} samples")
        pairs = torch.stack([labels, keys], 1).unique(dim=0).tolist()
        for c, s in pairs:
            mask = (labels == c) & (keys == s)
            key = (int(c), int(s))
            if key not in self.groups:
                self.groups[key] = StreamingMoments(self.latent_dim)
                self.start[key] = StreamingMoments(self.latent_dim)
            self.groups[key].update(z[mask.to(z.device)])
            self.start[key].update(z0[mask.to(z0.device)])
            if jac is not None:
                assert self.metric is not None
                sampled = mask if jac_rows is None else mask[jac_rows]
                j = jac[sampled.to(jac.device)]
                part = torch.einsum("boi,boj->ij", j, j).cpu()
                self.metric[key] = self.metric[key] + part if key in self.metric else part
                self.metric_n[key] = self.metric_n.get(key, 0) + len(j)


def _pool(parts: Sequence[tuple[int, torch.Tensor, torch.Tensor]]) -> tuple[int, torch.Tensor, torch.Tensor]:
    n = sum(p[0] for p in parts)
    mean = sum(p[0] * p[1] for p in parts) / n
    cov = sum(p[0] * (p[2] + torch.outer(p[1] - mean, p[1] - mean)) for p in parts) / n
    return n, mean, cov


def _scores(output: Any) -> torch.Tensor:
    return OutputSelector(None, "model output").get(output)


def _apply(h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Rows ``z`` through the homogeneous map ``h``."""
    zh = torch.cat([z, torch.ones_like(z[:, :1])], dim=1) @ h.T.to(z)
    return zh[:, :-1] / zh[:, -1:]


def _decoder_jacobian(decoder: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians of the decoder at rows ``z``: ``(b, out, d)`` float64."""
    z = z.detach().float()

    def one(v: torch.Tensor) -> torch.Tensor:
        return decoder(v.unsqueeze(0)).squeeze(0)

    try:
        jac = torch.func.vmap(torch.func.jacrev(one))(z)
    except Exception:  # noqa: BLE001 - modules torch.func cannot trace: one backward per output
        with torch.enable_grad():
            zg = z.clone().requires_grad_(True)
            out = decoder(zg).reshape(len(z), -1)
            rows = [torch.autograd.grad(out[:, j].sum(), zg, retain_graph=True)[0] for j in range(out.shape[1])]
        jac = torch.stack(rows, 1)
    return jac.reshape(len(z), -1, z.shape[1]).double()


def latent_statistics(
    probe: Any,
    loader: Iterable,
    forget_classes: Sequence[int] = (),
    labels: str = "loader",
    surrogate: KoopmanSurrogate | None = None,
    redirect: str = "runner_up",
    metric: str = "decoder",
    metric_rows: int = 64,
    seed: int = 0,
    refine_rows: int = 0,
) -> LatentGroupStatistics:
    """Stream ``loader`` once through ``probe``'s hooks and group the latent endpoints.

    Samples are grouped by class (the loader's labels, or the model's argmax with
    ``labels="model"``) and, with ``redirect="runner_up"`` and per-class scores as output,
    by the class the model ranks next: the best retained class for samples of a forgotten
    class, the best other class for the rest. The model runs in eval mode without gradients
    (flags restored afterwards); only the decoder is differentiated for ``metric="decoder"``.
    The full model runs when its output is needed (first batch, ``labels="model"``,
    ``redirect="runner_up"``); otherwise the pass stops after the last probed layer.
    ``refine_rows > 0`` also keeps a seeded sample of that many rows (inputs, classes,
    runner-ups, the model's predictions) for :func:`~koopman_hooks.unlearning.refine.refine_readout`.
    """
    if labels not in LABEL_SOURCES:
        raise ValueError(f"labels must be one of {LABEL_SOURCES}, got {labels!r}")
    if redirect not in REDIRECTS:
        raise ValueError(f"redirect must be one of {REDIRECTS}, got {redirect!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    start = time.perf_counter()
    surrogate = surrogate if surrogate is not None else probe.surrogate()
    device = surrogate.operator.device
    stats = LatentGroupStatistics(
        surrogate.latent_dim, tuple(sorted(set(forget_classes))), labels=labels, redirect=redirect,
        metric_kind=metric, src=surrogate.src_layer, dst=surrogate.dst_layer,
    )
    generator = torch.Generator().manual_seed(seed)
    if metric == "decoder":
        stats.metric = {}
    if refine_rows > 0:
        stats.reservoir = SampleReservoir(int(refine_rows), seed)
    # the latent the decoder reads: E K^k z_0 (E is the identity unless already edited)
    power = surrogate.readout.double() @ torch.linalg.matrix_power(surrogate.operator.double(), surrogate.steps)
    stats.power = power.detach().cpu()
    forget = torch.tensor(sorted(set(forget_classes)), dtype=torch.long)
    need_output = labels == "model" or redirect == "runner_up"
    with preserved_state(probe.model):
        for i, batch in enumerate(loader):
            with torch.no_grad():
                captured = probe._forward(batch, stop_early=not need_output and i > 0)
            scores = None
            if captured.output is not None and (i == 0 or need_output):
                scores = _scores(captured.output).detach()
                if i == 0:
                    stats.n_outputs = int(scores.shape[-1]) if scores.dim() == 2 else None
                if scores.dim() != 2:
                    scores = None
            if labels == "model":
                if scores is None:
                    raise ValueError('labels="model" needs a model whose output is (batch, classes) scores')
                y = scores.argmax(dim=-1).cpu()
            else:
                if captured.labels is None:
                    raise ValueError('labels="loader" needs labelled batches; pass labels="model" to use predictions')
                y = torch.as_tensor(captured.labels).cpu()
                if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
                    raise ValueError(f"expected integer class labels of shape (batch,), got {tuple(y.shape)} {y.dtype}")
            keys = _runner_up(scores, y, forget) if redirect == "runner_up" and scores is not None else None
            if keys is None:
                keys = torch.full_like(y, NO_GROUP)
            x0 = captured.activations[surrogate.src_layer].to(device, torch.float32)
            with torch.no_grad():
                z0 = surrogate.encode(x0).double()
                z = _apply(power, z0)
            jac = rows = None
            if metric == "decoder":  # the pull-back metric is averaged over a seeded subsample of rows
                rows = torch.randperm(len(z), generator=generator)[:metric_rows].sort().values
                jac = _decoder_jacobian(surrogate.decoder, z[rows.to(z.device)])
            stats.update(y, keys, z0, z, jac, rows)
            if stats.reservoir is not None:
                predictions = scores.argmax(-1).cpu() if scores is not None else None
                stats.reservoir.update(captured.inputs, y, keys, predictions)
    if not stats.groups:
        raise ValueError("the loader yielded no batches")
    stats.seconds = time.perf_counter() - start
    return stats


def _runner_up(scores: torch.Tensor, labels: torch.Tensor, forget: torch.Tensor) -> torch.Tensor:
    """Best retained class for forgotten samples; best class other than the label otherwise."""
    scores = scores.detach().float().cpu().clone()
    n = scores.shape[1]
    rows = torch.arange(len(labels))
    in_range = (labels >= 0) & (labels < n)
    other = scores.clone()
    other[rows[in_range], labels[in_range]] = -torch.inf
    keys = other.argmax(1)
    valid_forget = forget[(forget >= 0) & (forget < n)]
    if len(valid_forget) and len(valid_forget) < n:
        retained = scores.clone()
        retained[:, valid_forget] = -torch.inf
        is_forget = torch.isin(labels, forget)
        keys = torch.where(is_forget, retained.argmax(1), keys)
    return keys


# --------------------------------------------------------------------------- validation


def _forget_list(forget_class: Any) -> list[int]:
    if isinstance(forget_class, (np.ndarray, torch.Tensor)):
        items = forget_class.reshape(-1).tolist()
    elif isinstance(forget_class, Sequence) and not isinstance(forget_class, str):
        items = list(forget_class)
    else:
        items = [forget_class]
    out: list[int] = []
    for c in items:
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
            raise TypeError(f"forget_class must be an int or a sequence of ints, got {c!r} ({type(c).__name__})")
        if c < 0:
            raise ValueError(f"forget class {int(c)} is negative; classes are indices 0, 1, ...")
        if int(c) not in out:
            out.append(int(c))
    if not out:
        raise ValueError("forget_class is empty: name at least one class to forget")
    return out


def _check_reusable(stats: LatentGroupStatistics, forget: list[int], labels: str, surrogate: KoopmanSurrogate,
                    opts: dict[str, Any]) -> None:
    """Raise unless ``stats`` equal what a fresh pass would collect for this edit."""
    wanted = {"labels": labels, "redirect": opts["redirect"], "metric": opts["metric"],
              "src": surrogate.src_layer, "dst": surrogate.dst_layer}
    got = {"labels": stats.labels, "redirect": stats.redirect, "metric": stats.metric_kind,
           "src": stats.src, "dst": stats.dst}
    for key, value in wanted.items():
        if got[key] != value:
            raise ValueError(f"these statistics were collected with {key}={got[key]!r}, the edit needs {value!r}; "
                             "collect them again with probe.unlearning_statistics(...)")
    power = surrogate.readout.double() @ torch.linalg.matrix_power(surrogate.operator.double(), surrogate.steps)
    if stats.power is None or not torch.allclose(stats.power, power.cpu(), rtol=1e-6, atol=1e-9):
        raise ValueError("these statistics come from a different surrogate (other operator or readout); "
                         "collect them again with probe.unlearning_statistics(...)")
    extra = sorted(set(stats.forget) - set(forget))
    if extra:
        raise ValueError(f"these statistics were collected to forget {list(stats.forget)}, which includes "
                         f"{extra} not forgotten now; collect them with forget_class={forget} or none")
    clash = sorted({(c, s) for c, s in stats.groups if c in forget and s in forget})
    if clash:
        raise ValueError(f"forgotten samples whose runner-up class is also forgotten {clash[:3]}: collect the "
                         f"statistics with probe.unlearning_statistics(loader, forget_class={forget})")


def _check_classes(forget: list[int], stats: LatentGroupStatistics, labels: str = "loader") -> list[int]:
    seen = stats.classes
    where = "in the loader" if labels == "loader" else "among the model's predictions on the loader"
    for c in forget:
        if stats.n_outputs is not None and c >= stats.n_outputs:
            raise ValueError(
                f"forget class {c} is out of range: the model scores {stats.n_outputs} classes "
                f"(0..{stats.n_outputs - 1}); classes seen in the loader: {seen}"
            )
        if c not in seen:
            raise ValueError(f"forget class {c} never appears {where}; classes seen: {seen}")
    retained = [c for c in seen if c not in forget]
    if not retained:
        raise ValueError(f"cannot forget every class at once: forget {forget}, classes seen {seen}")
    return retained


# --------------------------------------------------------------------------- the edits


def _homogeneous_moment(m: StreamingMoments) -> torch.Tensor:
    d = m.mean_x.shape[0]
    out = torch.empty(d + 1, d + 1, dtype=torch.float64)
    out[:d, :d] = m.cov_xx + torch.outer(m.mean_x, m.mean_x)
    out[:d, d] = out[d, :d] = m.mean_x
    out[d, d] = 1.0
    return out


def _targets(stats: LatentGroupStatistics, retained: list[int], opts: dict[str, Any]) -> dict[tuple[int, int], int]:
    """Retained class each forgotten group is sent to."""
    n, _, _ = stats.class_moments(stats.classes)
    means = {c: stats.class_moments([c])[1] for c in retained}
    # within-class pooled covariance (for the "nearest" fallback)
    within = sum(stats.class_moments([c])[0] * stats.class_moments([c])[2] for c in stats.classes) / n
    eye = torch.eye(len(within), dtype=within.dtype)
    within = within + opts["ridge"] * within.diagonal().mean().clamp_min(1e-12) * eye
    out = {}
    for (c, s), m in stats.groups.items():
        if c not in stats.forget:
            continue
        if s in means:
            out[(c, s)] = s
        else:  # no runner-up: the retained class whose mean is nearest (Mahalanobis, within-class)
            dist = {r: float((m.mean_x - mu) @ torch.linalg.solve(within, m.mean_x - mu)) for r, mu in means.items()}
            out[(c, s)] = min(dist, key=dist.__getitem__)
    return out


def redirect_map(stats: LatentGroupStatistics, retained: list[int], **options: Any) -> torch.Tensor:
    """The homogeneous ``(d+1, d+1)`` float64 redirect ``E`` (see the module docstring)."""
    opts = {**DEFAULTS, **options}
    d = stats.latent_dim
    eye = torch.eye(d, dtype=torch.float64)
    targets = _targets(stats, retained, opts)
    class_mean = {c: stats.class_moments([c])[1] for c in retained}
    class_cov = {c: stats.class_moments([c])[2] for c in retained}
    terms = []  # (weight, moment, target rows (d, d+1), metric or None)
    for w, key, metric in _metric_terms(stats, opts, targets):
        m = stats.groups[key]
        if key in targets:
            spread = _spread_map(m.cov_xx, class_cov[targets[key]], opts["spread"], opts["match"], opts["ridge"])
            target = homogeneous(spread, class_mean[targets[key]] - spread @ m.mean_x)[:d]
        else:
            beta = opts["contract"]
            target = homogeneous(beta * eye, (1 - beta) * m.mean_x)[:d]
        terms.append((w, _homogeneous_moment(m), target, metric))
    ridge = opts["ridge"] * float(sum(w * mom[:d, :d].diagonal().mean() for w, mom, _, _ in terms))
    identity = torch.eye(d + 1, dtype=torch.float64)[:d]
    if terms[0][3] is None:  # Euclidean: E = (Σ w T M + ρ I)(Σ w M + ρ I)⁻¹
        lhs = sum(w * mom for w, mom, _, _ in terms) + ridge * torch.eye(d + 1, dtype=torch.float64)
        rhs = sum(w * t @ mom for w, mom, t, _ in terms) + ridge * identity
        top = torch.linalg.solve(lhs.T, rhs.T).T
    else:
        top = _solve_metric_ls(terms, ridge, identity, opts["solver"])
    out = torch.eye(d + 1, dtype=torch.float64)
    out[:d] = top
    return out


def _sym_sqrt(a: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh((a + a.T) / 2)
    evals = evals.clamp_min(evals.max().clamp_min(1e-300) * 1e-12)
    return (evecs * (evals.rsqrt() if inverse else evals.sqrt())) @ evecs.T


def _spread_map(source: torch.Tensor, target: torch.Tensor, spread: float, match: float, ridge: float) -> torch.Tensor:
    """Linear part of a forgotten group's target: ``spread · I + match · A_OT``, with ``A_OT`` the
    Gaussian optimal-transport map ``Σ_t^½ (Σ_t^½ Σ_g Σ_t^½)^-½ Σ_t^½`` onto the target class."""
    eye = torch.eye(len(source), dtype=torch.float64)
    out = float(spread) * eye
    if match:
        source = source + ridge * source.diagonal().mean().clamp_min(1e-12) * eye
        root_t = _sym_sqrt(target)
        out = out + float(match) * (root_t @ _sym_sqrt(root_t @ source @ root_t, inverse=True) @ root_t)
    return out


def _solve_metric_ls(terms: list, ridge: float, identity: torch.Tensor, solver: str) -> torch.Tensor:
    """Solve ``Σ w G (X − T) M + ρ (X − I) = 0`` for ``X`` (``d × (d+1)``).

    Terms that share a metric ``G`` (the same tensor object) are merged first, so the cost
    grows with the number of distinct metrics (one per retained class), not of groups."""
    d, d1 = identity.shape
    merged: dict[int, list] = {}  # id(G) -> [G, Σ w M, Σ w T M]
    for w, mom, t, g in terms:
        entry = merged.setdefault(id(g), [g, torch.zeros_like(mom), torch.zeros_like(identity)])
        entry[1] = entry[1] + w * mom
        entry[2] = entry[2] + w * t @ mom
    parts = list(merged.values())
    rhs = sum(g @ tm for g, _, tm in parts) + ridge * identity
    if solver == "direct" or (solver == "auto" and d * d1 <= 2500):
        big = sum(torch.kron(m, g) for g, m, _ in parts)
        big = big + ridge * torch.eye(d * d1, dtype=torch.float64)
        # column-major vec: vec(G X M) = (Mᵀ ⊗ G) vec(X)
        return torch.linalg.solve(big, rhs.T.reshape(-1)).reshape(d1, d).T
    # preconditioned conjugate gradients on the same SPD operator, from the Euclidean solution;
    # the preconditioner inverts the Kronecker average  X -> Ḡ X M̄. The iterations run in
    # float32 (twice as fast; the 1e-4 stopping residual is far above its precision).
    parts = [(g.float(), m.float(), tm) for g, m, tm in parts]
    rhs = rhs.float()

    def op(x: torch.Tensor) -> torch.Tensor:
        return sum(g @ x @ m for g, m, _ in parts) + ridge * x

    weight = sum(float(m[-1, -1]) for _, m, _ in parts)  # Σ w: the moments' constant entry is 1
    m_bar = sum(m.double() for _, m, _ in parts) + ridge * torch.eye(d1, dtype=torch.float64)
    g_bar = sum(float(m[-1, -1]) * g.double() for g, m, _ in parts) / weight
    m_inv, g_inv = torch.linalg.inv(m_bar).float(), torch.linalg.inv(g_bar).float()

    def precondition(r: torch.Tensor) -> torch.Tensor:
        return g_inv @ r @ m_inv

    x = torch.linalg.solve(m_bar.T, (sum(tm for _, _, tm in parts) + ridge * identity).T).T.float()
    r = rhs - op(x)
    z = precondition(r)
    p = z.clone()
    rz = (r * z).sum()
    tol = _CG_TOLERANCE**2 * max(float((rhs * rhs).sum()), 1e-300)
    for _ in range(10 * d1):
        if float((r * r).sum()) <= tol:
            break
        ap = op(p)
        alpha = rz / (p * ap).sum()
        x = x + alpha * p
        r = r - alpha * ap
        z = precondition(r)
        rz_new = (r * z).sum()
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x.double()


def _transformed_moments(
    stats: LatentGroupStatistics, edit: torch.Tensor
) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """``(class, n, mean, cov)`` of every group after the homogeneous affine ``edit``."""
    d = stats.latent_dim
    a, b = edit[:d, :d], edit[:d, d]
    return [(c, m.n, a @ m.mean_x + b, a @ m.cov_xx @ a.T) for (c, _), m in stats.groups.items() if m.n > 0]


def leace_map(stats: LatentGroupStatistics, retained: list[int], edit: torch.Tensor | None = None) -> torch.Tensor:
    """LEACE of the forgotten classes' indicators on the (edited) latent endpoint, as a homogeneous map.

    The eraser ``z -> z − P (z − μ_R)`` comes from :class:`LeaceStatistics`, filled from the
    streamed group moments (after ``edit`` when given); it is anchored at the retained mean
    ``μ_R``, so the retained classes' mean stays put and every forgotten class's mean moves onto it.
    """
    d = stats.latent_dim
    edit = edit if edit is not None else torch.eye(d + 1, dtype=torch.float64)
    parts = _transformed_moments(stats, edit)
    forget = sorted(stats.forget)
    n, mean, cov = _pool([(k, mu, s) for _, k, mu, s in parts])
    lstats = LeaceStatistics(d, len(forget))
    lstats.n = n
    lstats.mean_x = mean
    lstats.m_xx = cov * n
    for j, f in enumerate(forget):
        nf = sum(k for c, k, _, _ in parts if c == f)
        mf = sum(k * mu for c, k, mu, _ in parts if c == f) / nf
        lstats.mean_z[j] = nf / n
        lstats.m_xz[:, j] = nf * (mf - mean)
    eraser = lstats.eraser()
    proj = eraser.proj.double()
    _, mean_r, _ = _pool([(k, mu, s) for c, k, mu, s in parts if c in retained])
    return homogeneous(torch.eye(d, dtype=torch.float64) - proj, proj @ mean_r) @ edit


def _real_root(a: torch.Tensor, steps: int) -> torch.Tensor:
    """Principal ``steps``-th root of ``a`` from its eigendecomposition, real part (float64).

    Exact for a diagonalisable ``a`` without negative real eigenvalues (conjugate pairs keep
    real roots); otherwise the real part is the closest real candidate and the caller reports
    the error.
    """
    if steps == 1:
        return a.clone()
    evals, evecs = torch.linalg.eig(a.double())
    roots = evals ** (1.0 / steps)
    return (evecs @ torch.diag(roots) @ torch.linalg.inv(evecs)).real


def _metric_terms(stats: LatentGroupStatistics, opts: dict[str, Any], targets: dict) -> list:
    """``(weight, group key, metric)`` of the redirect's least-squares terms."""
    d = stats.latent_dim
    eye = torch.eye(d, dtype=torch.float64)
    total = sum(m.n for m in stats.groups.values())
    use_metric = opts["metric"] == "decoder" and stats.metric is not None
    scale = 1.0
    if use_metric:
        scale = stats.metric_trace_total() / (total * d) or 1.0
    metrics: dict[int, torch.Tensor] = {}  # one per class: its samples' mean pull-back metric

    def class_metric(c: int) -> torch.Tensor:
        if c not in metrics:
            keys = [g for g in stats.groups if g[0] == c]
            num = sum(stats.metric_total(g) for g in keys)
            metrics[c] = num / (sum(stats.groups[g].n for g in keys) * scale) + opts["metric_eps"] * eye
        return metrics[c]

    out = []
    for key, m in stats.groups.items():
        if m.n == 0:
            continue
        forgotten = key[0] in stats.forget
        w = m.n / total * (opts["strength"] if forgotten else 1.0)
        metric = class_metric(targets[key] if forgotten else key[0]) if use_metric else None
        out.append((w, key, metric))
    return out


def per_step_operator(
    stats: LatentGroupStatistics,
    operator: torch.Tensor,
    readout: torch.Tensor,
    steps: int,
    endpoint: torch.Tensor,
    opts: dict[str, Any],
    targets: dict,
    max_iter: int = 100,
) -> tuple[torch.Tensor, float]:
    """A one-step ``K'`` whose ``k``-th power carries the redirect: ``R K'^k ≈ E R K^k``.

    Minimises the redirect's own quadratic form, ``Σ_g w_g tr(G_g Δ M⁰_g Δᵀ)`` with
    ``Δ = R K'^k − E R K^k`` and ``M⁰_g`` the homogeneous moments of ``z_0``, by L-BFGS from the
    principal real ``k``-th root of ``R⁻¹ E R K^k`` (which alone is exact only when that
    matrix has no negative real eigenvalue). Returns ``K'`` and the relative residual.
    """
    d = stats.latent_dim
    k64, r64 = operator.double(), readout.double()
    goal = endpoint @ r64 @ torch.linalg.matrix_power(k64, steps)
    terms = _metric_terms(stats, opts, targets)
    weights = torch.tensor([w for w, _, _ in terms], dtype=torch.float64)
    moments = torch.stack([_homogeneous_moment(stats.start[key]) for _, key, _ in terms])
    eye = torch.eye(d, dtype=torch.float64)
    metrics = torch.stack([g if g is not None else eye for _, _, g in terms])

    def loss_of(top: torch.Tensor) -> torch.Tensor:
        full = torch.cat([top, last])
        delta = (r64 @ torch.linalg.matrix_power(full, steps) - goal)[:d]
        # Σ_g w_g tr(G_g Δ M_g Δᵀ) = Σ_g w_g Σ (G_g Δ M_g) ⊙ Δ
        return (weights[:, None, None] * (metrics @ delta) * (delta @ moments)).sum()

    last = torch.zeros(1, d + 1, dtype=torch.float64)
    last[0, d] = 1.0
    try:
        root = _real_root(torch.linalg.solve(r64, goal), steps)
    except RuntimeError:  # singular readout
        root = k64.clone()
    candidates = [root[:d], k64[:d]] if torch.isfinite(root).all() else [k64[:d]]

    with torch.no_grad():
        losses = [float(loss_of(c)) for c in candidates]
    top = candidates[int(np.argmin(losses))].clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS(
        [top], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-12, tolerance_change=1e-15
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        value = loss_of(top)
        value.backward()
        return value

    with torch.enable_grad():
        optimiser.step(closure)
    with torch.no_grad():
        result = torch.cat([top.detach(), last])
        delta = r64 @ torch.linalg.matrix_power(result, steps) - goal
        error = float(delta.norm() / goal.norm().clamp_min(1e-300))
    return result, error


# --------------------------------------------------------------------------- entry point


def unlearn(
    probe: Any,
    forget_class: int | Sequence[int],
    loader: Iterable,
    method: str = "endpoint",
    labels: str = "loader",
    **options: Any,
) -> KoopmanSurrogate:
    """Make the surrogate forget ``forget_class`` by editing its linear latent dynamics.

    Args:
        probe: a fitted :class:`~koopman_hooks.probe.KoopmanProbe`; the model is only read.
        forget_class: a class index or a sequence of them (not all classes).
        loader: labelled batches (or any batches with ``labels="model"``), streamed once; or
            the statistics of such a pass from ``probe.unlearning_statistics(loader)``, collected
            once and reused for every single-class edit (the edit is then all that runs).
        method: ``"endpoint"`` (edit the readout ``E``), ``"per_step"`` (edit ``K`` so that
            its ``k``-th power carries the redirect) or ``"leace"`` (the redirect followed by
            a latent LEACE eraser of the forgotten classes' indicators).
        labels: class membership from the ``"loader"`` or from the ``"model"``'s predictions.
        **options: ``src``/``dst`` (layers of the surrogate), and the knobs in
            :data:`DEFAULTS`: ``strength``, ``contract``, ``spread``, ``match``, ``metric``
            (``"decoder"``/``"euclidean"``), ``metric_eps``, ``redirect`` (``"runner_up"``, or
            ``"nearest"`` class mean, which also lets loader-labelled passes stop after the
            last probed layer), ``ridge``, ``iterations``, ``solver``, and the refinement on
            the patched outputs: ``refine`` (L-BFGS iterations, 0 turns it off),
            ``refine_rows``, ``proximal``, ``retain_weight``.

    Returns:
        ``probe.surrogate(src, dst).edited(...)``: a new surrogate, saved/loaded like any
        other, whose ``info`` records ``method``, ``forget_classes``, ``labels``, the options,
        ``edit_seconds`` and ``stats_seconds`` (and ``power_error``, the relative error of
        ``K'^k`` against the endpoint redirect, for ``"per_step"``).

    Raises:
        TypeError: a class that is not an int. ValueError: a negative class, a class out of
        the model's output range or never seen in the loader, or every class at once.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    forget = _forget_list(forget_class)
    src, dst = options.pop("src", None), options.pop("dst", None)
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}; known: {sorted(DEFAULTS)} and src, dst")
    if options.get("solver", "auto") not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {options['solver']!r}")
    opts = {**DEFAULTS, **METHOD_DEFAULTS.get(method, {}), **options}
    surrogate = probe.surrogate(src, dst)
    if isinstance(loader, LatentGroupStatistics):
        _check_reusable(loader, forget, labels, surrogate, opts)
        stats = replace(loader, forget=tuple(sorted(forget)))  # shares the moments, not copied
    else:
        stats = latent_statistics(probe, loader, forget, labels, surrogate, opts["redirect"], opts["metric"],
                                  opts["metric_rows"], refine_rows=opts["refine_rows"] if opts["refine"] else 0)
    retained = _check_classes(forget, stats, labels)

    start = time.perf_counter()
    endpoint = redirect_map(stats, retained, **opts)
    operator, readout, extra = None, None, {}
    if opts["refine"]:
        if stats.reservoir is None or not len(stats.reservoir):
            raise ValueError("refine > 0 needs statistics with a sample of rows: collect them with "
                             "probe.unlearning_statistics(loader, refine_rows=...) or pass refine=0")
        base = surrogate.readout.double()
        refined, extra = refine_readout(probe, surrogate, endpoint @ base, stats.reservoir, forget, retained,
                                        iterations=int(opts["refine"]), proximal=float(opts["proximal"]),
                                        retain_weight=float(opts["retain_weight"]))
        endpoint = refined.double().cpu() @ torch.linalg.inv(base)
    if method == "endpoint":
        readout = endpoint @ surrogate.readout.double()
    elif method == "leace":
        readout = leace_map(stats, retained, endpoint) @ surrogate.readout.double()
    else:
        operator, err = per_step_operator(
            stats, surrogate.operator, surrogate.readout, surrogate.steps, endpoint, opts,
            _targets(stats, retained, opts), max_iter=int(opts["iterations"]),
        )
        extra["power_error"] = err
    edit_seconds = time.perf_counter() - start
    info = {
        "method": method,
        "forget_classes": forget,
        "retained_classes": retained,
        "labels": labels,
        "options": {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in opts.items()},
        "class_counts": {str(c): n for c, n in stats.counts().items()},
        "edit_seconds": edit_seconds,
        "stats_seconds": stats.seconds,
        "stats_reused": isinstance(loader, LatentGroupStatistics),
        **extra,
    }
    return surrogate.edited(operator=operator, readout=readout, **info)
