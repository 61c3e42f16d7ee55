"""LEACE (Belrose et al. 2023) with EleutherAI's ``concept-erasure``: the baseline at a layer, and
the latent eraser of the Koopman ``"leace"`` edit.

:class:`LeaceFitter` is concept-erasure's fitter plus an exact :meth:`~LeaceFitter.merge` (so a
multi-process fit can all-reduce it) and :meth:`~LeaceFitter.from_moments` (for statistics that
were streamed already).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

with warnings.catch_warnings():  # concept-erasure scripts two helpers with the deprecated torch.jit.script
    warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)
    import concept_erasure
    from concept_erasure.caching import invalidates_cache

from koopman_hooks.core.hooks import hooked
from koopman_hooks.core.select import OutputSelector
from koopman_hooks.errors import EmptyLoaderError
from koopman_hooks.maths.linalg import homogeneous
from koopman_hooks.unlearning.splits import Classes, class_list
from koopman_hooks.unlearning.statistics import LatentGroupStatistics


class LeaceFitter(concept_erasure.LeaceFitter):
    """concept-erasure's streaming LEACE fitter, mergeable exactly (Chan et al.)."""

    @invalidates_cache("eraser")
    def merge(self, other: concept_erasure.LeaceFitter) -> LeaceFitter:
        """Fold in the statistics of another, disjoint set of samples; returns ``self``."""
        assert self.sigma_xx_ is not None and other.sigma_xx_ is not None, "merge needs method='leace'"
        count: torch.Tensor = self.n  # type: ignore[has-type]
        n, b = int(count.item()), int(other.n.item())
        if b == 0:
            return self
        total = n + b
        dx, dz = other.mean_x - self.mean_x, other.mean_z - self.mean_z
        weight = n * b / total
        self.sigma_xx_ += other.sigma_xx_ + torch.outer(dx, dx) * weight
        self.sigma_xz_ += other.sigma_xz_ + torch.outer(dx, dz) * weight
        self.mean_x += dx * (b / total)
        self.mean_z += dz * (b / total)
        self.n = torch.tensor(total, device=self.mean_x.device)
        return self

    @classmethod
    def from_moments(
        cls, n: int, mean_x: torch.Tensor, cov_xx: torch.Tensor, mean_z: torch.Tensor, cov_xz: torch.Tensor, **kwargs: Any
    ) -> LeaceFitter:
        """A fitter holding ``n`` samples of population moments ``mean_x``, ``cov_xx`` (of ``x``),
        ``mean_z`` and ``cov_xz`` (cross-covariance with the concept ``z``)."""
        fitter = cls(len(mean_x), len(mean_z), device=mean_x.device, dtype=mean_x.dtype, **kwargs)
        fitter.n = torch.tensor(int(n), device=mean_x.device)
        fitter.mean_x = mean_x.clone()
        fitter.mean_z = mean_z.clone()
        fitter.sigma_xx_ = cov_xx * n
        fitter.sigma_xz_ = cov_xz * n
        return fitter


