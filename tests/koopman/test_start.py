"""Tests of koopman_hooks/koopman/start.py: the closed-form start against exact linear systems."""

from __future__ import annotations

import pytest
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


@pytest.mark.parametrize("rank_deficient", [False, True])
def test_refined_trajectory_error_is_the_sample_error_of_the_returned_operator_and_rotations(rank_deficient):
    """The refinement's error, computed from moments, equals Σ_j mean‖R_jᵀ a_j − K^{o_j} a_0‖²
    over Σ_j mean‖a_j‖² on the samples themselves, also when a_0 spans fewer directions than its
    width; and refining does not increase it."""
    from koopman_hooks.koopman.start import _refine

    w, n, offsets = 6, 3000, [0, 1, 3, 4]
    g = gen(5)
    a0 = torch.randn(n, w, generator=g, dtype=torch.float64)
    if rank_deficient:  # two coordinates tied: E[a_0 a_0ᵀ] is singular
        a0[:, -1] = 2 * a0[:, 0]
    k_true = torch.linalg.qr(torch.randn(w, w, generator=g, dtype=torch.float64))[0] * 0.9
    states = [a0]
    for s in offsets[1:]:
        q = torch.linalg.qr(torch.randn(w, w, generator=g, dtype=torch.float64))[0]
        noisy = torch.tanh(a0 @ torch.linalg.matrix_power(k_true, s).T) + 0.1 * torch.randn(n, w, generator=g, dtype=torch.float64)
        states.append(noisy @ q)
    layers = ["a", "b", "c", "d"]
    moments = [StreamingMoments.of(a0, s) for s in states[1:]]
    identity = {name: torch.eye(w, dtype=torch.float64) for name in layers[1:]}

    def sample_error(k: torch.Tensor, rotations: dict[str, torch.Tensor]) -> float:
        num = sum(((s @ rotations[name] - a0 @ torch.linalg.matrix_power(k, o).T) ** 2).sum(1).mean()
                  for name, s, o in zip(layers[1:], states[1:], offsets[1:]))
        return float(num / sum((s**2).sum(1).mean() for s in states[1:]))

    start_k = torch.eye(w, dtype=torch.float64) * 0.5
    k, rotations, error = _refine(layers, moments, offsets, start_k, identity)
    assert abs(error - sample_error(k, rotations)) < 1e-9
    assert error < sample_error(start_k, identity)
    for r in rotations.values():
        torch.testing.assert_close(r.T @ r, torch.eye(w, dtype=torch.float64), rtol=0, atol=1e-9)
    elsewhere = [moments[0], StreamingMoments.of(a0 + 1.0, states[2]), moments[2]]
    with pytest.raises(ValueError, match="first block must be layers\\[0\\]'s states"):
        _refine(layers, elsewhere, offsets, start_k, identity)
