"""Tests of koopman_hooks/maths/stats.py."""

from __future__ import annotations

import pytest
import torch

from koopman_hooks.maths.stats import JointMoments, StreamingMoments

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



def test_float32_products_match_whole_batch_to_float32_rounding():
    # float32 rows far from the origin: each batch is centred on its own float64 mean before its
    # float32 products, so the error is float32's rounding of the spread, not of the offset
    x = anisotropic(200, 6, seed=4, offset=100.0).float()
    y = (torch.randn(200, 3, generator=gen(5)) - 30.0).float()
    m = StreamingMoments(6, 3, products=torch.float32)
    start = 0
    for b in UNEVEN:
        m.update(x[start : start + b], y[start : start + b])
        start += b
    x64, y64 = x.double(), y.double()
    torch.testing.assert_close(m.mean_x, x64.mean(0), rtol=0, atol=1e-10)
    for got, want in ((m.cov_xx, torch.cov(x64.T, correction=0)), (m.cov_yy, torch.cov(y64.T, correction=0)),
                      (m.cov_xy, (x64 - x64.mean(0)).T @ (y64 - y64.mean(0)) / 200)):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    exact = stream(x64, y64)
    assert (m.cov_xx - exact.cov_xx).abs().max() > 0  # the products really were float32
    halves = [StreamingMoments.of(x[:77]), StreamingMoments(6, products=torch.float32).update(x[77:])]
    pooled = StreamingMoments.pooled(halves[::-1])
    assert pooled.products == torch.float32 and pooled.to("cpu").products == torch.float32
    torch.testing.assert_close(pooled.cov_xx, exact.cov_xx, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="products must be torch.float32 or torch.float64"):
        StreamingMoments(3, products=torch.float16)


def test_float32_products_by_blocks_of_columns_and_float64_for_small_batches():
    from koopman_hooks.maths.stats import PRODUCT_COLUMNS

    width = PRODUCT_COLUMNS + 88  # two blocks of columns
    x = torch.randn(400, width, generator=gen(6)) + 3.0
    oracle = torch.cov(x.double().T, correction=0)
    wide = StreamingMoments(width, products=torch.float32)
    for start in range(0, 400, 100):  # 16 x 100 >= width: float32 products, by blocks
        wide.update(x[start : start + 100])
    torch.testing.assert_close(wide.cov_xx, oracle, rtol=0, atol=2e-5)
    assert (wide.cov_xx - oracle).abs().max() > 1e-12
    narrow = StreamingMoments(width, products=torch.float32)
    for start in range(0, 400, 20):  # 16 x 20 < width: these batches are multiplied in float64
        narrow.update(x[start : start + 20])
    torch.testing.assert_close(narrow.cov_xx, oracle, rtol=0, atol=1e-10)


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




def joint_data(n: int = 200) -> list[torch.Tensor]:
    """Three blocks of different widths on the same rows, correlated and far from the origin."""
    a = anisotropic(n, 5, seed=8, offset=40.0)
    return [a, a[:, :3] ** 2 - 7.0 + 0.1 * anisotropic(n, 3, seed=9), anisotropic(n, 4, seed=10, offset=-20.0)]


@pytest.mark.parametrize("products", [torch.float64, torch.float32])
def test_joint_moments_match_whole_batch(products):
    blocks = joint_data()
    if products == torch.float32:
        blocks = [b.float() for b in blocks]
    pairs = [(0, 1), (0, 2), (1, 2), (2, 0)]
    m = JointMoments([5, 3, 4], pairs, products=products)
    start = 0
    for b in UNEVEN:
        assert m.update([x[start : start + b] for x in blocks]) is m
        start += b
    assert m.n == 200
    exact = [x.double() for x in blocks]
    # float32 products: float32's rounding of each batch's spread (block 1's variance is ~1e4)
    tol = {"rtol": 1e-10, "atol": 1e-9} if products == torch.float64 else {"rtol": 1e-5, "atol": 1e-4}
    for mean, x in zip(m.means, exact):
        torch.testing.assert_close(mean, x.mean(0), rtol=0, atol=1e-10)
    for m2, x in zip(m.m2, exact):
        torch.testing.assert_close(m2 / 200, torch.cov(x.T, correction=0), **tol)
    for i, j in pairs:
        xi, xj = exact[i], exact[j]
        oracle = (xi - xi.mean(0)).T @ (xj - xj.mean(0)) / 200
        torch.testing.assert_close(m.m2_cross[i, j] / 200, oracle, **tol)
        # a pair reads as the StreamingMoments of those two blocks
        one = m.pair(i, j)
        alone = stream(xi, xj)
        for name in ("cov_xx", "cov_yy", "cov_xy", "mean_x", "mean_y"):
            torch.testing.assert_close(getattr(one, name), getattr(alone, name), **tol)
    m.pair(0, 1).m2_xx.add_(1.0)  # a copy: the joint moments are untouched
    torch.testing.assert_close(m.m2[0] / 200, torch.cov(exact[0].T, correction=0), **tol)


