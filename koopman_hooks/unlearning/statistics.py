"""The statistics an unlearning edit needs, streamed in one pass and mergeable across processes.

Samples are grouped by ``(class, runner-up)``: the class (the loader's label, or the model's
argmax) and the class the model ranks next. Per group the float64 moments of the latent start
``z_0`` and of the endpoint ``z_k = E K^k z_0`` are kept, plus (for the decoder metric) the sum
of the decoder's ``Jᵀ J`` (over every row for the autoencoder's decoder, see
:mod:`~koopman_hooks.unlearning.metric`): memory ``O(groups · d²)`` whatever
the number of samples.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from koopman_hooks.core import distributed
from koopman_hooks.core.batches import Inputs, class_labels
from koopman_hooks.core.hooks import preserved_state
from koopman_hooks.core.select import MODEL_OUTPUT
from koopman_hooks.errors import EmptyLoaderError
from koopman_hooks.fitting.fitted import FittedProbe
from koopman_hooks.fitting.passes import inputs_of, is_input_field
from koopman_hooks.koopman.surrogate import KoopmanSurrogate
from koopman_hooks.maths.linalg import apply_homogeneous
from koopman_hooks.maths.rng import preserved_host_streams
from koopman_hooks.maths.stats import StreamingMoments
from koopman_hooks.unlearning.metric import PullbackMetric, row_groups
from koopman_hooks.unlearning.options import LabelSource, Metric, Redirect
from koopman_hooks.unlearning.refine import SampleReservoir

Group = tuple[int, int]
NO_GROUP = -1  # the "runner-up" key when outputs are not per-class scores (redirect="nearest")
RANKED_CLASSES = 8  # the refinement sample keeps each row's best classes, this many at most


@dataclass
class LatentGroupStatistics:
    """Streamed moments of ``z_k`` (``groups``) and ``z_0`` (``start``) per ``(class, runner-up)``.

    ``metric[g]`` sums the decoder's ``Jᵀ J`` over the rows of group ``g`` where it was taken
    (``metric_n[g]`` of them: all of the group's for the autoencoder's decoder; ``None`` when not
    collected). ``n_outputs`` is the width of the model's ``(batch, classes)`` output, else
    ``None``. ``power`` is ``E K^k`` of the surrogate the latents came from; ``reservoir`` a
    bounded sample of rows for the refinement.
    """

    latent_dim: int
    forget: tuple[int, ...]
    groups: dict[Group, StreamingMoments] = field(default_factory=dict)
    start: dict[Group, StreamingMoments] = field(default_factory=dict)
    metric: dict[Group, torch.Tensor] | None = None
    metric_n: dict[Group, int] = field(default_factory=dict)
    n_outputs: int | None = None
    seconds: float = 0.0
    labels: LabelSource = "loader"
    redirect: Redirect = "runner_up"
    metric_kind: Metric = "decoder"
    src: str | None = None
    dst: str | None = None
    power: torch.Tensor | None = None
    reservoir: SampleReservoir | None = None
    # (rows sampled, their mean metric): every change of `metric` adds sampled rows
    _pooled: tuple[int, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def classes(self) -> list[int]:
        return sorted({c for c, _ in self.groups})

    @property
    def n(self) -> int:
        return sum(m.n for m in self.groups.values())

    def counts(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for (c, _), m in self.groups.items():
            out[c] = out.get(c, 0) + m.n
        return dict(sorted(out.items()))

    def class_moments(self, classes: Iterable[int]) -> StreamingMoments:
        """Moments of ``z_k`` over the union of ``classes``."""
        wanted = set(classes)
        return StreamingMoments.pooled(m for (c, _), m in self.groups.items() if c in wanted)

    def with_forget(self, forget: Sequence[int]) -> LatentGroupStatistics:
        """The same statistics (shared, not copied) for an edit that forgets ``forget``."""
        return dataclasses.replace(self, forget=tuple(sorted(forget)))

    def metric_total(self, key: Group) -> torch.Tensor:
        """Sum of ``Jᵀ J`` over the whole group (estimated from the rows where it was taken)."""
        assert self.metric is not None
        if self.metric_n.get(key):
            return self.metric[key] * (self.groups[key].n / self.metric_n[key])
        return self._pooled_metric() * self.groups[key].n  # never sampled: the average

    def _pooled_metric(self) -> torch.Tensor:
        assert self.metric is not None
        rows = sum(self.metric_n.values())
        if self._pooled is None or self._pooled[0] != rows:
            total = torch.zeros_like(next(iter(self.metric.values())))
            for value in self.metric.values():
                total += value
            self._pooled = (rows, total / max(rows, 1))
        return self._pooled[1]

    def metric_trace_total(self) -> float:
        """``Σ_g trace(metric_total(g))`` without forming the matrices."""
        assert self.metric is not None
        pooled: float | None = None
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
    ) -> LatentGroupStatistics:
        """Fold a batch in: class ``labels``, group ``keys``, ``z_0``, ``z_k`` and decoder Jacobians
        (``jac`` holds the Jacobians of the rows ``jac_rows`` only; all rows by default)."""
        labels, keys = labels.reshape(-1).long().cpu(), keys.reshape(-1).long().cpu()
        if len(labels) != len(z):
            raise ValueError(f"got {len(labels)} labels for a batch of {len(z)} samples")
        for key, mask in row_groups(labels, keys):
            if key not in self.groups:
                self.groups[key] = StreamingMoments(self.latent_dim)
                self.start[key] = StreamingMoments(self.latent_dim)
            self.groups[key].update(z[mask.to(z.device)].cpu())
            self.start[key].update(z0[mask.to(z0.device)].cpu())
            if jac is not None:
                assert self.metric is not None
                sampled = mask if jac_rows is None else mask[jac_rows]
                j = jac[sampled.to(jac.device)]
                part = torch.einsum("boi,boj->ij", j, j).cpu()
                self.metric[key] = self.metric[key] + part if key in self.metric else part
                self.metric_n[key] = self.metric_n.get(key, 0) + len(j)
        return self

    def merge(self, other: LatentGroupStatistics) -> LatentGroupStatistics:
        """Fold in the statistics of another, disjoint set of samples; returns ``self``."""
        same = ("latent_dim", "forget", "labels", "redirect", "metric_kind", "src", "dst")
        for name in same:
            if getattr(self, name) != getattr(other, name):
                raise ValueError(f"cannot merge statistics collected with other {name}: "
                                 f"{getattr(self, name)!r} vs {getattr(other, name)!r}")
        for key, moments in other.groups.items():
            if key not in self.groups:
                self.groups[key] = StreamingMoments(self.latent_dim)
                self.start[key] = StreamingMoments(self.latent_dim)
            self.groups[key].merge(moments)
            self.start[key].merge(other.start[key])
        if other.metric is not None:
            self.metric = {} if self.metric is None else self.metric
            for key, value in other.metric.items():
                self.metric[key] = self.metric[key] + value if key in self.metric else value.clone()
                self.metric_n[key] = self.metric_n.get(key, 0) + other.metric_n[key]
        self.n_outputs = self.n_outputs if self.n_outputs is not None else other.n_outputs
        if other.reservoir is not None:
            self.reservoir = other.reservoir if self.reservoir is None else self.reservoir.merge(other.reservoir)
        self.seconds = max(self.seconds, other.seconds)
        return self


def runner_up(scores: torch.Tensor, labels: torch.Tensor, forget: torch.Tensor) -> torch.Tensor:
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
        keys = torch.where(torch.isin(labels, forget), retained.argmax(1), keys)
    return keys


def _class_labels(given: Any, scores: torch.Tensor | None, labels: LabelSource, n_outputs: int | None) -> torch.Tensor:
    if labels == "model":
        if scores is None:
            raise ValueError('labels="model" needs a model whose output is (batch, classes) scores')
        return scores.argmax(dim=-1).cpu()
    if given is None:
        raise ValueError('labels="loader" needs labelled batches; pass labels="model" to use predictions')
    return class_labels(given, n_outputs)


@dataclass
class _Folder:
    """What :func:`collect_statistics` folds in per batch, wherever the rows come from."""

    stats: LatentGroupStatistics
    surrogate: KoopmanSurrogate
    forget: torch.Tensor
    metric: PullbackMetric | None  # the decoder's pull-back metric (metric="decoder")

    def fold(self, given_labels: Any, scores: torch.Tensor | None, states: torch.Tensor, inputs: Inputs | None) -> None:
        """One batch: its loader labels, the model's ``(batch, classes)`` scores (or ``None``) and
        the source layer's adapted ``states``; ``inputs``: the batch's model inputs for the
        refinement sample (``None``: the refinement reads the states alone). Scores are used
        only where the grouping needs them (``labels="model"`` or ``redirect="runner_up"``)."""
        stats, surrogate = self.stats, self.surrogate
        if not (stats.labels == "model" or stats.redirect == "runner_up"):
            scores = None
        y = _class_labels(given_labels, scores, stats.labels, stats.n_outputs)
        keys = None
        if stats.redirect == "runner_up" and scores is not None:
            keys = runner_up(scores, y, self.forget)
        if keys is None:
            keys = torch.full_like(y, NO_GROUP)
        assert stats.power is not None
        with torch.no_grad():
            z0 = surrogate.encoder(states).double()
            z = apply_homogeneous(stats.power.to(z0.device), z0)
        stats.update(y, keys, z0, z, None)
        if self.metric is not None:
            self.metric.update(y, keys, z)
        if stats.reservoir is not None:
            predictions = None  # the model's classes best first: a retained row's target skips forgotten ones
            if scores is not None:
                predictions = scores.topk(min(RANKED_CLASSES, scores.shape[-1]), dim=-1).indices.cpu()
            kept = torch.empty(len(y), 0) if inputs is None else inputs
            stats.reservoir.update(kept, y, keys, predictions, states)


def collect_statistics(
    probe: FittedProbe,
    loader: Iterable[Any] | None,
    forget_classes: Sequence[int] = (),
    labels: LabelSource = "loader",
    surrogate: KoopmanSurrogate | None = None,
    redirect: Redirect = "runner_up",
    metric: Metric = "decoder",
    metric_rows: int = 64,
    seed: int = 0,
    refine_rows: int = 0,
) -> LatentGroupStatistics:
    """Stream ``loader`` once through ``probe``'s hooks and group the latent endpoints.

    Samples are grouped by class (the loader's labels, or the model's argmax with
    ``labels="model"``) and, with ``redirect="runner_up"`` and per-class scores as output, by
    the class the model ranks next: the best retained class for samples of a forgotten class,
    the best other class for the rest. The model runs in eval mode without gradients (modes
    restored afterwards); only the decoder is differentiated for ``metric="decoder"``. The
    full model runs when its output is needed (first batch, ``labels="model"``,
    ``redirect="runner_up"``); otherwise the pass stops after the last probed layer.
    ``refine_rows > 0`` also keeps a seeded sample of that many rows for the refinement: their
    source-layer states, and their model inputs unless the model's tail can run from the
    states alone (then an image model's sample costs no more than its states).
    ``loader=None`` reads the rows the fit kept (``fit(loader, keep_cache=True)``): their
    states, scores and labels were cached, so the model does not run at all.
    """
    start = time.perf_counter()
    surrogate = surrogate if surrogate is not None else probe.surrogate()
    stats = LatentGroupStatistics(
        surrogate.latent_dim, tuple(sorted(set(forget_classes))), labels=labels, redirect=redirect,
        metric_kind=metric, src=surrogate.src_layer, dst=surrogate.dst_layer,
    )
    if metric == "decoder":
        stats.metric = {}
    if refine_rows > 0:
        stats.reservoir = SampleReservoir(int(refine_rows), seed)
    stats.power = surrogate.endpoint_map().detach().cpu()  # E K^k, the latent the decoder reads (E = I unless edited)
    forget = torch.tensor(sorted(set(forget_classes)), dtype=torch.long)
    pullback = None
    if metric == "decoder":
        pullback = PullbackMetric(surrogate.decoder, metric_rows, torch.Generator().manual_seed(seed))
    folder = _Folder(stats, surrogate, forget, pullback)
    if loader is None:
        seen = _from_fit_cache(probe, folder)
    else:
        seen = _from_loader(probe, loader, folder)
    if pullback is not None:
        stats.metric, stats.metric_n = pullback.totals()
    if not distributed.summed([float(seen)])[0]:
        raise EmptyLoaderError()
    stats.seconds = time.perf_counter() - start
    return distributed.merged(stats)  # every rank streamed its shard: the statistics of the union


def _from_loader(probe: FittedProbe, loader: Iterable[Any], folder: _Folder) -> bool:
    stats, surrogate = folder.stats, folder.surrogate
    device = surrogate.operator.device
    need_output = stats.labels == "model" or stats.redirect == "runner_up"
    seen = False
    # a DataLoader draws its workers' seeds from torch's stream, an augmenting one from NumPy's or
    # Python's: all three continue afterwards as if the pass had not run
    with preserved_state(probe.model), torch.random.fork_rng(devices=[]), preserved_host_streams():
        for i, batch in enumerate(loader):
            seen = True
            with torch.no_grad():
                captured = probe.capture(batch, stop_early=not need_output and i > 0)
            if i == 0 and stats.reservoir is not None:
                probe.find_tail(captured)  # a loaded probe: so that refinement runs the tail alone
            scores = None
            if captured.output is not None and (i == 0 or need_output):
                scores = MODEL_OUTPUT.get(captured.output).detach()
                if i == 0:
                    stats.n_outputs = int(scores.shape[-1]) if scores.dim() == 2 else None
                if scores.dim() != 2:
                    scores = None
            x0 = captured.activations[surrogate.src_layer].to(device, torch.float32)
            mask = probe.mask_of(captured.inputs)
            mask = None if mask is None else mask.to(device)
            with torch.no_grad():
                states = surrogate.in_adapter(x0, mask)
            inputs = None if probe.outputs_from_states(surrogate.dst_layer, captured.inputs) else captured.inputs
            folder.fold(captured.labels, scores, states, inputs)
    return seen


CACHE_BATCH = 1024  # rows of the fit's cache read at a time


def _same_adapter(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def _from_fit_cache(probe: FittedProbe, folder: _Folder) -> bool:
    """The rows the fit kept from its own loader (not ``val_loader``'s), read in chunks."""
    stats, surrogate = folder.stats, folder.surrogate
    cache, n_rows = probe.kept_rows()
    first = probe.layers[0]
    if surrogate.src_layer != first or not _same_adapter(surrogate.in_adapter, probe.adapters[first]):
        raise ValueError(f"the fit's cache holds {first!r}'s states as its adapter maps them, which is not what this "
                         f"surrogate (from {surrogate.src_layer!r}) reads; pass a loader")
    fields = set(cache.fields)
    inputs_needed = stats.reservoir is not None and not probe.tail_reads_states(surrogate.dst_layer, "mask" in fields)
    if inputs_needed and not any(is_input_field(f) for f in fields):
        raise ValueError("the refinement needs model inputs that the fit's cache does not hold (the model's tail "
                         "cannot run from the last probed layer alone); pass a loader, or refine=0")
    device = surrogate.operator.device
    names = [f for f in cache.fields if f in ("s0", "scores", "labels") or (inputs_needed and is_input_field(f))]
    for rows in cache.batches(torch.arange(n_rows), CACHE_BATCH, names):
        scores = rows.get("scores")
        if scores is not None and stats.n_outputs is None:
            stats.n_outputs = int(scores.shape[-1])
        folder.fold(rows.get("labels"), scores, rows["s0"].to(device), inputs_of(rows) if inputs_needed else None)
    return n_rows > 0
