"""Tests of koopman_hooks/koopman/start.py: the closed-form start against exact linear systems."""

from __future__ import annotations

import torch

from koopman_hooks.koopman.adapters import adapter_from_moments
from koopman_hooks.koopman.start import linear_start
from koopman_hooks.maths.stats import StreamingMoments


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_two_layers_start_at_the_ridge_baseline_with_a_symmetric_root():
    """a_1 = M a_0 with an M that has negative and complex eigenvalues (no real root of its own)."""
    w, steps = 5, 4
    a0 = torch.randn(2000, w, generator=gen(0), dtype=torch.float64)
    m = torch.randn(w, w, generator=gen(1), dtype=torch.float64)
    a1 = a0 @ m.T
    adapters = {name: adapter_from_moments((w,), "flatten", StreamingMoments.of(a), w) for name, a in (("a", a0), ("b", a1))}
    pca = {name: adapters[name](a.float()).double() for name, a in (("a", a0), ("b", a1))}
    start = linear_start(["a", "b"], adapters, [StreamingMoments.of(pca["a"], pca["b"])], [0, steps], ridge=0.0)
    k = start.operator
    torch.testing.assert_close(k, k.T)  # real and symmetric ...
    assert torch.linalg.eigvalsh(k).min() >= -1e-9  # ... positive semi-definite
    rotated = start.adapters["b"](a1.float()).double()
    prediction = pca["a"] @ torch.linalg.matrix_power(k, steps).T
    torch.testing.assert_close(prediction, rotated, rtol=1e-4, atol=1e-4)  # K^k is the whole linear map
    weight, bias = start.baselines["b"]
    torch.testing.assert_close(pca["a"].float() @ weight + bias, rotated.float(), rtol=1e-3, atol=1e-3)
    r = start.rotations["b"].double()
    torch.testing.assert_close(r.T @ r, torch.eye(w, dtype=r.dtype), rtol=1e-5, atol=1e-5)
