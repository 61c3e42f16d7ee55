"""The shared-latent Koopman autoencoder: encoder φ, decoder ψ and latent operator K."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from koopman_hooks.koopman.operator import KoopmanOperator, Parametrization


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


@dataclass(frozen=True)
class AutoencoderConfig:
    """Sizes of a :class:`KoopmanAutoencoder`."""

    width: int
    latent_dim: int
    hidden: tuple[int, ...] = (128, 128)
    operator: Parametrization = "exp"
    rank: int | None = None
    segment_steps: tuple[int, ...] = (10,)


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
