"""Tests of koopman_hooks/koopman/operator.py."""

from __future__ import annotations

import pytest
import torch

from koopman_hooks.koopman.operator import KoopmanOperator


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




@pytest.mark.parametrize("rows", [3, 40])
def test_advance_applies_the_power_either_way(rows):
    from koopman_hooks.koopman.operator import advance

    g = torch.Generator().manual_seed(0)
    k = torch.randn(12, 12, generator=g, dtype=torch.float64) / 4
    z = torch.randn(rows, 12, generator=g, dtype=torch.float64)
    for steps in (0, 1, 3, 5):
        torch.testing.assert_close(advance(k, z, steps), z @ torch.linalg.matrix_power(k, steps).T)


@pytest.mark.parametrize("parametrization", ["dense", "exp", "lowrank"])
@pytest.mark.parametrize("rows", [5, 40])
def test_autoencoder_trajectory_is_every_offsets_power_of_z0(parametrization, rows):
    """``trajectory`` advances segment by segment; each entry is ``z0 @ (K^{o_j})ᵀ`` as if
    computed afresh from z0 (fewer rows than latent dimensions, and more)."""
    from koopman_hooks.koopman.autoencoder import AutoencoderConfig, KoopmanAutoencoder

    g = torch.Generator().manual_seed(3)
    ae = KoopmanAutoencoder(AutoencoderConfig(6, 12, (8,), parametrization, 4, (1, 3, 2)))
    with torch.no_grad():
        for p in ae.operator.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    z0 = torch.randn(rows, 12, generator=g)
    for z, offset in zip(ae.trajectory(z0), ae.offsets[1:], strict=True):
        torch.testing.assert_close(z, z0 @ ae.operator.power(offset).T, rtol=1e-4, atol=1e-5)


def test_exp_starts_exactly_at_a_defective_operator_and_says_when_it_cannot():
    jordan = torch.tensor([[0.9, 1.0], [0.0, 0.9]], dtype=torch.float64)  # not diagonalisable; log is real
    for steps in (1, 4):
        op = KoopmanOperator(2, "exp", total_steps=steps)
        assert op.initialize(jordan) < 1e-6
        torch.testing.assert_close(op.matrix().double(), jordan, rtol=1e-6, atol=1e-6)
    negative = torch.diag(torch.tensor([-0.5, 0.9], dtype=torch.float64))  # no real logarithm
    assert KoopmanOperator(2, "exp").initialize(negative) > 0.5
