"""Tests of koopman_hooks/koopman/losses.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from koopman_hooks.koopman.autoencoder import AutoencoderConfig, KoopmanAutoencoder
from koopman_hooks.koopman.losses import (
    LossWeights,
    TopologicalLoss,
    fvu,
    koopman_losses,
    output_matching_loss,
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




@pytest.mark.parametrize("layers", [2, 4, 6])
def test_koopman_losses_against_their_definitions(layers: int) -> None:
    """Reconstruction at the first and last layer, state from layers[0] to every later layer,
    latent from layers[0] and between consecutive layers: each term recomputed by hand."""
    torch.manual_seed(0)
    ae = KoopmanAutoencoder(AutoencoderConfig(width=5, latent_dim=7, hidden=(6,), segment_steps=(1, 2, 1, 1, 2)[: layers - 1]))
    states = [torch.randn(32, 5) for _ in range(layers)]
    losses = koopman_losses(ae, states, LossWeights())
    with torch.no_grad():
        z = [ae.encoder(a) for a in states]
        offsets = ae.offsets
        step = lambda v, s: ae.operator.step(v, s)  # noqa: E731
        reconstruction = torch.stack([fvu(ae.decoder(z[i]), states[i]) for i in (0, layers - 1)]).mean()
        # the state term sums over the predicted layers; the latent term's mean grows half as fast
        state = sum(fvu(ae.decoder(step(z[0], offsets[j])), states[j]) for j in range(1, layers))
        pairs = [(0, j) for j in range(1, layers)] + [(i, i + 1) for i in range(1, layers - 1)]
        latent = torch.stack([fvu(step(z[i], offsets[j] - offsets[i]), z[j]) for i, j in pairs]).mean()
        latent = latent * max(1.0, (layers - 1) / 2)
        prediction = ae.decoder(step(z[0], offsets[-1]))
    torch.testing.assert_close(losses["reconstruction"], reconstruction, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["state"], state, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["latent"], latent, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["prediction"], prediction, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["total"], reconstruction + state + latent, rtol=1e-5, atol=1e-6)


def test_output_matching_loss_against_its_definition_at_any_temperature() -> None:
    g = torch.Generator().manual_seed(0)
    model, patched = torch.randn(64, 5, generator=g) * 3, torch.randn(64, 5, generator=g) * 3
    for t in (1.0, 4.0):
        p = torch.softmax(model.double() / t, -1)
        q = torch.softmax(patched.double() / t, -1)
        rows = (p * (p.log() - q.log())).sum(1) * t * t  # KL(model || patched), softened, times t²
        assert float(output_matching_loss(patched, model, temperature=t)) == pytest.approx(float(rows.mean()), rel=1e-5)
        torch.testing.assert_close(output_matching_loss(patched, model, per_row=True, temperature=t).double(), rows,
                                   rtol=1e-5, atol=1e-7)
    assert float(output_matching_loss(model, model, temperature=4.0)) == pytest.approx(0.0, abs=1e-6)
    # softened targets weigh the classes the model does not pick: a patched model that keeps the top
    # class but reorders the others is penalised more, relative to one that gets the top class wrong
    top_kept = model.clone()
    top_kept[:, 1:] = model[:, 1:].flip(1)
    top_kept[:, 0] = model.max(1).values + 5  # class 0 on top everywhere ...
    reference = top_kept.clone()
    reference[:, 1:] = model[:, 1:]  # ... and the others in the model's order
    ratio = [float(output_matching_loss(top_kept, reference, temperature=t)) for t in (1.0, 4.0)]
    assert ratio[1] > 2 * ratio[0]
