"""Tests of koopman_hooks/analysis/spectrum.py: the decomposition against its defining identities."""

from __future__ import annotations

import math

import pytest
import torch

from koopman_hooks import KoopmanProbe
from koopman_hooks.analysis import koopman_spectrum
from koopman_hooks.data import TensorLoader
from koopman_hooks.models import ResMLP


def rotation_and_decay() -> torch.Tensor:
    """Block-diagonal: a rotation by 0.3 rad shrunk to 0.9, a decay of 0.5, a kept direction."""
    k = torch.zeros(4, 4, dtype=torch.float64)
    k[:2, :2] = 0.9 * torch.tensor([[math.cos(0.3), -math.sin(0.3)], [math.sin(0.3), math.cos(0.3)]], dtype=torch.float64)
    k[2, 2], k[3, 3] = 0.5, 1.0
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    return q @ k @ q.T


def test_the_spectrum_decomposes_k_and_its_eigenfunctions_advance_by_the_eigenvalues():
    k = rotation_and_decay()
    spec = koopman_spectrum(k)
    torch.testing.assert_close(spec.moduli, torch.tensor([1.0, 0.9, 0.9, 0.5], dtype=torch.float64))
    torch.testing.assert_close(spec.frequencies.abs().sort().values,
                               torch.tensor([0.0, 0.0, 0.3, 0.3], dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(spec.timescales, torch.tensor([math.inf, -1 / math.log(0.9), -1 / math.log(0.9),
                                                              -1 / math.log(0.5)], dtype=torch.float64))
    torch.testing.assert_close(spec.matrix(), k)
    for i in range(4):  # K v_i = λ_i v_i
        torch.testing.assert_close(k.to(spec.modes.dtype) @ spec.modes[:, i], spec.eigenvalues[i] * spec.modes[:, i])
    z = torch.randn(7, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(spec.eigenfunctions(z @ k.T), spec.eigenfunctions(z) * spec.eigenvalues)
    assert spec.condition < 10


def test_bad_operators_and_latents_are_refused():
    with pytest.raises(ValueError, match="square"):
        koopman_spectrum(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        koopman_spectrum(torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        koopman_spectrum(rotation_and_decay()).eigenfunctions(torch.zeros(3, 5))


def test_a_probes_spectrum_is_its_fitted_k_and_an_edited_surrogates_its_edited_k():
    torch.manual_seed(0)
    model = ResMLP(4, 3, width=6, depth=3)
    g = torch.Generator().manual_seed(0)
    loader = TensorLoader(torch.randn(96, 4, generator=g), torch.randint(0, 3, (96,), generator=g), batch_size=32)
    probe = KoopmanProbe(model, ["blocks.0", "blocks.2"], latent_dim=6, hidden=(8,), width=4, verbose=False)
    probe.fit(loader, epochs=1)
    spec = probe.spectrum()
    k = probe.fetch_model().autoencoder.operator.matrix().double()
    torch.testing.assert_close(spec.matrix(), k, rtol=1e-6, atol=1e-8)
    assert spec.offsets == tuple(probe.fetch_model().autoencoder.offsets)
    surrogate = probe.surrogate()
    torch.testing.assert_close(probe.spectrum(surrogate).matrix(), k, rtol=1e-6, atol=1e-6)
    z = surrogate.encode(torch.randn(5, 6))  # blocks.0's width
    step = surrogate.advance(z, 1)
    torch.testing.assert_close(spec.eigenfunctions(step), spec.eigenfunctions(z) * spec.eigenvalues, rtol=1e-4, atol=1e-5)


def test_an_affine_maps_spectrum_reads_the_constant_coordinate_too():
    k = 0.95 * rotation_and_decay()  # no eigenvalue 1: the map has a fixed point, the homogeneous form a basis
    b = torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=torch.float64)
    homogeneous = torch.eye(5, dtype=torch.float64)
    homogeneous[:4, :4], homogeneous[:4, 4] = k, b
    spec = koopman_spectrum(homogeneous, affine=True)
    assert spec.affine and len(spec.eigenvalues) == 5
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(spec.eigenfunctions(z @ k.T + b), spec.eigenfunctions(z) * spec.eigenvalues)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        spec.eigenfunctions(torch.zeros(2, 5))
