"""``ProbeConfig``: every setting of a probe, typed, frozen, validated once, saved as is."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from koopman_hooks.core.schema import check_fields, from_mapping, to_mapping
from koopman_hooks.errors import ConfigError
from koopman_hooks.koopman.autoencoder import MAX_STEPS
from koopman_hooks.koopman.losses import LossWeights
from koopman_hooks.koopman.operator import Parametrization
from koopman_hooks.koopman.reduce import parse_reduce

OperatorFit = Literal["gradient", "ridge"]
SelectValue = int | str | None


@dataclass(frozen=True)
class ProbeConfig:
    """What a :class:`~koopman_hooks.KoopmanProbe` fits, one entry per probed layer where it
    varies by layer. Built by the probe from its keyword arguments; ``save``/``load`` round-trip
    it field by field. See :class:`~koopman_hooks.KoopmanProbe` for what each option does."""

    layers: tuple[str, ...]
    latent_dim: int | None = None
    steps: tuple[int, ...] | None = None
    select: tuple[SelectValue, ...] = ()
    callable_select: tuple[str, ...] = ()
    width: int | None = None
    variance: float = 0.999
    max_width: int = 256
    reduce: tuple[str | None, ...] = ()
    operator: Parametrization = "dense"
    rank: int | None = None
    operator_fit: OperatorFit = "gradient"
    hidden: tuple[int, ...] | None = None
    loss_weights: LossWeights = field(default_factory=LossWeights)
    output_temperature: float = 4.0
    lr: float = 6e-3
    weight_decay: float = 0.0
    ridge: float = 1e-6
    batch_size: int | None = None
    patience: int = 8
    val_fraction: float = 0.1
    cache_mb: float = 16.0
    replay_mb: float = 2048.0
    amp: Literal["bf16", "fp16"] | None = None
    train_amp: Literal["auto", "bf16"] | None = "auto"
    input_key: str | None = None
    label_key: str | None = None
    ignore_keys: tuple[str, ...] = ()
    mask_key: str | None = "attention_mask"
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self)
        not_finite = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                      if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name))}
        not_finite.update({f"loss_weights.{k}": v for k, v in self.loss_weights.as_dict().items()
                           if isinstance(v, float) and not math.isfinite(v)})
        if not_finite:
            raise ConfigError(f"options must be finite numbers, got {not_finite}")
        n = len(self.layers)
        if len(set(self.layers)) != n:
            twice = sorted({name for name in self.layers if self.layers.count(name) > 1})
            raise ConfigError(f"layers names {twice} more than once; name each layer once")
        if n < 2:
            raise ConfigError(f"a probe needs at least two layers (first and last), got {list(self.layers)}")
        for name in ("select", "reduce"):
            if not getattr(self, name):
                object.__setattr__(self, name, (None,) * n)
        if self.steps is not None and (len(self.steps) != n - 1 or min(self.steps) < 1 or sum(self.steps) > MAX_STEPS):
            raise ConfigError(f"steps needs {n - 1} positive entries (one per layer pair), at most {MAX_STEPS} in all, "
                              f"got {list(self.steps)}")
        for name in ("select", "reduce"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"{name} needs one entry per layer ({n}), got {len(getattr(self, name))}")
        for spec in self.reduce:
            if spec is not None:
                parse_reduce(spec)
        _positive(self, "max_width", "patience")
        for name in ("latent_dim", "width", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive int or None (chosen from the data), got {getattr(self, name)}")
        if self.latent_dim is not None and self.width is not None and self.latent_dim < self.width:
            raise ConfigError(f"latent_dim ({self.latent_dim}) must be at least width ({self.width}): the first "
                              "width latent coordinates hold the linear model")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("cache_mb", "replay_mb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.variance <= 1.0:
            raise ConfigError(f"variance must be in (0, 1], got {self.variance}")
        if self.rank is not None and self.operator != "lowrank":
            raise ConfigError(f"rank={self.rank} is read by operator='lowrank' only, not {self.operator!r}")
        if self.rank is not None and (self.rank < 1 or (self.latent_dim is not None and self.rank > self.latent_dim)):
            raise ConfigError(f"rank must be in 1..latent_dim ({self.latent_dim}), got {self.rank}")
        if self.hidden is not None and any(h < 1 for h in self.hidden):
            raise ConfigError(f"hidden widths must be positive, got {list(self.hidden)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.output_temperature <= 0:
            raise ConfigError(f"output_temperature must be positive, got {self.output_temperature}")
        if not 0 <= self.seed < 2**63 - 2**16:  # torch's generators take 64 bits; every rank adds its index
            raise ConfigError(f"seed must be in 0..2**63 - 2**16, got {self.seed}")
        for name in ("weight_decay", "ridge"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        weights = {k: v for k, v in self.loss_weights.as_dict().items() if v is not None}
        if any(w < 0 for w in weights.values()) or not any(weights.values()):
            raise ConfigError(f"loss_weights must be >= 0 with at least one positive, got {weights}")
        if self.operator_fit == "ridge" and (self.operator != "dense" or self.steps is None or set(self.steps) != {1}):
            raise ConfigError(
                "operator_fit='ridge' needs operator='dense' and steps=1 per layer pair: the closed form "
                "fits the layer-to-layer map itself, whose k-th root need not be real"
            )

    @property
    def segments(self) -> int:
        return len(self.layers) - 1

    def per_layer(self, name: str) -> dict[str, Any]:
        """``{layer: value}`` of a per-layer option (``"select"`` or ``"reduce"``)."""
        return dict(zip(self.layers, getattr(self, name)))

    def replace(self, **changes: Any) -> ProbeConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data; :meth:`from_dict` gives back an equal config."""
        return typing.cast(dict[str, Any], to_mapping(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbeConfig:
        """The config of :meth:`to_dict`'s data (:class:`ConfigError` naming a bad key or type)."""
        return from_mapping(cls, data, "config")


def _positive(config: ProbeConfig, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be a positive int, got {getattr(config, name)}")
