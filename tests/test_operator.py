"""Tests for koopman_hooks.operator, stats.ridge_regression and the KoopmanSurrogate artifact."""

from __future__ import annotations

import pytest
import torch

from koopman_hooks.adapters import adapter_from_moments
from koopman_hooks.autoencoder import mlp
from koopman_hooks.operator import KoopmanOperator
from koopman_hooks.stats import StreamingMoments, ridge_regression
from koopman_hooks.surrogate import KoopmanSurrogate, homogeneous


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomised(op: KoopmanOperator, seed: int = 0) -> KoopmanOperator:
    g = gen(seed)
    with torch.no_grad():
        if op.parametrization == "dense":
            op.weight.add_(0.2 * torch.randn(op.dim, op.dim, generator=g))
        elif op.parametrization == "exp":
            op.generator.copy_(0.5 * torch.randn(op.dim, op.dim, generator=g))
        else:
            op.u.copy_(0.6 * torch.randn(op.dim, op.rank, generator=g))
            op.v.copy_(0.6 * torch.randn(op.dim, op.rank, generator=g))
    return op


# ----------------------------------------------------------------------------- operator


@pytest.mark.parametrize("parametrization", ["dense", "exp", "lowrank"])
def test_power_is_repeated_matrix(parametrization):
    op = randomised(KoopmanOperator(5, parametrization, total_steps=4, rank=2), seed=1)
    k = op.matrix().detach()
    acc = torch.eye(5)
    for s in range(1, 6):
        acc = acc @ k
        torch.testing.assert_close(op.power(s).detach(), acc, rtol=0, atol=1e-5)
    torch.testing.assert_close(op.power(0), torch.eye(5))
    z = torch.randn(3, 5, generator=gen(2))
    torch.testing.assert_close(op.step(z, 3).detach(), z @ (k @ k @ k).T, rtol=0, atol=1e-5)
    torch.testing.assert_close(op.step(z, 0).detach(), z)


