"""Tests of koopman_hooks/koopman/losses.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from koopman_hooks.koopman.losses import (
    TopologicalLoss,
)


def random_rotation(dim: int, seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return q



@pytest.mark.parametrize("normalise_distances", [True, False])
def test_topological_loss_zero_on_isometry_positive_on_distortion(normalise_distances: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 6, dtype=torch.float64)
    q = torch.from_numpy(random_rotation(6, seed=2))
    loss_fn = TopologicalLoss(normalise=normalise_distances)

    z_iso = (x @ q).requires_grad_(True)
    assert loss_fn(x, z_iso).item() <= 1e-6

    scale = torch.tensor([3.0, 1.0, 0.2, 1.0, 0.5, 2.0], dtype=torch.float64)
    z = (x @ q * scale).requires_grad_(True)
    loss = loss_fn(x, z)
    assert loss.item() > 1e-3
    loss.backward()
    assert z.grad is not None
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0



def test_topological_loss_float32_and_coincident_points() -> None:
    torch.manual_seed(1)
    x = torch.randn(32, 10)
    x[1] = x[0]  # duplicate sample: distance 0 must not break the MST or the gradient
    z = torch.randn(32, 2, requires_grad=True)
    loss = TopologicalLoss()(x, z)
    loss.backward()
    assert loss.item() > 0 and torch.isfinite(z.grad).all()


