"""Streaming first and second moments (Chan et al. pairwise update), in float64.

Memory is ``O(dim^2)`` whatever the number of samples; ``update()`` returns ``self`` so
fitters can be chained, and results are computed lazily from the running sums.
"""

from __future__ import annotations

import math

import torch


class StreamingMoments:
    """Running mean and covariance of ``x``, and optionally its cross-covariance with ``y``."""

    def __init__(self, dim: int, cross_dim: int | None = None, device: torch.device | str = "cpu") -> None:
        kw = {"dtype": torch.float64, "device": device}
        self.n = 0
        self.mean_x = torch.zeros(dim, **kw)
        self._m2_xx = torch.zeros(dim, dim, **kw)
        self.cross_dim = cross_dim
        if cross_dim is not None:
            self.mean_y = torch.zeros(cross_dim, **kw)
            self._m2_yy = torch.zeros(cross_dim, cross_dim, **kw)
            self._m2_xy = torch.zeros(dim, cross_dim, **kw)

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor | None = None) -> StreamingMoments:
        """Fold a batch of rows ``x`` (and the paired rows ``y``) into the statistics."""
        x = x.reshape(len(x), math.prod(x.shape[1:])).to(self.mean_x)  # -1 fails for 0 rows
        if x.shape[1] != self.mean_x.shape[0]:
            raise ValueError(f"expected {self.mean_x.shape[0]} features, got {x.shape[1]}")
        if (y is None) != (self.cross_dim is None):
            raise ValueError("pass y exactly when the moments were built with cross_dim")
        b = x.shape[0]
        if b == 0:
            return self
        n = self.n
        total = n + b
        mx = x.mean(0)
        dx = mx - self.mean_x
        xc = x - mx
        self._m2_xx += xc.T @ xc + torch.outer(dx, dx) * (n * b / total)
        self.mean_x += dx * (b / total)
        if y is not None:
            y = y.reshape(len(y), math.prod(y.shape[1:])).to(self.mean_y)
            my = y.mean(0)
            dy = my - self.mean_y
            yc = y - my
            self._m2_yy += yc.T @ yc + torch.outer(dy, dy) * (n * b / total)
            self._m2_xy += xc.T @ yc + torch.outer(dx, dy) * (n * b / total)
            self.mean_y += dy * (b / total)
        self.n = total
        return self

    def _check(self) -> None:
        if self.n == 0:
            raise ValueError("no samples seen yet")

    @property
    def cov_xx(self) -> torch.Tensor:
        """Population covariance of ``x``."""
        self._check()
        return self._m2_xx / self.n

    @property
    def cov_yy(self) -> torch.Tensor:
        self._check()
        return self._m2_yy / self.n

    @property
    def cov_xy(self) -> torch.Tensor:
        """Population cross-covariance ``E[(x - mx)(y - my)^T]``."""
        self._check()
        return self._m2_xy / self.n


def ridge_regression(
    moments: StreamingMoments, ridge: float = 1e-6, intercept: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares ``y ≈ x @ W + b`` from streamed moments (ridge EDMD).

    With ``intercept=False`` the fit is linear (``b = 0``, uncentred second moments). The
    intercept is never penalised; ``ridge`` is relative to the mean second moment of ``x``.
    Returns ``(W, b)`` in float64, ``W`` of shape ``(dim_x, dim_y)``.
    """
    cxx, cxy = moments.cov_xx, moments.cov_xy
    if not intercept:
        cxx = cxx + torch.outer(moments.mean_x, moments.mean_x)
        cxy = cxy + torch.outer(moments.mean_x, moments.mean_y)
    scale = cxx.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(cxx.shape[0], dtype=cxx.dtype, device=cxx.device)
    weight = torch.linalg.solve(cxx + ridge * scale * eye, cxy)
    bias = moments.mean_y - moments.mean_x @ weight if intercept else torch.zeros_like(moments.mean_y)
    return weight, bias