@pytest.mark.parametrize("parametrization", ["dense", "exp", "lowrank"])
def test_fresh_operator(parametrization):
    op = KoopmanOperator(4, parametrization, total_steps=3, rank=2)
    if parametrization == "lowrank":
        # initialised at U U^T with orthonormal U: a rank-2 projection
        k = op.matrix().detach()
        torch.testing.assert_close(k @ k, k, rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(op.matrix().detach(), torch.eye(4))


def test_exp_power_total_steps_is_matrix_exp():
    op = randomised(KoopmanOperator(4, "exp", total_steps=7), seed=3)
    torch.testing.assert_close(op.power(7), torch.linalg.matrix_exp(op.generator), rtol=0, atol=1e-5)
    torch.testing.assert_close(op.matrix(), torch.linalg.matrix_exp(op.generator / 7), rtol=0, atol=1e-6)
    # total_steps < 1 is clamped to one step
    assert KoopmanOperator(3, "exp", total_steps=0).total_steps == 1


def test_lowrank_rank():
    op = randomised(KoopmanOperator(6, "lowrank", rank=2), seed=4)
    assert op.u.shape == (6, 2) and op.v.shape == (6, 2)
    for s in (1, 3):
        assert torch.linalg.matrix_rank(op.power(s).detach()) <= 2
    assert torch.linalg.matrix_rank(op.matrix().detach()) == 2
    assert KoopmanOperator(6, "lowrank").rank == 3  # default dim // 2
    with pytest.raises(ValueError, match="rank"):
        KoopmanOperator(4, "lowrank", rank=5)


def test_bad_parametrization():
    with pytest.raises(ValueError, match="unknown operator"):
        KoopmanOperator(3, "diagonal")


def test_set_matrix():
    op = KoopmanOperator(3, "dense")
    k = torch.randn(3, 3, generator=gen(5), dtype=torch.float64)
    op.set_matrix(k)
    torch.testing.assert_close(op.matrix().detach(), k.float())
    with pytest.raises(ValueError, match="dense"):
        KoopmanOperator(3, "exp").set_matrix(k)


def test_operator_is_differentiable():
    op = randomised(KoopmanOperator(3, "exp", total_steps=2), seed=6)
    op.step(torch.randn(4, 3), 2).sum().backward()
    assert op.generator.grad is not None and op.generator.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- ridge regression


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


# ----------------------------------------------------------------------------- matrix roots


# ----------------------------------------------------------------------------- surrogate


def make_surrogate(latent: int = 3, width: int = 4, steps: int = 3, bias: bool = True, seed: int = 0) -> KoopmanSurrogate:
    torch.manual_seed(seed)
    g = gen(seed)
    xs = torch.randn(64, 6, generator=g, dtype=torch.float64)
    xd = torch.randn(64, 5, generator=g, dtype=torch.float64) * 2 + 1
    ain = adapter_from_moments((6,), "flatten", StreamingMoments(6).update(xs), width)
    aout = adapter_from_moments((5,), "flatten", StreamingMoments(5).update(xd), width)
    k = torch.eye(latent) + 0.3 * torch.randn(latent, latent, generator=g)
    b = 0.5 * torch.randn(latent, generator=g) if bias else None
    return KoopmanSurrogate(ain, aout, mlp([width, 8, latent]), mlp([latent, 8, width]), homogeneous(k, b),
                            steps, "src.layer", "dst.layer", info={"kind": "test"})


def test_homogeneous():
    k, b = torch.randn(3, 3), torch.randn(3)
    h = homogeneous(k, b)
    assert h.shape == (4, 4)
    torch.testing.assert_close(h[:3, :3], k)
    torch.testing.assert_close(h[:3, 3], b)
    torch.testing.assert_close(h[3], torch.tensor([0.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(homogeneous(k)[:3, 3], torch.zeros(3))


@pytest.mark.parametrize("bias", [False, True])
def test_advance_is_affine_power(bias):
    sur = make_surrogate(bias=bias)
    k, b = sur.operator[:3, :3], sur.operator[:3, 3]
    z = torch.randn(5, 3, generator=gen(4))
    for s in range(0, 5):
        expected = z.clone()
        for _ in range(s):
            expected = expected @ k.T + b
        affine = sum((torch.linalg.matrix_power(k, i) @ b for i in range(s)), torch.zeros(3))
        torch.testing.assert_close(z @ torch.linalg.matrix_power(k, s).T + affine, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(sur.advance(z, s), expected, rtol=0, atol=1e-5)
    # the default is all steps
    torch.testing.assert_close(sur.advance(z), sur.advance(z, 3))
    traj = sur.latent_trajectory(torch.randn(2, 6))
    assert len(traj) == 4
    torch.testing.assert_close(traj[-1], sur.advance(traj[0]), rtol=0, atol=1e-5)


def test_forward_composition():
    sur = make_surrogate()
    x = torch.randn(7, 6, generator=gen(5))
    with torch.no_grad():
        expected = sur.out_adapter.inverse(sur.decoder(sur.read_out(sur.advance(sur.encoder(sur.in_adapter(x))))))
        out = sur(x)
    assert out.shape == (7, 5)
    torch.testing.assert_close(out, expected)
    assert not any(p.requires_grad for p in sur.parameters())
    assert not sur.training


def test_edited_returns_new_and_leaves_original():
    sur = make_surrogate()
    op0, ro0 = sur.operator.clone(), sur.readout.clone()
    x = torch.randn(4, 6, generator=gen(6))
    out0 = sur(x)
    new_op = homogeneous(torch.zeros(3, 3), torch.ones(3))
    readout = homogeneous(2 * torch.eye(3))
    edited = sur.edited(operator=new_op, readout=readout, note="edit")
    assert edited is not sur
    assert torch.equal(sur.operator, op0) and torch.equal(sur.readout, ro0)
    assert torch.equal(edited.operator, new_op) and torch.equal(edited.readout, readout)
    assert edited.info == {"kind": "test", "note": "edit"} and sur.info == {"kind": "test"}
    torch.testing.assert_close(sur(x), out0)
    # the edit acts: every input maps to the same latent 2 * 1 after the constant operator
    z = edited.final_latent(x)
    torch.testing.assert_close(z, torch.full((4, 3), 2.0))
    # deep copy: changing the edited one's modules does not reach the original
    with torch.no_grad():
        edited.encoder[0].weight.add_(1.0)
        edited.operator.add_(1.0)
    torch.testing.assert_close(sur(x), out0)
    assert torch.equal(sur.operator, op0)
    only_readout = sur.edited(readout=readout)
    assert torch.equal(only_readout.operator, op0)


def test_save_load_round_trip(tmp_path):
    sur = make_surrogate().edited(readout=homogeneous(0.5 * torch.eye(3), torch.ones(3)), note="x")
    path = tmp_path / "sur.safetensors"
    sur.save(path)
    loaded = KoopmanSurrogate.load(path)
    x = torch.randn(9, 6, generator=gen(7))
    assert torch.equal(loaded(x), sur(x))
    assert torch.equal(loaded.operator, sur.operator) and torch.equal(loaded.readout, sur.readout)
    assert (loaded.src_layer, loaded.dst_layer, loaded.steps) == ("src.layer", "dst.layer", 3)
    assert loaded.info == sur.info
    for a, b in ((loaded.in_adapter, sur.in_adapter), (loaded.out_adapter, sur.out_adapter)):
        assert a.shape == b.shape and a.reduce == b.reduce
        assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_save_load_identity_encoder(tmp_path):
    base = make_surrogate(latent=4, width=4)
    lin = KoopmanSurrogate(base.in_adapter, base.out_adapter, torch.nn.Identity(), torch.nn.Identity(),
                           homogeneous(torch.randn(4, 4, generator=gen(8)), torch.randn(4, generator=gen(9))),
                           1, "a", "b")
    path = tmp_path / "lin.safetensors"
    lin.save(path)
    loaded = KoopmanSurrogate.load(path)
    x = torch.randn(5, 6, generator=gen(10))
    assert torch.equal(loaded(x), lin(x))
    with pytest.raises(ValueError, match="surrogate"):
        from koopman_hooks.serialization import load_tensors

        load_tensors(path, "probe")
