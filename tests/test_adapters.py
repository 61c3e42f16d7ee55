"""Tests for koopman_hooks.stats.StreamingMoments and koopman_hooks.adapters (PCA adapters)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from koopman_hooks.adapters import (
    LayerAdapter,
    adapter_from_moments,
    components_for_variance,
    default_reduce,
    expand_activation,
    parse_reduce,
    procrustes_rotation,
    reduce_activation,
    reduced_dim,
)
from koopman_hooks.stats import StreamingMoments

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


# ----------------------------------------------------------------------------- streaming moments


def test_streaming_moments_match_whole_batch():
    x = anisotropic(200, 6, seed=1, offset=100.0)
    y = torch.randn(200, 4, generator=gen(2), dtype=torch.float64) - 30.0 + x[:, :4] ** 2
    m = stream(x, y)
    assert m.n == 200
    mx, my = x.mean(0), y.mean(0)
    torch.testing.assert_close(m.mean_x, mx, rtol=0, atol=1e-10)
    torch.testing.assert_close(m.mean_y, my, rtol=0, atol=1e-10)
    torch.testing.assert_close(m.cov_xx, torch.cov(x.T, correction=0), rtol=0, atol=1e-10)
    torch.testing.assert_close(m.cov_yy, torch.cov(y.T, correction=0), rtol=0, atol=1e-9)
    torch.testing.assert_close(m.cov_xy, (x - mx).T @ (y - my) / 200, rtol=0, atol=1e-10)
    assert m.cov_xx.dtype == torch.float64


def test_streaming_moments_order_and_batching_invariant():
    x = anisotropic(200, 5, seed=3)
    a = stream(x, sizes=UNEVEN)
    b = stream(x, sizes=[200])
    c = stream(x, sizes=[1] * 200)
    for other in (b, c):
        torch.testing.assert_close(a.cov_xx, other.cov_xx, rtol=0, atol=1e-10)
        torch.testing.assert_close(a.mean_x, other.mean_x, rtol=0, atol=1e-12)


def test_streaming_moments_flattens_and_checks():
    x = torch.randn(10, 2, 3, dtype=torch.float64)
    m = StreamingMoments(6).update(x)
    torch.testing.assert_close(m.mean_x, x.reshape(10, 6).mean(0))
    with pytest.raises(ValueError, match="no samples"):
        _ = StreamingMoments(3).cov_xx
    with pytest.raises(ValueError, match="expected 3 features"):
        StreamingMoments(3).update(torch.randn(4, 5))
    with pytest.raises(ValueError):
        StreamingMoments(3).update(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError):
        StreamingMoments(3, 2).update(torch.randn(4, 3))


# ----------------------------------------------------------------------------- PCA adapters


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


# ----------------------------------------------------------------------------- reductions


@pytest.mark.parametrize(
    "shape, reduce, features",
    [
        ((3, 4, 4), "flatten", 48),
        ((5, 3), "flatten", 15),
        ((3, 6, 6), "pool:2x2", 12),
        ((3, 6, 6), "pool", 12),
        ((2, 6, 9), "pool:2x3", 12),
        ((5, 4), "cls", 4),
        ((5, 4), "mean", 4),
    ],
)
def test_reduced_dim_matches_reduce(shape, reduce, features):
    x = torch.randn(7, *shape)
    flat = reduce_activation(x, reduce)
    assert flat.shape == (7, features)
    assert reduced_dim(shape, reduce) == features


@pytest.mark.parametrize("shape", [(2, 3, 4), (5, 3)])
def test_flatten_full_width_round_trip(shape):
    x = torch.randn(60, *shape, generator=gen(10)) * 2 + 1
    adapter = fit(x, width=reduced_dim(shape, "flatten"))
    back = adapter.inverse(adapter(x), like=x)
    assert back.shape == x.shape
    torch.testing.assert_close(back, x, rtol=0, atol=1e-4)
    torch.testing.assert_close(adapter.inverse(adapter(x)), x, rtol=0, atol=1e-4)


def test_pool_round_trip_and_lossy_inverse():
    x = torch.randn(40, 3, 6, 6, generator=gen(11))
    adapter = fit(x, width=12, reduce="pool:2x2")
    a = adapter(x)
    assert a.shape == (40, 12)
    back = adapter.inverse(a, like=x)
    assert back.shape == x.shape
    torch.testing.assert_close(back, x, rtol=0, atol=1e-4)  # pooled delta is zero
    # for another latent, the result pools to the decoded features and keeps the detail of x
    a2 = a + torch.randn(a.shape, generator=gen(12))
    back2 = adapter.inverse(a2, like=x)
    pooled = F.adaptive_avg_pool2d(back2, 2).reshape(40, 12)
    torch.testing.assert_close(pooled, adapter.decode_features(a2), rtol=0, atol=1e-4)
    detail = back2 - F.interpolate(F.adaptive_avg_pool2d(back2, 2), size=(6, 6), mode="nearest")
    detail_x = x - F.interpolate(F.adaptive_avg_pool2d(x, 2), size=(6, 6), mode="nearest")
    torch.testing.assert_close(detail, detail_x, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="lossy"):
        adapter.inverse(a)


def test_cls_and_mean_inverse():
    x = torch.randn(50, 5, 4, generator=gen(13))
    for reduce in ("cls", "mean"):
        adapter = fit(x, width=4, reduce=reduce)
        a = adapter(x)
        back = adapter.inverse(a, like=x)
        assert back.shape == x.shape
        torch.testing.assert_close(back, x, rtol=0, atol=1e-4)
        a2 = a + 1.0
        back2 = adapter.inverse(a2, like=x)
        decoded = adapter.decode_features(a2)
        if reduce == "cls":
            torch.testing.assert_close(back2[:, 0], decoded, rtol=0, atol=1e-5)
            torch.testing.assert_close(back2[:, 1:], x[:, 1:])
        else:
            torch.testing.assert_close(back2.mean(1), decoded, rtol=0, atol=1e-5)
            shift = back2 - x  # the same shift for every token
            torch.testing.assert_close(shift, shift[:, :1].expand_as(shift), rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="lossy"):
            adapter.inverse(a2)


def test_expand_activation_flatten_without_like():
    flat = torch.randn(3, 12)
    torch.testing.assert_close(expand_activation(flat, "flatten", (3, 2, 2), None), flat.reshape(3, 3, 2, 2))


def test_default_reduce():
    assert default_reduce((10,)) == "flatten"
    assert default_reduce((3, 8, 8)) == "flatten"
    assert default_reduce((256, 4, 4)) == "flatten"  # exactly 4096
    assert default_reduce((64, 32, 32)) == "pool:8x8"
    assert default_reduce((512, 8, 8)) == "pool:2x2"
    assert default_reduce((16, 1, 300)) == "pool:1x16"
    assert default_reduce((197, 768)) == "mean"
    assert default_reduce((10, 10), max_features=50) == "mean"
    for shape in [(64, 32, 32), (512, 8, 8), (197, 768)]:
        spec = default_reduce(shape)
        assert reduced_dim(shape, spec) <= 4096
        assert reduce_activation(torch.zeros(1, *shape), spec).shape == (1, reduced_dim(shape, spec))


@pytest.mark.parametrize("spec", ["max", "", "flatten:2", "cls:1", "mean:4", "pool:ax2", "pool:2xb", "Flatten"])
def test_bad_reduce_specs(spec):
    with pytest.raises(ValueError):
        parse_reduce(spec)
    with pytest.raises(ValueError):
        reduce_activation(torch.zeros(2, 3, 4, 4), spec)


def test_reduce_shape_errors():
    assert parse_reduce("pool") == ("pool", (2, 2))
    assert parse_reduce("pool:3") == ("pool", (3, 3))
    assert parse_reduce("pool:2x5") == ("pool", (2, 5))
    with pytest.raises(ValueError, match="pool"):
        reduce_activation(torch.zeros(2, 5, 4), "pool:2x2")
    with pytest.raises(ValueError, match="cls"):
        reduce_activation(torch.zeros(2, 3, 4, 4), "cls")
    with pytest.raises(ValueError, match="mean"):
        reduce_activation(torch.zeros(2, 4), "mean")


# ----------------------------------------------------------------------------- procrustes


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
