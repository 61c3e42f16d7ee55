"""Tests of koopman_hooks/maths/linalg.py: every helper against its closed form."""

from __future__ import annotations

import pytest
import torch

from koopman_hooks.maths.linalg import (
    apply_homogeneous,
    gaussian_ot_map,
    homogeneous,
    polar,
    psd_power,
    psd_sqrt,
    real_matrix_root,
    solve_spd,
    top_eigh,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spd(d: int, seed: int, condition: float = 50.0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen(seed), dtype=torch.float64))
    return (q * torch.logspace(0, torch.log10(torch.tensor(condition)).item(), d, dtype=torch.float64)) @ q.T


def test_homogeneous_and_its_application():
    k, b = torch.randn(3, 3, generator=gen(0)), torch.randn(3, generator=gen(1))
    h = homogeneous(k, b)
    assert h.shape == (4, 4)
    torch.testing.assert_close(h[:3, :3], k)
    torch.testing.assert_close(h[:3, 3], b)
    torch.testing.assert_close(h[3], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(homogeneous(k)[:3, 3], torch.zeros(3))
    z = torch.randn(5, 3, generator=gen(2))
    torch.testing.assert_close(apply_homogeneous(h, z), z @ k.T + b)


def test_psd_powers():
    a = spd(6, seed=3)
    root = psd_sqrt(a)
    torch.testing.assert_close(root @ root, a)
    torch.testing.assert_close(root, root.T)
    torch.testing.assert_close(psd_sqrt(a, inverse=True) @ a @ psd_sqrt(a, inverse=True), torch.eye(6, dtype=a.dtype))
    torch.testing.assert_close(psd_power(a, 1 / 3) @ psd_power(a, 1 / 3) @ psd_power(a, 1 / 3), a)


@pytest.mark.parametrize("d", [2, 5, 16])
def test_gaussian_ot_map_carries_one_covariance_onto_the_other(d):
    source, target = spd(d, seed=4 + d), spd(d, seed=40 + d, condition=10.0)
    a = gaussian_ot_map(source, target)
    torch.testing.assert_close(a @ source @ a.T, target, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(a, a.T)  # the OT map between centred Gaussians is symmetric ...
    assert torch.linalg.eigvalsh(a).min() > 0  # ... and positive definite (a gradient of a convex function)


def test_real_matrix_root():
    # a rotation-scaling (complex eigenvalues) inside a matrix with positive real ones
    theta, r = 0.7, 0.9
    block = r * torch.tensor([[torch.cos(torch.tensor(theta)), -torch.sin(torch.tensor(theta))],
                              [torch.sin(torch.tensor(theta)), torch.cos(torch.tensor(theta))]], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen(7), dtype=torch.float64))
    a = q @ torch.block_diag(block, torch.diag(torch.tensor([1.5, 0.2], dtype=torch.float64))) @ q.T
    for k in (1, 2, 3, 10):
        root = real_matrix_root(a, k)
        assert root.dtype == a.dtype and not root.is_complex()
        torch.testing.assert_close(torch.linalg.matrix_power(root, k), a, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="k must be"):
        real_matrix_root(a, 0)


def test_polar_decomposition():
    a = torch.randn(5, 5, generator=gen(8), dtype=torch.float64)
    u, p = polar(a)
    torch.testing.assert_close(u @ p, a)
    torch.testing.assert_close(u @ u.T, torch.eye(5, dtype=a.dtype))
    torch.testing.assert_close(p, p.T)
    assert torch.linalg.eigvalsh(p).min() >= -1e-12


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_conjugate_gradients_match_a_direct_solve(dtype, rtol):
    """The SPD operator X -> Σ G_i X M_i + ρ X on d x (d+1) matrices, as in the redirect."""
    d = 6
    gs = [spd(d, seed=10 + i) for i in range(3)]
    ms = [spd(d + 1, seed=20 + i) for i in range(3)]
    rho = 1e-3
    rhs = torch.randn(d, d + 1, generator=gen(30), dtype=torch.float64)
    big = sum(torch.kron(m, g) for g, m in zip(gs, ms)) + rho * torch.eye(d * (d + 1), dtype=torch.float64)
    direct = torch.linalg.solve(big, rhs.T.reshape(-1)).reshape(d + 1, d).T  # column-major vec

    def operator(x: torch.Tensor) -> torch.Tensor:
        return sum(g.to(dtype) @ x @ m.to(dtype) for g, m in zip(gs, ms)) + rho * x

    x = solve_spd(operator, rhs.to(dtype), rtol=rtol * 1e-2, max_iter=2000)
    assert x.dtype == dtype
    torch.testing.assert_close(x.double(), direct, rtol=0, atol=50 * rtol * float(direct.abs().max()))


@pytest.mark.parametrize("k", [None, 5, 100, 299, 300])
def test_top_eigh_is_the_leading_part_of_the_full_decomposition(k):
    """The subset solver (k under a third of 300) and torch's full eigh give the same leading
    eigenpairs: eigenvalues to rounding, eigenvectors up to sign."""
    a = spd(300, seed=9, condition=1e4)
    evals, evecs = top_eigh(a, k)
    full_evals, full_evecs = torch.linalg.eigh(a)
    n = 300 if k is None else k
    assert evals.shape == (n,) and evecs.shape == (300, n) and evals.dtype == a.dtype
    torch.testing.assert_close(evals, full_evals.flip(0)[:n], rtol=1e-10, atol=0)
    cosines = (evecs * full_evecs.flip(1)[:, :n]).sum(0).abs()
    torch.testing.assert_close(cosines, torch.ones(n, dtype=a.dtype), rtol=0, atol=1e-8)
    torch.testing.assert_close(a @ evecs, evecs * evals, rtol=0, atol=1e-9)


@pytest.mark.parametrize("n", [10, 300])
def test_top_eigh_of_no_components_is_empty(n):
    evals, evecs = top_eigh(spd(n, seed=1), 0)
    assert evals.shape == (0,) and evecs.shape == (n, 0)
