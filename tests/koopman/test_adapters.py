"""Tests of koopman_hooks/koopman/adapters.py."""

from __future__ import annotations

import pytest
import torch

from koopman_hooks.koopman.adapters import (
    LayerAdapter,
    adapter_from_moments,
    components_for_variance,
    procrustes_rotation,
    spectrum,
)
from koopman_hooks.koopman.reduce import reduce_activation
from koopman_hooks.maths.stats import StreamingMoments

UNEVEN = [1, 7, 0, 3, 50, 2, 1, 36, 13, 4, 83]  # sums to 200


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def anisotropic(n: int, d: int, seed: int = 0, offset: float = 5.0) -> torch.Tensor:
    """Rows with distinct variances along a random rotation, away from the origin."""
    g = gen(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = torch.linspace(3.0, 0.2, d, dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ q.T + offset


def stream(x: torch.Tensor, y: torch.Tensor | None = None, sizes=UNEVEN) -> StreamingMoments:
    assert sum(sizes) == len(x)
    m = StreamingMoments(x.shape[1], None if y is None else y.shape[1])
    start = 0
    for b in sizes:
        out = m.update(x[start : start + b], None if y is None else y[start : start + b])
        assert out is m
        start += b
    return m


def fit(x: torch.Tensor, width: int, reduce: str = "flatten") -> LayerAdapter:
    flat = reduce_activation(x, reduce).double()
    m = StreamingMoments(flat.shape[1])
    for chunk in flat.split(17):
        m.update(chunk)
    return adapter_from_moments(tuple(x.shape[1:]), reduce, m, width)



@pytest.mark.parametrize("width", [2, 4])
def test_streaming_pca_matches_svd(width):
    x = anisotropic(200, 6, seed=4)
    adapter = adapter_from_moments((6,), "flatten", stream(x), width)
    xc = x - x.mean(0)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    v = vh[:width].T  # (D, width)
    basis = adapter.basis.double()
    # same subspace: the basis columns are the principal directions up to sign
    torch.testing.assert_close((basis.T @ v).abs(), torch.eye(width, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(basis.T @ basis, torch.eye(width, dtype=torch.float64), rtol=0, atol=1e-5)
    # sign convention: each component's largest-magnitude entry is positive
    idx = basis.abs().argmax(0)
    assert (basis[idx, torch.arange(width)] > 0).all()
    # same scale: sqrt(mean kept variance)
    expected_scale = torch.sqrt((s[:width] ** 2 / len(x)).sum() / width)
    assert float(adapter.scale) == pytest.approx(float(expected_scale), rel=1e-5)
    # same projections after aligning signs
    signs = torch.sign((basis * v).sum(0))
    proj = adapter(x.float()).double() * float(adapter.scale)
    torch.testing.assert_close(proj * signs, xc @ v, rtol=0, atol=2e-4)



def test_inverse_full_width_round_trips():
    x = anisotropic(150, 5, seed=5).float()
    adapter = fit(x, width=5)
    torch.testing.assert_close(adapter.inverse(adapter(x)), x, rtol=0, atol=1e-4)



def test_inverse_narrow_width_is_principal_projection():
    x64 = anisotropic(150, 6, seed=6)
    x = x64.float()
    adapter = fit(x, width=3)
    mean = x64.mean(0)
    _, _, vh = torch.linalg.svd(x64 - mean, full_matrices=False)
    v = vh[:3].T
    oracle = mean + (x64 - mean) @ v @ v.T
    recon = adapter.inverse(adapter(x)).double()
    torch.testing.assert_close(recon, oracle, rtol=0, atol=2e-4)
    # and it is genuinely lossy
    assert (recon - x64).abs().max() > 0.05



def test_inverse_wider_than_layer_zero_pads():
    x = anisotropic(150, 4, seed=7).float()
    adapter = fit(x, width=7)
    assert adapter.width == 7
    torch.testing.assert_close(adapter.basis[:, 4:], torch.zeros(4, 3))
    a = adapter(x)
    assert a.shape == (150, 7)
    torch.testing.assert_close(a[:, 4:], torch.zeros(150, 3))
    torch.testing.assert_close(adapter.inverse(a), x, rtol=0, atol=1e-4)



@pytest.mark.parametrize("width", [2, 5, 9])
def test_unit_rms(width):
    x = anisotropic(300, 5, seed=8).float()
    adapter = fit(x, width)
    a = adapter(x)
    rms = (a.pow(2).sum(1) / width).mean()
    assert float(rms) == pytest.approx(1.0, rel=1e-4)
    # centred: the mean of the adapted data is zero
    torch.testing.assert_close(a.mean(0), torch.zeros(width), rtol=0, atol=1e-4)



def test_rotated_adapter():
    x = anisotropic(100, 4, seed=9).float()
    adapter = fit(x, 4)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen(1)))
    rot = adapter.rotated(q)
    torch.testing.assert_close(rot(x), adapter(x) @ q, rtol=0, atol=1e-4)
    torch.testing.assert_close(rot.inverse(rot(x)), x, rtol=0, atol=1e-4)
    assert adapter.basis is not rot.basis



def test_components_for_variance():
    x = anisotropic(300, 6, seed=14)
    m = stream(x, sizes=[100, 200])
    evals = torch.linalg.eigvalsh(torch.cov(x.T, correction=0)).flip(0)
    cum = torch.cumsum(evals, 0) / evals.sum()
    assert components_for_variance(m, 1e-9) == 1
    assert components_for_variance(m, 1.0 - 1e-12) == 6
    for fraction in (0.3, 0.5, float(cum[1]) + 1e-6, float(cum[2]) - 1e-6, 0.99):
        k = components_for_variance(m, fraction)
        assert cum[k - 1] >= fraction
        assert k == 1 or cum[k - 2] < fraction
        # from the leading two components only: the same count, or "more than two" (3)
        assert components_for_variance(m, fraction, spectrum(m.cov_xx, 2)) == min(k, 3)


def test_adapter_fitter_bases_from_a_partial_spectrum_match_the_full_one():
    """A 400-feature layer at width 32: the width (variance) and the bases come from the 32
    leading eigenpairs (LAPACK's subset solver), equal to those of the full decomposition."""
    from koopman_hooks.koopman.adapters import AdapterFitter

    x = anisotropic(600, 400, seed=3)
    fitter = AdapterFitter(["a"], {"a": None}).update({"a": x})
    assert fitter.width_for(0.9, 32) == min(32, components_for_variance(fitter.moments["a"], 0.9))
    adapter = fitter.finalize(32)["a"]
    reference = adapter_from_moments((400,), "flatten", fitter.moments["a"], 32, eig=spectrum(fitter.moments["a"].cov_xx))
    torch.testing.assert_close(adapter.basis, reference.basis, rtol=0, atol=1e-6)
    torch.testing.assert_close(adapter.scale, reference.scale, rtol=1e-9, atol=0)



@pytest.mark.parametrize("d", [3, 6])
def test_procrustes_recovers_rotation(d):
    g = gen(d)
    r, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    a = torch.randn(100, d, generator=g, dtype=torch.float64)
    b = a @ r
    est = procrustes_rotation(a.T @ b)
    torch.testing.assert_close(est, r, rtol=0, atol=1e-10)
    torch.testing.assert_close(est.T @ est, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-10)
    # with noise it is still the closest orthogonal map
    noisy = b + 0.01 * torch.randn(100, d, generator=g, dtype=torch.float64)
    est = procrustes_rotation(a.T @ noisy)
    assert (est - r).abs().max() < 0.05
    torch.testing.assert_close(est.T @ est, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-10)




def test_adapter_fitter_streams_the_whole_batch_statistics_and_merges():
    from koopman_hooks.koopman.adapters import AdapterFitter

    g = torch.Generator().manual_seed(0)
    acts = {"conv": torch.randn(120, 3, 8, 8, generator=g) + 1.0, "tokens": torch.randn(120, 5, 4, generator=g),
            "flat": torch.randn(120, 6, generator=g) * 4}
    reduce = {"conv": "pool:2x2", "tokens": "mean", "flat": None}
    whole = AdapterFitter(list(acts), reduce)
    for a in range(0, 120, 32):
        assert whole.update({k: v[a : a + 32] for k, v in acts.items()}) is whole
    assert whole.reduce["flat"] == "flatten" and whole.shapes["conv"] == (3, 8, 8)
    pooled = reduce_activation(acts["conv"], "pool:2x2").double()
    # each batch's products in float32 (the running sums in float64): float32's rounding, no more
    torch.testing.assert_close(whole.moments["conv"].cov_xx, torch.cov(pooled.T, correction=0), rtol=0, atol=2e-6)
    halves = [AdapterFitter(list(acts), reduce).update({k: v[a:b] for k, v in acts.items()})
              for a, b in ((0, 77), (77, 120))]
    merged = halves[0].merge(halves[1])
    width = whole.width_for(0.99, 16)
    for name in acts:
        torch.testing.assert_close(merged.moments[name].cov_xx, whole.moments[name].cov_xx, rtol=0, atol=1e-5)
    for name, (ma, wa) in {n: (merged.finalize(width)[n], whole.finalize(width)[n]) for n in acts}.items():
        torch.testing.assert_close(ma.basis, wa.basis, rtol=0, atol=1e-4)
        torch.testing.assert_close(ma.mean, wa.mean, rtol=0, atol=1e-5)
        assert (ma.template is None) == (name == "flat")  # the strict-mode template of lossy layers
    other = AdapterFitter(list(acts), {**reduce, "tokens": "cls"}).update({k: v[:10] for k, v in acts.items()})
    with pytest.raises(ValueError, match=r"reductions .*'tokens': 'cls'.* into .*'tokens': 'mean'.*set reduce="):
        whole.merge(other)  # e.g. two ranks whose first batches told the head's reduction apart differently
    torch.testing.assert_close(whole.finalize(width)["conv"].template, acts["conv"].mean(0), rtol=0, atol=1e-5)
