"""Per-layer adapters: raw activation -> reduce -> centre -> PCA -> unit RMS (-> rotation).

An adapter maps one layer's activations of any shape to a vector of the common ``width`` and
back. :class:`AdapterFitter` streams the reduced activations' moments batch by batch (and
merges exactly across processes); its :meth:`~AdapterFitter.finalize` returns the frozen
:class:`LayerAdapter` of every layer, whose inverse is exact up to the dropped components
(and up to what a lossy reduction ignores).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from koopman_hooks.koopman.reduce import (
    check_reduce,
    default_reduce,
    expand_activation,
    is_lossy,
    reduce_activation,
    reduced_dim,
)
from koopman_hooks.maths.linalg import top_eigh
from koopman_hooks.maths.stats import StreamingMoments


class LayerAdapter(nn.Module):
    """A fitted, frozen map between one layer's activations and the common width.

    ``forward(x) = ((reduce(x) - mean) @ basis) / scale`` and ``inverse`` undoes it. The
    ``basis`` has orthonormal (or zero, when the layer is narrower than ``width``) columns.
    ``template`` (optional) is the layer's mean activation, used to decode a lossy reduction
    when the real output is not at hand (strict mode). ``mask`` arguments are the inputs'
    ``(B, N)`` attention mask, which the ``"last"`` and ``"mean"`` token reductions read.
    """

    mean: torch.Tensor
    basis: torch.Tensor
    scale: torch.Tensor
    template: torch.Tensor | None

    def __init__(
        self,
        shape: Sequence[int],
        reduce: str,
        mean: torch.Tensor,
        basis: torch.Tensor,
        scale: float | torch.Tensor,
        template: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.reduce = reduce
        _check_parts(self.shape, reduce, mean, basis, template, torch.as_tensor(scale))
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("basis", basis.float().clone())
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).clone())
        self.register_buffer("template", None if template is None else template.float().clone())

    @property
    def width(self) -> int:
        return int(self.basis.shape[1])

    @property
    def features(self) -> int:
        """Number of reduced features the PCA acts on."""
        return int(self.basis.shape[0])

    @property
    def lossy(self) -> bool:
        """Whether the reduction ignores part of the layer's output."""
        return is_lossy(self.reduce, self.shape)

    def reduced(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The reduced features ``(B, F)`` the PCA acts on."""
        return reduce_activation(x.float(), self.reduce, mask)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.from_features(self.reduced(x, mask))

    def from_features(self, features: torch.Tensor) -> torch.Tensor:
        """The adapted vectors of already reduced features ``(B, F)`` (what :meth:`reduced` gives)."""
        return (features - self.mean) @ self.basis / self.scale

    def decode_features(self, a: torch.Tensor) -> torch.Tensor:
        """Adapted vectors back to reduced features ``(B, F)``."""
        return a @ self.basis.T * self.scale + self.mean

    def inverse(self, a: torch.Tensor, like: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Adapted vectors back to the layer's own shape; a lossy reduction keeps what it
        ignores from ``like`` (the real output) or, without it, from ``template``."""
        return expand_activation(self.decode_features(a), self.reduce, self.shape,
                                 like if like is not None else self.template, mask)

    def with_template(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` with what the reduction ignores replaced by the template (the training mean):
        the layer's output as a strict patch would see it, were the reduced features exact."""
        if not self.lossy or self.template is None:
            return x
        device = self.template.device
        mask = None if mask is None else mask.to(device)
        kept = reduce_activation(x.to(device, torch.float32), self.reduce, mask)
        return expand_activation(kept, self.reduce, self.shape, self.template, mask).to(dtype=x.dtype, device=x.device)

    def rotated(self, rotation: torch.Tensor) -> LayerAdapter:
        """A copy whose output is multiplied by the orthogonal ``rotation`` (width x width)."""
        return LayerAdapter(self.shape, self.reduce, self.mean, self.basis @ rotation.to(self.basis), self.scale, self.template)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, reduce={self.reduce!r}, width={self.width}"


def _check_parts(shape: tuple[int, ...], reduce: str, mean: torch.Tensor, basis: torch.Tensor,
                 template: torch.Tensor | None, scale: torch.Tensor) -> None:
    """Raise ``ValueError`` unless the parts of an adapter fit together (e.g. from a corrupt file)."""
    if any(s < 1 for s in shape):
        raise ValueError(f"an adapter's per-sample shape must have positive sizes, got {shape}")
    check_reduce(reduce, shape)
    features = reduced_dim(shape, reduce)
    if tuple(mean.shape) != (features,) or basis.dim() != 2 or basis.shape[0] != features:
        raise ValueError(f"an adapter of shape {shape} with reduce {reduce!r} has {features} features, but its mean "
                         f"is {tuple(mean.shape)} and its basis {tuple(basis.shape)}")
    if scale.numel() != 1 or not bool(scale > 0):  # the adapted vectors are divided by it
        raise ValueError(f"an adapter's scale must be one positive number, got {scale.tolist()}")
    if template is not None and template.numel() != math.prod(shape):
        raise ValueError(f"an adapter's template has {template.numel()} values for per-sample shape {shape}")


def spectrum(cov: torch.Tensor, top: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top`` largest eigenvalues (decreasing, clamped at 0; default all) of a covariance
    and their eigenvectors (columns)."""
    evals, evecs = top_eigh(cov, top)
    return evals.clamp_min(0), evecs


def pca_basis(cov: torch.Tensor, width: int, eig: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``width`` eigenvectors of ``cov`` (zero-padded if fewer), with a fixed sign.

    Returns ``(basis, eigenvalues)`` sorted by decreasing variance (at least ``width`` of them,
    or all); ``eig`` is ``cov``'s :func:`spectrum` (of at least ``width`` components) when it is
    already at hand.
    """
    evals, evecs = eig if eig is not None else spectrum(cov, width)
    keep = min(width, cov.shape[0])
    if evecs.shape[1] < keep:
        raise ValueError(f"a spectrum of {evecs.shape[1]} components cannot give a basis of width {width}")
    evecs = evecs[:, :keep]
    # sign convention: the largest-magnitude entry of each component is positive
    idx = evecs.abs().argmax(0)
    evecs = evecs * torch.sign(evecs[idx, torch.arange(keep, device=evecs.device)]).unsqueeze(0)
    basis = torch.zeros(cov.shape[0], width, dtype=cov.dtype, device=cov.device)
    basis[:, :keep] = evecs
    return basis, evals


def adapter_from_moments(
    shape: Sequence[int], reduce: str, moments: StreamingMoments, width: int, template: torch.Tensor | None = None,
    eig: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LayerAdapter:
    """Fit a :class:`LayerAdapter` from streamed moments of the reduced activations (``eig``:
    their covariance's :func:`spectrum`, when already computed)."""
    basis, evals = pca_basis(moments.cov_xx, width, eig)
    kept = evals[: min(width, len(evals))].sum()
    scale = torch.sqrt(kept / width).clamp_min(1e-12)
    return LayerAdapter(shape, reduce, moments.mean_x, basis, scale, template)


def components_for_variance(moments: StreamingMoments, fraction: float, top: tuple[torch.Tensor, ...] | None = None
                            ) -> int:
    """Smallest number of principal components explaining ``fraction`` of the variance.

    ``top`` (optional) is the covariance's :func:`spectrum` of its largest ``k`` components:
    when those explain less than ``fraction``, the answer is ``k + 1`` (more than were computed).
    """
    cov = moments.cov_xx
    evals = torch.linalg.eigvalsh(cov).flip(0).clamp_min(0) if top is None else top[0]
    cumulative = torch.cumsum(evals, 0) / cov.diagonal().sum().clamp_min(1e-30)
    target = torch.tensor(fraction, dtype=cumulative.dtype, device=cumulative.device)
    limit = len(evals) + (1 if len(evals) < moments.dim else 0)
    return min(int(torch.searchsorted(cumulative, target).item()) + 1, limit)


def procrustes_rotation(cross_cov: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``R`` minimising ``‖A R − B‖`` given ``cross_cov = Aᵀ B``."""
    u, _, vh = torch.linalg.svd(cross_cov)
    return u @ vh


class AdapterFitter:
    """Streams every probed layer's reduced activations; finalises into :class:`LayerAdapter` s.

    Args:
        layers: probed layer names, in forward order.
        reduce: per-layer reduction (``None``: chosen from the first batch's shapes).
        device: where the float64 moments live.
    """

    def __init__(
        self,
        layers: Sequence[str],
        reduce: Mapping[str, str | None],
        device: torch.device | str = "cpu",
    ) -> None:
        self.layers = list(layers)
        self.reduce: dict[str, str | None] = {name: reduce.get(name) for name in self.layers}
        self.device = torch.device(device)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.moments: dict[str, StreamingMoments] = {}
        self.sums: dict[str, torch.Tensor] = {}  # per-layer sum of raw activations, for the strict-mode template
        self.n = 0
        # the leading components of each layer's covariance, kept until new data arrive: one
        # eigensolve serves both the width (variance) and the bases
        self._spectra: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _spectrum(self, name: str, top: int) -> tuple[torch.Tensor, torch.Tensor]:
        dim = self.moments[name].dim
        if name not in self._spectra or self._spectra[name][1].shape[1] < min(top, dim):
            self._spectra[name] = spectrum(self.moments[name].cov_xx, top)
        return self._spectra[name]

    def _start(self, activations: Mapping[str, torch.Tensor]) -> None:
        for name in self.layers:
            self.shapes[name] = tuple(activations[name].shape[1:])
            spec = self.reduce[name] or default_reduce(self.shapes[name])
            check_reduce(spec, self.shapes[name], name)
            self.reduce[name] = spec
        dims = {name: reduced_dim(self.shapes[name], self.reduce[name] or "flatten") for name in self.layers}
        for name in self.layers:  # float32 products (the features are float32): the bases need only the leading components
            self.moments[name] = StreamingMoments(dims[name], device=self.device, products=torch.float32)

    def update(self, activations: Mapping[str, torch.Tensor], mask: torch.Tensor | None = None) -> AdapterFitter:
        """Fold in one batch of raw activations ``{layer: (B, ...)}`` (``mask``: the inputs'
        attention mask, for token reductions)."""
        self.update_reduced(activations, mask)
        return self

    @torch.no_grad()
    def update_reduced(self, activations: Mapping[str, torch.Tensor],
                       mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """:meth:`update`, returning every layer's reduced features ``(B, F)`` (float32, on
        ``device``): what the finalised adapters' ``from_features`` read."""
        if not self.moments:
            self._start(activations)
        mask = None if mask is None else mask.to(self.device)
        reduced = {}
        for name in self.layers:
            flat = reduce_activation(activations[name].to(self.device, torch.float32), self.reduce[name] or "flatten", mask)
            self.moments[name].update(flat)
            reduced[name] = flat
            total = activations[name].to(self.device, torch.float64).sum(0)
            self.sums[name] = total if name not in self.sums else self.sums[name] + total
        self.n += len(next(iter(activations.values())))
        self._spectra.clear()
        return reduced

    def merge(self, other: AdapterFitter) -> AdapterFitter:
        """Fold in another fitter's statistics (of disjoint samples); returns ``self``."""
        if not other.moments:
            return self
        if not self.moments:
            self.shapes, self.reduce = dict(other.shapes), dict(other.reduce)
            self.moments = {n: StreamingMoments(m.dim, m.cross_dim, device=self.device, products=m.products)
                            for n, m in other.moments.items()}
        if other.shapes != self.shapes or other.reduce != self.reduce:
            raise ValueError(f"cannot merge adapter statistics of shapes {other.shapes}, reductions {other.reduce} into "
                             f"shapes {self.shapes}, reductions {self.reduce} (under torch.distributed: the ranks' first "
                             "batches differ; give every rank batches alike, or set reduce= for every layer)")
        for name in self.layers:
            self.moments[name].merge(other.moments[name].to(self.device))
            add = other.sums[name].to(self.device)
            self.sums[name] = add.clone() if name not in self.sums else self.sums[name] + add
        self.n += other.n
        self._spectra.clear()
        return self

    def width_for(self, variance: float, max_width: int) -> int:
        """The common width: enough components for ``variance`` of every layer, at most ``max_width``."""
        return min(max_width, max(components_for_variance(self.moments[n], variance, self._spectrum(n, max_width))
                                  for n in self.layers))

    def finalize(self, width: int) -> dict[str, LayerAdapter]:
        """The frozen adapter of every layer at the common ``width``."""
        if not self.moments or self.n == 0:
            raise ValueError("no activations seen yet")
        adapters = {}
        for name in self.layers:
            spec = self.reduce[name] or "flatten"
            template = (self.sums[name] / self.n).float() if is_lossy(spec, self.shapes[name]) else None
            adapters[name] = adapter_from_moments(self.shapes[name], spec, self.moments[name], width, template,
                                                  self._spectrum(name, width))
        return adapters
