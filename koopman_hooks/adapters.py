"""Per-layer adapters: raw activation -> reduce -> centre -> PCA -> unit RMS (-> rotation).

An adapter maps one layer's activations of any shape to a vector of the common ``width``
and back. The PCA basis comes from a covariance streamed batch by batch, so the inverse is
exact up to the dropped components (and up to what a lossy ``reduce`` threw away).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from koopman_hooks.stats import StreamingMoments

REDUCE_MODES = ("flatten", "pool", "cls", "mean")


def parse_reduce(spec: str) -> tuple[str, tuple[int, int] | None]:
    """``"flatten"``, ``"cls"``, ``"mean"``, ``"pool"`` (2x2) or ``"pool:HxW"``."""
    mode, _, arg = spec.partition(":")
    if mode not in REDUCE_MODES:
        raise ValueError(f"unknown reduce {spec!r}; choose from flatten, pool[:HxW], cls, mean")
    if mode != "pool":
        if arg:
            raise ValueError(f"reduce {mode!r} takes no size, got {spec!r}")
        return mode, None
    h, _, w = (arg or "2x2").partition("x")
    return mode, (int(h), int(w or h))


def reduce_activation(x: torch.Tensor, spec: str) -> torch.Tensor:
    """Flatten a batch of activations ``(B, ...)`` to ``(B, F)`` as ``spec`` says."""
    mode, size = parse_reduce(spec)
    if mode == "flatten":
        return rearrange(x, "b ... -> b (...)")
    if mode == "pool":
        if x.ndim != 4:
            raise ValueError(f"reduce 'pool' needs (B, C, H, W) maps, got shape {tuple(x.shape)}")
        return rearrange(F.adaptive_avg_pool2d(x, size), "b c h w -> b (c h w)")
    if x.ndim != 3:
        raise ValueError(f"reduce {mode!r} needs (B, N, D) tokens, got shape {tuple(x.shape)}")
    return x[:, 0] if mode == "cls" else x.mean(1)


def expand_activation(flat: torch.Tensor, spec: str, shape: Sequence[int], like: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`reduce_activation` into per-sample ``shape``.

    ``flatten`` is exact. Lossy reductions need ``like``, the layer's real output, and keep
    what the reduction ignored: ``pool`` adds the least-norm change whose pooling is the
    change of the pooled map (nearest upsampling when the pool size divides the map, so
    ``reduce(expand(flat)) == flat`` for any size), ``cls`` writes token 0, ``mean`` shifts
    every token by the change of the mean.

    What is kept comes from the real forward pass: a patched model is honest about a
    lossy layer only if nothing downstream reads what the reduction ignores (e.g. ``cls``
    at the last block of a CLS-token ViT); see :mod:`koopman_hooks.vision`.
    """
    mode, size = parse_reduce(spec)
    if mode == "flatten":
        return flat.reshape(len(flat), *shape)
    if like is None:
        raise ValueError(f"reduce {spec!r} is lossy: decoding it needs the layer's real output")
    like = like.to(flat.dtype)
    if mode == "pool":
        c = shape[0]
        pooled = rearrange(flat, "b (c h w) -> b c h w", c=c, h=size[0], w=size[1])
        delta = pooled - F.adaptive_avg_pool2d(like, size)
        # least-norm map change whose pooling is exactly ``delta``: pinv of the (separable)
        # pooling operator; for sizes that divide the map this is nearest upsampling
        up_h = torch.linalg.pinv(_adaptive_pool_matrix(shape[1], size[0], flat.device))
        up_w = torch.linalg.pinv(_adaptive_pool_matrix(shape[2], size[1], flat.device))
        return like + torch.einsum("Hh,bchw,Ww->bcHW", up_h.to(flat.dtype), delta, up_w.to(flat.dtype))
    if mode == "cls":
        return torch.cat([flat[:, None], like[:, 1:]], dim=1)
    return like + (flat - like.mean(1))[:, None]


