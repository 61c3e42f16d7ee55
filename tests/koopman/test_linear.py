"""Tests of koopman_hooks/koopman/linear.py: the closed-form fits against lstsq, and their merge."""

from __future__ import annotations

import torch

from koopman_hooks.koopman.linear import LinearBaselineFitter, RidgeOperatorFitter


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def states(n: int = 400, width: int = 5, layers: int = 3) -> list[torch.Tensor]:
    a0 = torch.randn(n, width, generator=gen(0))
    out = [a0]
    for j in range(1, layers):
        w = torch.randn(width, width, generator=gen(j))
        out.append(out[-1] @ w + 0.3 * j + 0.05 * torch.randn(n, width, generator=gen(10 + j)))
    return out


def test_linear_baseline_is_least_squares_with_intercept_and_merges():
    s = states()
    fit = LinearBaselineFitter(3, 5)
    for a in range(0, 400, 64):
        assert fit.update([t[a : a + 64] for t in s]) is fit
    x1 = torch.cat([s[0], torch.ones(400, 1)], 1).double()
    for (weight, bias), target in zip(fit.finalize(ridge=0.0), s[1:]):
        solution = torch.linalg.lstsq(x1, target.double()).solution
        torch.testing.assert_close(weight.double(), solution[:5], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bias.double(), solution[5], rtol=1e-4, atol=1e-5)
    halves = [LinearBaselineFitter(3, 5).update([t[a:b] for t in s]) for a, b in ((0, 150), (150, 400))]
    merged = halves[0].merge(halves[1]).finalize(ridge=0.0)
    for (w1, b1), (w2, b2) in zip(merged, fit.finalize(ridge=0.0)):
        torch.testing.assert_close(w1, w2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b1, b2, rtol=1e-5, atol=1e-6)


def test_ridge_operator_is_the_pooled_one_step_least_squares_and_merges():
    z = states(width=4)
    fit = RidgeOperatorFitter(4).update(z)
    inputs, outputs = torch.cat(z[:-1]).double(), torch.cat(z[1:]).double()
    k = torch.linalg.lstsq(inputs, outputs).solution.T  # z_out ≈ K z_in, no intercept
    torch.testing.assert_close(fit.finalize(ridge=0.0), k, rtol=1e-6, atol=1e-8)
    merged = RidgeOperatorFitter(4).update([t[:100] for t in z]).merge(RidgeOperatorFitter(4).update([t[100:] for t in z]))
    torch.testing.assert_close(merged.finalize(ridge=0.0), k, rtol=1e-6, atol=1e-8)