def indicators(labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """``(n, k)`` float64 one-hot columns "is class ``classes[j]``"."""
    return (labels.reshape(-1, 1) == torch.tensor(list(classes)).reshape(1, -1)).double()


class LeaceErasedModel(nn.Module):
    """``model`` (shared, not copied) with ``eraser`` applied to ``layer``'s selected output.

    The hook lives only inside this wrapper's ``forward`` and is prepended, so other hooks on
    that layer see the erased output; calling ``model`` directly is unaffected.
    """

    def __init__(self, model: nn.Module, layer: str, eraser: concept_erasure.LeaceEraser,
                 selector: OutputSelector | None = None) -> None:
        super().__init__()
        self.model = model
        self.layer = layer
        self.eraser = eraser
        self.selector = selector or OutputSelector(None, layer)

    def _hook(self, _module: nn.Module, _inputs: Any, output: Any) -> Any:
        value = self.selector.get(output)
        flat = value.reshape(len(value), -1)
        erased = self.eraser(flat.to(self.eraser.proj_left.dtype)).to(value.dtype)
        return self.selector.replace(output, erased.reshape(value.shape))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with hooked(self.model, {self.layer: self._hook}, prepend=True):
            return self.model(*args, **kwargs)


def fit_leace(features: Iterable[tuple[torch.Tensor, torch.Tensor]], forget_classes: Classes) -> concept_erasure.LeaceEraser:
    """LEACE of the "is class c" indicators (one column per forget class) from batches of
    ``(features (b, d), labels (b,))``, streamed in float64."""
    classes = class_list(forget_classes)
    fitter: LeaceFitter | None = None
    for feats, labels in features:
        if fitter is None:
            fitter = LeaceFitter(feats.shape[1], len(classes), dtype=torch.float64)
        fitter.update(feats.double(), indicators(labels, classes))
    if fitter is None:
        raise EmptyLoaderError()
    return fitter.eraser


def leace_erasure(model: nn.Module, layer: str, features: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  forget_classes: Classes) -> tuple[LeaceErasedModel, float]:
    """LEACE of the forget classes at ``layer``, wrapped around ``model``; and the seconds it took.

    ``features`` yields ``(layer features, labels)`` per batch, e.g.
    :func:`~koopman_hooks.unlearning.metrics.layer_batches`.
    """
    start = time.perf_counter()
    eraser = fit_leace(features, forget_classes)
    return LeaceErasedModel(model, layer, eraser), time.perf_counter() - start


def latent_leace_map(stats: LatentGroupStatistics, retained: list[int], edit: torch.Tensor | None = None) -> torch.Tensor:
    """LEACE of the forgotten classes' indicators on the (edited) latent endpoint, as a
    homogeneous ``(d+1, d+1)`` map anchored at the retained mean ``μ_R``.

    The eraser ``z -> z − P (z − μ_R)`` is concept-erasure's, from the streamed group moments
    after the homogeneous affine ``edit``; anchored at ``μ_R``, the retained classes' mean stays
    put and every forgotten class's mean moves onto it.
    """
    d = stats.latent_dim
    edit = edit if edit is not None else torch.eye(d + 1, dtype=torch.float64)
    a, b = edit[:d, :d], edit[:d, d]
    parts = [(c, m.n, a @ m.mean_x + b, a @ m.cov_xx @ a.T) for (c, _), m in stats.groups.items() if m.n > 0]
    forget = sorted(stats.forget)
    n = sum(k for _, k, _, _ in parts)
    mean = sum(k * mu for _, k, mu, _ in parts) / n
    cov = sum(k * (s + torch.outer(mu - mean, mu - mean)) for _, k, mu, s in parts) / n
    mean_z = torch.zeros(len(forget), dtype=torch.float64)
    cov_xz = torch.zeros(d, len(forget), dtype=torch.float64)
    for j, f in enumerate(forget):
        nf = sum(k for c, k, _, _ in parts if c == f)
        mf = sum(k * mu for c, k, mu, _ in parts if c == f) / nf
        mean_z[j] = nf / n
        cov_xz[:, j] = nf * (mf - mean) / n
    assert isinstance(mean, torch.Tensor) and isinstance(cov, torch.Tensor)
    fitter = LeaceFitter.from_moments(n, mean, cov, mean_z, cov_xz, shrinkage=False, constrain_cov_trace=False, svd_tol=1e-8)
    eraser = fitter.eraser
    proj = (eraser.proj_left @ eraser.proj_right).double()
    kept = [(k, mu) for c, k, mu, _ in parts if c in retained]
    mean_r = sum(k * mu for k, mu in kept) / sum(k for k, _ in kept)
    return homogeneous(torch.eye(d, dtype=torch.float64) - proj, proj @ mean_r) @ edit