def _adaptive_pool_matrix(n_in: int, n_out: int, device: torch.device | None = None) -> torch.Tensor:
    """``(n_out, n_in)`` matrix of 1-D adaptive average pooling (PyTorch's window rule)."""
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64, device=device)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -(-((i + 1) * n_in) // n_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def reduced_dim(shape: Sequence[int], spec: str) -> int:
    """Number of features :func:`reduce_activation` gives for per-sample ``shape``."""
    mode, size = parse_reduce(spec)
    if mode == "flatten":
        return math.prod(shape)
    if mode == "pool":
        return shape[0] * size[0] * size[1]
    return shape[-1]


def default_reduce(shape: Sequence[int], max_features: int = 4096) -> str:
    """``flatten`` when small enough, else pool conv maps or take the token mean."""
    if math.prod(shape) <= max_features:
        return "flatten"
    if len(shape) == 3:  # (C, H, W)
        side = max(1, int(math.sqrt(max_features / shape[0])))
        return f"pool:{min(side, shape[1])}x{min(side, shape[2])}"
    if len(shape) == 2:  # (N, D)
        return "mean"
    return "flatten"


class LayerAdapter(nn.Module):
    """A fitted, frozen map between one layer's activations and the common width.

    ``forward(x) = ((reduce(x) - mean) @ basis) / scale`` and ``inverse`` undoes it. The
    ``basis`` has orthonormal (or zero, when the layer is narrower than ``width``) columns.
    """

    def __init__(self, shape: Sequence[int], reduce: str, mean: torch.Tensor, basis: torch.Tensor, scale: float | torch.Tensor) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.reduce = reduce
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("basis", basis.float().clone())
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).clone())

    @property
    def width(self) -> int:
        return self.basis.shape[1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The reduced features ``(B, F)`` the PCA acts on."""
        return reduce_activation(x.float(), self.reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.features(x) - self.mean) @ self.basis / self.scale

    def decode_features(self, a: torch.Tensor) -> torch.Tensor:
        """Adapted vectors back to reduced features ``(B, F)``."""
        return a @ self.basis.T * self.scale + self.mean

    def inverse(self, a: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """Adapted vectors back to the layer's own shape (``like`` for lossy reductions)."""
        return expand_activation(self.decode_features(a), self.reduce, self.shape, like)

    def rotated(self, rotation: torch.Tensor) -> LayerAdapter:
        """A copy whose output is multiplied by the orthogonal ``rotation`` (width x width)."""
        return LayerAdapter(self.shape, self.reduce, self.mean, self.basis @ rotation.to(self.basis), self.scale)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, reduce={self.reduce!r}, width={self.width}"


def pca_basis(cov: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``width`` eigenvectors of ``cov`` (zero-padded if fewer), with a fixed sign.

    Returns ``(basis, eigenvalues)`` sorted by decreasing variance.
    """
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    keep = min(width, cov.shape[0])
    evecs = evecs[:, :keep]
    # sign convention: the largest-magnitude entry of each component is positive
    idx = evecs.abs().argmax(0)
    evecs = evecs * torch.sign(evecs[idx, torch.arange(keep)]).unsqueeze(0)
    basis = torch.zeros(cov.shape[0], width, dtype=cov.dtype, device=cov.device)
    basis[:, :keep] = evecs
    return basis, evals


def adapter_from_moments(shape: Sequence[int], reduce: str, moments: StreamingMoments, width: int) -> LayerAdapter:
    """Fit a :class:`LayerAdapter` from streamed moments of the reduced activations."""
    basis, evals = pca_basis(moments.cov_xx, width)
    kept = evals[: min(width, len(evals))].sum()
    scale = torch.sqrt(kept / width).clamp_min(1e-12)
    return LayerAdapter(shape, reduce, moments.mean_x, basis, scale)


def components_for_variance(moments: StreamingMoments, fraction: float) -> int:
    """Smallest number of principal components explaining ``fraction`` of the variance."""
    evals = torch.linalg.eigvalsh(moments.cov_xx).flip(0).clamp_min(0)
    cumulative = torch.cumsum(evals, 0) / evals.sum().clamp_min(1e-30)
    return int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype)).item()) + 1


def procrustes_rotation(cross_cov: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``R`` minimising ``||A R - B||`` given ``cross_cov = A^T B``."""
    u, _, vh = torch.linalg.svd(cross_cov)
    return u @ vh
