"""The shared-latent Koopman autoencoder: encoder φ, decoder ψ and latent operator K.

φ and ψ are each a linear map plus a nonlinear residual (:class:`SkipMLP`). Built with
:meth:`KoopmanAutoencoder.from_linear`, the linear maps embed the adapted state in the first
``width`` latent coordinates and read it back, the residuals start at zero on those
coordinates, and K starts at a given closed-form operator: before any gradient step the
autoencoder *is* that linear model, and training can only move away from it where that helps.
The extra latent coordinates (the lifting) start as small random features of the state that
nothing reads yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from koopman_hooks.errors import ConfigError, warn
from koopman_hooks.koopman.operator import KoopmanOperator, Parametrization

START_TOLERANCE = 1e-3  # K's relative error at the start above which a parametrisation is said to miss it
MAX_STEPS = 10_000  # K's applications in all: far more than a network has modules (a bound for files read back)


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


class SkipMLP(nn.Module):
    """``x -> x Lᵀ + r(x)``: a bias-free linear map plus an MLP residual (none when ``hidden``
    is empty). ``dims`` is ``[in, *hidden, out]``."""

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        self.dims = tuple(int(d) for d in dims)
        self.linear = nn.Linear(self.dims[0], self.dims[-1], bias=False)
        self.residual = mlp(self.dims) if len(self.dims) > 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out if self.residual is None else out + self.residual(x)

    @torch.no_grad()
    def start_as(self, weight: torch.Tensor, residual_rows: slice | None = None, scale: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        """Set the linear map to ``weight`` and the residual's output to zero, except the output
        rows ``residual_rows``, which get small random weights (``scale``) so they carry features."""
        self.linear.weight.copy_(weight)
        if self.residual is None:
            return
        last = [m for m in self.residual.modules() if isinstance(m, nn.Linear)][-1]
        last.weight.zero_()
        last.bias.zero_()
        if residual_rows is not None and scale > 0:
            rows = last.weight[residual_rows]
            rows.copy_(torch.randn(rows.shape, generator=generator) * scale / max(rows.shape[1], 1) ** 0.5)

    def extra_repr(self) -> str:
        return f"dims={list(self.dims)}"


@dataclass(frozen=True)
class AutoencoderConfig:
    """Sizes of a :class:`KoopmanAutoencoder`: ``width`` (adapted states), ``latent_dim`` (at
    least ``width``), residual ``hidden`` widths, K's parametrisation and steps per segment."""

    width: int
    latent_dim: int
    hidden: tuple[int, ...] = (64,)
    operator: Parametrization = "dense"
    rank: int | None = None
    segment_steps: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        if self.width < 1 or self.latent_dim < self.width:
            raise ConfigError(f"need width >= 1 and latent_dim >= width, got {self.width} and {self.latent_dim}")
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"hidden widths must be positive, got {list(self.hidden)}")
        if not self.segment_steps or any(s < 1 for s in self.segment_steps) or sum(self.segment_steps) > MAX_STEPS:
            raise ConfigError(f"segment_steps needs one or more positive steps, at most {MAX_STEPS} in all; "
                              f"got {list(self.segment_steps)}")


class KoopmanAutoencoder(nn.Module):
    """One encoder/decoder pair shared by every probed layer, and one latent operator.

    Segment ``i`` (layer ``i`` to layer ``i+1``) takes ``segment_steps[i]`` applications of K.
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = SkipMLP([config.width, *config.hidden, config.latent_dim])
        self.decoder = SkipMLP([config.latent_dim, *reversed(config.hidden), config.width])
        self.operator = KoopmanOperator(
            config.latent_dim, config.operator, total_steps=sum(config.segment_steps), rank=config.rank
        )

    @classmethod
    def from_linear(cls, config: AutoencoderConfig, operator: torch.Tensor, seed: int = 0,
                    lift_scale: float = 0.1) -> KoopmanAutoencoder:
        """An autoencoder that equals the linear model ``a_j ≈ K^{o_j} a_0`` of the adapted states
        (``operator`` is ``width x width``), with the extra latent coordinates as a lifting that
        starts as small random features (``lift_scale``) nobody reads."""
        ae = cls(config)
        w, d = config.width, config.latent_dim
        if d < w:
            raise ValueError(f"latent_dim ({d}) must be at least the adapted width ({w}) to hold the linear start")
        embed = torch.eye(d, w)
        generator = torch.Generator().manual_seed(seed)
        ae.encoder.start_as(embed, slice(w, d), lift_scale, generator)
        ae.decoder.start_as(embed.T)
        full = torch.eye(d, dtype=torch.float64)
        full[:w, :w] = operator.double()
        error = ae.operator.initialize(full)
        if config.operator == "exp" and not error <= START_TOLERANCE:  # lowrank misses it by design
            warn(f"operator={config.operator!r} cannot start at the closed-form K (relative error {error:.2g}; "
                 "e.g. a negative real eigenvalue has no real logarithm for 'exp'): the fit starts away from "
                 "the linear model; operator='dense' (the default) starts at it exactly")
        return ae

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

    def trajectory(self, z0: torch.Tensor) -> list[torch.Tensor]:
        """``K^{o_j} z_0`` at every later probed layer ``j``, each advanced from the one before
        (one segment's steps at a time, not all of them again from ``z_0``)."""
        out, z = [], z0
        for steps in self.config.segment_steps:
            z = self.operator.step(z, steps)
            out.append(z)
        return out

    def predict_states(self, a0: torch.Tensor) -> list[torch.Tensor]:
        """Decoded predictions of every later probed layer from layers[0]'s adapted state."""
        return [self.decoder(z) for z in self.trajectory(self.encoder(a0))]
