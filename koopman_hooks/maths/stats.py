"""Streaming first and second moments in float64, mergeable exactly (Chan et al.).

Memory is ``O(dim²)`` whatever the number of samples. :meth:`StreamingMoments.update` folds a
batch in and returns ``self``; :meth:`StreamingMoments.merge` combines the moments of two
disjoint sets of samples into those of their union (what a multi-process fit all-reduces).
:class:`JointMoments` does the same for several blocks of features seen on the same rows,
taking each block's covariance once however many pairs it is part of.
Each batch's own centred products may be taken in float32 (``products=torch.float32``: about
twice as fast on a CPU for batches of at least 1/16 of the width, with float32's rounding in
each batch's products; the running sums, the means and the merges stay float64).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

PRODUCT_COLUMNS = 512  # float32 products are taken this many columns at a time


def _centred(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch centred on its own mean (in ``dtype``), and that mean (float64)."""
    mean = x.mean(0, dtype=torch.float64)
    return (x.to(dtype) - mean.to(dtype)), mean


def _add_products(into: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``into += aᵀ b`` in the dtype of ``a`` and ``b``: float64 in place; float32 by blocks of
    ``PRODUCT_COLUMNS`` columns (no ``(dim, dim)`` float32 temporary)."""
    if a.dtype == torch.float64:
        return into.addmm_(a.T, b)
    for start in range(0, b.shape[1], PRODUCT_COLUMNS):
        into[:, start : start + PRODUCT_COLUMNS].add_(a.T @ b[:, start : start + PRODUCT_COLUMNS])
    return into


def _products_dtype(products: torch.dtype, rows: int, widest: int) -> torch.dtype:
    """float32 products pay from batches of 1/16 of the width on (below, updating the float64
    sums dominates, and float64's in-place product is faster)."""
    return products if 16 * rows >= widest else torch.float64


class StreamingMoments:
    """Running mean and covariance of ``x``, and optionally its cross-covariance with ``y``: the
    :class:`JointMoments` of one block, or of two with their cross-covariance.

    Args:
        dim: number of features of ``x``.
        cross_dim: number of features of the paired ``y`` (``None``: no ``y``).
        device: where the float64 running sums live.
        products: dtype of each batch's centred products (float64: exact for float32 data;
            float32 only for batches of at least 1/16 of the width, the others in float64).
    """

    def __init__(self, dim: int, cross_dim: int | None = None, device: torch.device | str = "cpu",
                 products: torch.dtype = torch.float64) -> None:
        dims, pairs = ((dim,), ()) if cross_dim is None else ((dim, cross_dim), ((0, 1),))
        self._joint = JointMoments(dims, pairs, device=device, products=products)
        self.cross_dim = cross_dim

    @property
    def products(self) -> torch.dtype:
        return self._joint.products

    @property
    def n(self) -> int:
        return self._joint.n

    @property
    def mean_x(self) -> torch.Tensor:
        return self._joint.means[0]

    @property
    def m2_xx(self) -> torch.Tensor:
        """Sum of outer products of the centred ``x`` (unnormalised covariance)."""
        return self._joint.m2[0]

    @property
    def mean_y(self) -> torch.Tensor | None:
        return None if self.cross_dim is None else self._joint.means[1]

    @property
    def m2_yy(self) -> torch.Tensor | None:
        return None if self.cross_dim is None else self._joint.m2[1]

    @property
    def m2_xy(self) -> torch.Tensor | None:
        return None if self.cross_dim is None else self._joint.m2_cross[0, 1]

    @property
    def dim(self) -> int:
        return int(self.mean_x.shape[0])

    @classmethod
    def of(cls, x: torch.Tensor, y: torch.Tensor | None = None) -> StreamingMoments:
        """The moments of one batch of rows ``x`` (and paired rows ``y``)."""
        x = x.reshape(len(x), math.prod(x.shape[1:]))  # -1 fails for 0 rows
        cross = None if y is None else math.prod(y.shape[1:])
        return cls(x.shape[1], cross, device=x.device).update(x, y)

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor | None = None) -> StreamingMoments:
        """Fold a batch of rows ``x`` (and the paired rows ``y``) into the statistics."""
        x = x.reshape(len(x), math.prod(x.shape[1:]))
        if x.shape[1] != self.dim:
            raise ValueError(f"expected {self.dim} features, got {x.shape[1]}")
        if (y is None) != (self.cross_dim is None):
            raise ValueError("pass y exactly when the moments were built with cross_dim")
        if len(x) == 0:
            return self
        if y is not None:
            y = y.reshape(len(y), math.prod(y.shape[1:]))
            if len(y) != len(x):
                raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        self._joint.update([x] if y is None else [x, y])
        return self

    @torch.no_grad()
    def merge(self, other: StreamingMoments) -> StreamingMoments:
        """Fold in the moments of another, disjoint set of samples; returns ``self``."""
        if other.dim != self.dim or other.cross_dim != self.cross_dim:
            raise ValueError(
                f"cannot merge moments of shape ({other.dim}, {other.cross_dim}) into ({self.dim}, {self.cross_dim})"
            )
        self._joint.merge(other._joint)
        return self

    @classmethod
    def pooled(cls, parts: Iterable[StreamingMoments]) -> StreamingMoments:
        """The moments of the union of ``parts`` (none of which is modified)."""
        parts = list(parts)
        if not parts:
            raise ValueError("pooled() needs at least one set of moments")
        out = cls(parts[0].dim, parts[0].cross_dim, device=parts[0].mean_x.device, products=parts[0].products)
        for part in parts:
            out.merge(part)
        return out

    def to(self, device: torch.device | str) -> StreamingMoments:
        """The same moments on ``device`` (a copy)."""
        out = StreamingMoments(self.dim, self.cross_dim, device=device, products=self.products)
        return out.merge(self)

    def _check(self) -> None:
        if self.n == 0:
            raise ValueError("no samples seen yet")

    @property
    def cov_xx(self) -> torch.Tensor:
        """Population covariance of ``x``."""
        self._check()
        return self.m2_xx / self.n

    @property
    def cov_yy(self) -> torch.Tensor:
        """Population covariance of ``y``."""
        self._check()
        assert self.m2_yy is not None, "no y was tracked"
        return self.m2_yy / self.n

    @property
    def cov_xy(self) -> torch.Tensor:
        """Population cross-covariance ``E[(x - mx)(y - my)ᵀ]``."""
        self._check()
        assert self.m2_xy is not None, "no y was tracked"
        return self.m2_xy / self.n

    def second_moment(self) -> torch.Tensor:
        """Homogeneous second moment ``E[x̃ x̃ᵀ]`` of ``x̃ = [x, 1]``: ``(dim+1, dim+1)``."""
        self._check()
        d = self.dim
        out = torch.empty(d + 1, d + 1, dtype=torch.float64, device=self.mean_x.device)
        out[:d, :d] = self.cov_xx + torch.outer(self.mean_x, self.mean_x)
        out[:d, d] = out[d, :d] = self.mean_x
        out[d, d] = 1.0
        return out


class JointMoments:
    """Running means and covariances of several blocks of features seen on the same rows, and the
    cross-covariances of chosen ``pairs`` of blocks (Chan et al., as :class:`StreamingMoments`).

    Pairs that share a block share its covariance: the moments of ``(a_0, a_1), (a_0, a_2),
    (a_1, a_2)`` take three covariances and three cross-covariances, where three
    :class:`StreamingMoments` would take six and three. :meth:`pair` reads one pair as
    :class:`StreamingMoments`.

    Args:
        dims: number of features of each block.
        pairs: ``(i, j)`` block indices whose cross-covariance is tracked.
        device: where the float64 running sums live.
        products: dtype of each batch's centred products, as in :class:`StreamingMoments`.
    """

    def __init__(self, dims: Sequence[int], pairs: Iterable[tuple[int, int]], device: torch.device | str = "cpu",
                 products: torch.dtype = torch.float64) -> None:
        if products not in (torch.float32, torch.float64):
            raise ValueError(f"products must be torch.float32 or torch.float64, not {products}")
        self.dims = tuple(int(d) for d in dims)
        self.pairs = tuple(dict.fromkeys((int(i), int(j)) for i, j in pairs))
        outside = [p for p in self.pairs if not all(0 <= k < len(self.dims) for k in p)]
        if outside:
            raise ValueError(f"pairs {outside} name blocks outside 0..{len(self.dims) - 1}")
        self.products = products
        self.n = 0
        self.means = [torch.zeros(d, dtype=torch.float64, device=device) for d in self.dims]
        self.m2 = [torch.zeros(d, d, dtype=torch.float64, device=device) for d in self.dims]
        """Per block, the sum of outer products of its centred rows."""
        self.m2_cross = {(i, j): torch.zeros(self.dims[i], self.dims[j], dtype=torch.float64, device=device)
                         for i, j in self.pairs}
        """Per pair ``(i, j)``, the sum of outer products of block i's and block j's centred rows."""

    @torch.no_grad()
    def update(self, blocks: Sequence[torch.Tensor]) -> JointMoments:
        """Fold in one batch: ``blocks[i]`` holds the rows' features of block ``i``."""
        if len(blocks) != len(self.dims):
            raise ValueError(f"expected {len(self.dims)} blocks, got {len(blocks)}")
        b = len(blocks[0])
        flat = [x.reshape(len(x), math.prod(x.shape[1:])).to(self.means[0].device) for x in blocks]
        for i, x in enumerate(flat):
            if x.shape != (b, self.dims[i]):
                raise ValueError(f"block {i}: expected ({b}, {self.dims[i]}) rows and features, got {tuple(x.shape)}")
        if b == 0:
            return self
        # Chan's merge of the batch's own centred moments, in place: one GEMM and one rank-1
        # update per matrix (no per-batch (dim, dim) temporaries: 3x faster at 3,000 features)
        total = self.n + b
        weight = self.n * b / total
        dtype = _products_dtype(self.products, b, max(self.dims))
        centred = []
        shifts = []
        for x, mean in zip(flat, self.means):
            xc, batch_mean = _centred(x, dtype)
            centred.append(xc)
            shifts.append(batch_mean - mean)
        for m2, xc, d in zip(self.m2, centred, shifts):
            _add_products(m2, xc, xc).addr_(d, d, alpha=weight)
        for (i, j), m2 in self.m2_cross.items():
            _add_products(m2, centred[i], centred[j]).addr_(shifts[i], shifts[j], alpha=weight)
        for mean, d in zip(self.means, shifts):
            mean.add_(d, alpha=b / total)
        self.n = total
        return self

    @torch.no_grad()
    def merge(self, other: JointMoments) -> JointMoments:
        """Fold in the moments of another, disjoint set of rows; returns ``self``."""
        if other.dims != self.dims or other.pairs != self.pairs:
            raise ValueError(f"cannot merge moments of blocks {other.dims} and pairs {other.pairs} into "
                             f"blocks {self.dims} and pairs {self.pairs}")
        if other.n == 0:
            return self
        total = self.n + other.n
        weight = self.n * other.n / total
        shifts = [theirs.to(mine) - mine for mine, theirs in zip(self.means, other.means)]
        for mine, theirs, d in zip(self.m2, other.m2, shifts):
            mine.add_(theirs.to(mine)).addr_(d, d, alpha=weight)
        for (i, j), mine in self.m2_cross.items():
            mine.add_(other.m2_cross[i, j].to(mine)).addr_(shifts[i], shifts[j], alpha=weight)
        for mean, d in zip(self.means, shifts):
            mean.add_(d, alpha=other.n / total)
        self.n = total
        return self

    def pair(self, i: int, j: int) -> StreamingMoments:
        """The moments of blocks ``i`` (as ``x``) and ``j`` (as ``y``): a copy, for a tracked pair."""
        if (i, j) not in self.m2_cross:
            raise KeyError(f"pair ({i}, {j}) is not tracked; tracked: {list(self.pairs)}")
        out = StreamingMoments(self.dims[i], self.dims[j], device=self.means[i].device, products=self.products)
        joint = out._joint
        joint.n = self.n
        joint.means = [self.means[i].clone(), self.means[j].clone()]
        joint.m2 = [self.m2[i].clone(), self.m2[j].clone()]
        joint.m2_cross = {(0, 1): self.m2_cross[i, j].clone()}
        return out


def ridge_regression(
    moments: StreamingMoments, ridge: float = 1e-6, intercept: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares ``y ≈ x @ W + b`` from streamed moments (ridge EDMD).

    With ``intercept=False`` the fit is linear (``b = 0``, uncentred second moments). The
    intercept is never penalised; ``ridge`` is relative to the mean second moment of ``x``.
    Returns ``(W, b)`` in float64, ``W`` of shape ``(dim_x, dim_y)``.
    """
    assert moments.mean_y is not None, "ridge_regression needs moments with a paired y"
    cxx, cxy = moments.cov_xx, moments.cov_xy
    if not intercept:
        cxx = cxx + torch.outer(moments.mean_x, moments.mean_x)
        cxy = cxy + torch.outer(moments.mean_x, moments.mean_y)
    scale = cxx.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(cxx.shape[0], dtype=cxx.dtype, device=cxx.device)
    weight = torch.linalg.solve(cxx + ridge * scale * eye, cxy)
    bias = moments.mean_y - moments.mean_x @ weight if intercept else torch.zeros_like(moments.mean_y)
    return weight, bias