def test_joint_moments_merge_equals_the_union():
    blocks = joint_data()
    pairs = [(0, 1), (1, 2)]
    whole = JointMoments([5, 3, 4], pairs).update(blocks)
    parts = [JointMoments([5, 3, 4], pairs).update([x[a:b] for x in blocks]) for a, b in ((0, 1), (1, 120), (120, 200))]
    merged = parts[0].merge(parts[1]).merge(parts[2]).merge(JointMoments([5, 3, 4], pairs))
    assert merged.n == 200
    for got, want in zip([*merged.means, *merged.m2, *merged.m2_cross.values()],
                         [*whole.means, *whole.m2, *whole.m2_cross.values()]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-9)
    empty = JointMoments([5, 3, 4], pairs).merge(whole)
    torch.testing.assert_close(empty.m2_cross[1, 2], whole.m2_cross[1, 2], rtol=0, atol=0)


def test_joint_moments_check_their_input():
    with pytest.raises(ValueError, match="outside 0..1"):
        JointMoments([2, 3], [(0, 2)])
    m = JointMoments([2, 3], [(0, 1)])
    with pytest.raises(ValueError, match="expected 2 blocks"):
        m.update([torch.randn(4, 2)])
    with pytest.raises(ValueError, match=r"block 1: expected \(4, 3\)"):
        m.update([torch.randn(4, 2), torch.randn(4, 5)])
    with pytest.raises(ValueError, match=r"block 1: expected \(4, 3\)"):
        m.update([torch.randn(4, 2), torch.randn(3, 3)])
    with pytest.raises(KeyError, match=r"pair \(1, 0\) is not tracked"):
        m.pair(1, 0)
    with pytest.raises(ValueError, match="cannot merge"):
        m.merge(JointMoments([2, 3], [(1, 0)]))
    assert m.update([torch.zeros(0, 2), torch.zeros(0, 3)]).n == 0


from koopman_hooks.maths.stats import ridge_regression


def streamed(x: torch.Tensor, y: torch.Tensor, sizes=(5, 40, 1, 33, 21)) -> StreamingMoments:
    m = StreamingMoments(x.shape[1], y.shape[1])
    start = 0
    for b in sizes:
        m.update(x[start : start + b], y[start : start + b])
        start += b
    assert start == len(x)
    return m


def regression_data(n: int = 100, seed: int = 7):
    g = gen(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64) + 2.0
    w = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = x @ w + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    y = y + 0.3 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    return x, y



def test_ridge_zero_with_intercept_is_least_squares():
    x, y = regression_data()
    weight, bias = ridge_regression(streamed(x, y), ridge=0.0, intercept=True)
    design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    oracle = torch.linalg.lstsq(design, y).solution
    assert weight.shape == (5, 3) and bias.shape == (3,)
    assert weight.dtype == torch.float64
    torch.testing.assert_close(weight, oracle[:5], rtol=0, atol=1e-8)
    torch.testing.assert_close(bias, oracle[5], rtol=0, atol=1e-8)



def test_ridge_zero_without_intercept_is_least_squares():
    x, y = regression_data(seed=8)
    weight, bias = ridge_regression(streamed(x, y), ridge=0.0, intercept=False)
    oracle = torch.linalg.lstsq(x, y).solution
    torch.testing.assert_close(weight, oracle, rtol=0, atol=1e-8)
    torch.testing.assert_close(bias, torch.zeros(3, dtype=torch.float64))



def test_ridge_shrinks():
    x, y = regression_data(seed=9)
    m = streamed(x, y)
    w0, _ = ridge_regression(m, ridge=0.0)
    w1, _ = ridge_regression(m, ridge=1.0)
    assert w1.norm() < w0.norm()
    # explicit ridge formula on centred moments, penalty relative to the mean variance
    cxx = torch.cov(x.T, correction=0)
    cxy = (x - x.mean(0)).T @ (y - y.mean(0)) / len(x)
    lam = cxx.diagonal().mean()
    torch.testing.assert_close(w1, torch.linalg.solve(cxx + lam * torch.eye(5, dtype=torch.float64), cxy), rtol=0, atol=1e-10)




def test_merge_of_disjoint_parts_equals_the_whole():
    x = anisotropic(200, 5, seed=4, offset=40.0)
    y = torch.randn(200, 3, generator=gen(5), dtype=torch.float64) + x[:, :3] * 2
    whole = StreamingMoments.of(x, y)
    parts = [StreamingMoments.of(x[a:b], y[a:b]) for a, b in ((0, 1), (1, 90), (90, 90), (90, 200))]
    merged = StreamingMoments(5, 3)
    for part in parts:
        assert merged.merge(part) is merged
    assert merged.n == whole.n == 200
    for name in ("mean_x", "mean_y", "cov_xx", "cov_yy", "cov_xy"):
        torch.testing.assert_close(getattr(merged, name), getattr(whole, name), rtol=0, atol=1e-10)
    pooled = StreamingMoments.pooled(parts)
    torch.testing.assert_close(pooled.cov_xy, whole.cov_xy, rtol=0, atol=1e-10)
    assert parts[0].n == 1  # pooling leaves its parts alone
    with pytest.raises(ValueError, match="cannot merge"):
        merged.merge(StreamingMoments(4))


def test_second_moment_is_the_homogeneous_oracle():
    x = anisotropic(100, 3, seed=6)
    m = StreamingMoments.of(x)
    xh = torch.cat([x, torch.ones(100, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(m.second_moment(), xh.T @ xh / 100, rtol=0, atol=1e-10)
