"""The shared-latent Koopman autoencoder: encoder φ, decoder ψ and latent operator K."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from koopman_hooks.operator import KoopmanOperator


def mlp(dims: Sequence[int]) -> nn.Module:
    """Linear layers with GELU in between; a single entry gives the identity."""
    if len(dims) == 1:
        return nn.Identity()
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


@dataclass
class LossWeights:
    """Weights of the training losses (0 switches a term off).

    ``output`` matches the model's own outputs when ``layers[-1]`` is replaced by the
    prediction (KL divergence of the softmax: for classifiers); it needs a full forward pass.
    """

    reconstruction: float = 1.0
    state: float = 1.0
    latent: float = 1.0
    isometry: float = 0.1
    topological: float = 0.0
    output: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class AutoencoderConfig:
    width: int
    latent_dim: int
    hidden: tuple[int, ...] = (128, 128)
    operator: str = "exp"
    rank: int | None = None
    segment_steps: tuple[int, ...] = field(default_factory=lambda: (10,))


class KoopmanAutoencoder(nn.Module):
    """One encoder/decoder pair shared by every probed layer, and one latent operator.

    Segment ``i`` (layer ``i`` to layer ``i+1``) takes ``segment_steps[i]`` applications of K.
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = mlp([config.width, *config.hidden, config.latent_dim])
        self.decoder = mlp([config.latent_dim, *reversed(config.hidden), config.width])
        self.operator = KoopmanOperator(
            config.latent_dim, config.operator, total_steps=sum(config.segment_steps), rank=config.rank
        )

    @property
    def offsets(self) -> list[int]:
        """Cumulative steps from layers[0] to each probed layer."""
        out = [0]
        for s in self.config.segment_steps:
            out.append(out[-1] + s)
        return out

    def predict(self, a: torch.Tensor, steps: int) -> torch.Tensor:
        """``ψ(K^steps φ(a))`` for adapted states ``a``."""
        return self.decoder(self.operator.step(self.encoder(a), steps))

    def predict_states(self, a0: torch.Tensor) -> list[torch.Tensor]:
        """Decoded predictions of every later probed layer from layers[0]'s adapted state."""
        z0 = self.encoder(a0)
        return [self.decoder(self.operator.step(z0, c)) for c in self.offsets[1:]]


def _relative_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred - target).pow(2).mean() / target.detach().pow(2).mean().clamp_min(1e-8)


def isometry_loss(a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mismatch of pairwise distances in and out of the latent space (relative)."""
    da = torch.cdist(a, a)
    dz = torch.cdist(z, z)
    return (dz - da).pow(2).mean() / da.pow(2).mean().clamp_min(1e-8)


def koopman_losses(
    model: KoopmanAutoencoder,
    states: Sequence[torch.Tensor],
    weights: LossWeights,
    topological: nn.Module | None = None,
    closed_form_ridge: float | None = None,
) -> dict[str, torch.Tensor]:
    """The weighted training losses on a batch of adapted states, one per probed layer.

    - reconstruction: ``ψ(φ(a_l)) ≈ a_l`` for every layer;
    - state: ``ψ(K^s φ(a_i)) ≈ a_j`` for consecutive pairs and for every ``j`` from layers[0];
    - latent: the same in latent space, ``K^s φ(a_i) ≈ φ(a_j)``;
    - isometry: pairwise distances kept by φ; topological: the persistence-pair loss.

    With ``closed_form_ridge``, K is not the operator's parameter but the ridge least-squares
    solution over this batch's consecutive latent pairs (one step each), differentiable, so the
    encoder learns a latent space in which the closed form fits well.
    """
    latents = [model.encoder(a) for a in states]
    if closed_form_ridge is None:
        step = model.operator.step
    else:
        k = batch_ridge_operator(torch.cat(latents[:-1]), torch.cat(latents[1:]), closed_form_ridge)

        def step(z: torch.Tensor, steps: int) -> torch.Tensor:
            return z @ torch.linalg.matrix_power(k, steps).T

    losses: dict[str, torch.Tensor] = {}
    losses["reconstruction"] = torch.stack(
        [_relative_mse(model.decoder(z), a) for z, a in zip(latents, states)]
    ).mean()
    pairs = [(0, j) for j in range(1, len(states))]
    pairs += [(i, i + 1) for i in range(1, len(states) - 1)]
    offsets = model.offsets
    state_terms, latent_terms = [], []
    for i, j in pairs:
        advanced = step(latents[i], offsets[j] - offsets[i])
        state_terms.append(_relative_mse(model.decoder(advanced), states[j]))
        latent_terms.append(_relative_mse(advanced, latents[j]))
    losses["state"] = torch.stack(state_terms).mean()
    losses["latent"] = torch.stack(latent_terms).mean()
    if weights.isometry:
        losses["isometry"] = torch.stack([isometry_loss(a, z) for a, z in zip(states, latents)]).mean()
    if weights.topological and topological is not None:
        losses["topological"] = torch.stack([topological(a, z) for a, z in zip(states, latents)]).mean()
    losses["total"] = sum(getattr(weights, name) * value for name, value in losses.items())
    return losses


def batch_ridge_operator(z_in: torch.Tensor, z_out: torch.Tensor, ridge: float) -> torch.Tensor:
    """``K`` minimising ``||z_out - z_in K^T||² + ridge·mean(diag)·||K||²`` (differentiable)."""
    gram = z_in.T @ z_in / len(z_in)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    scale = gram.diagonal().mean().detach().clamp_min(1e-8)
    return torch.linalg.solve(gram + ridge * scale * eye, z_in.T @ z_out / len(z_in)).T
