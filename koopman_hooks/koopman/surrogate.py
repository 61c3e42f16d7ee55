"""The frozen surrogate artifact: activation of one layer -> predicted activation of another.

``x_dst ≈ adapter_dst⁻¹(ψ(E · K^k · φ(adapter_src(x_src))))`` where ``K`` and the endpoint map
``E`` act on homogeneous latent coordinates ``[z, 1]``, so affine edits stay linear.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from koopman_hooks.core.schema import from_mapping
from koopman_hooks.core.serialization import load_tensors, prefixed, save_tensors, unprefixed
from koopman_hooks.core.shapes import check_shape
from koopman_hooks.errors import IncompatibleFileError
from koopman_hooks.koopman.adapters import LayerAdapter
from koopman_hooks.koopman.autoencoder import MAX_STEPS, SkipMLP
from koopman_hooks.koopman.reduce import warn_without_mask
from koopman_hooks.maths.linalg import apply_homogeneous


@dataclass(frozen=True)
class AdapterHeader:
    shape: tuple[int, ...]
    reduce: str


@dataclass(frozen=True)
class SurrogateHeader:
    """The JSON header of a saved surrogate, checked field by field when it is loaded."""

    steps: int
    src_layer: str
    dst_layer: str
    encoder_dims: tuple[int, ...]
    decoder_dims: tuple[int, ...]
    in_adapter: AdapterHeader
    out_adapter: AdapterHeader
    info: dict[str, Any] = field(default_factory=dict)


def _dims(module: nn.Module, width: int) -> list[int]:
    """``[in, *hidden, out]`` of a :class:`SkipMLP`, ``[width]`` for the identity."""
    if isinstance(module, SkipMLP):
        return list(module.dims)
    if isinstance(module, nn.Identity):
        return [width]
    raise TypeError(f"cannot save an encoder/decoder of type {type(module).__name__}")


def _module(dims: list[int]) -> nn.Module:
    return SkipMLP(dims) if len(dims) > 1 else nn.Identity()


@contextlib.contextmanager
def artifact_tensors() -> Iterator[None]:
    """Ordinary tensors, without gradients, even inside ``torch.inference_mode()``: a surrogate
    built or cached there would otherwise hold inference tensors, which have no version counter
    and cannot be saved for a later backward pass."""
    with torch.inference_mode(False), torch.no_grad():
        yield


class KoopmanSurrogate(nn.Module):
    """A standalone, frozen ``nn.Module`` from ``src_layer``'s activation to ``dst_layer``'s.

    ``operator`` and ``readout`` are ``(d+1, d+1)`` homogeneous matrices; edits replace them
    with :meth:`edited`, which returns a new surrogate and leaves this one unchanged.
    """

    operator: torch.Tensor
    readout: torch.Tensor

    def __init__(
        self,
        in_adapter: LayerAdapter,
        out_adapter: LayerAdapter,
        encoder: nn.Module,
        decoder: nn.Module,
        operator: torch.Tensor,
        steps: int,
        src_layer: str,
        dst_layer: str,
        readout: torch.Tensor | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.in_adapter = in_adapter
        self.out_adapter = out_adapter
        self.encoder = encoder
        self.decoder = decoder
        self.steps = int(steps)
        self.src_layer = src_layer
        self.dst_layer = dst_layer
        self.info = dict(info or {})
        d = operator.shape[0] - 1
        with artifact_tensors():
            self.register_buffer("operator", operator.float().clone())
            self.register_buffer("readout", (readout if readout is not None else torch.eye(d + 1)).float().clone())
        self.requires_grad_(False)
        self.eval()

    @property
    def latent_dim(self) -> int:
        return self.operator.shape[0] - 1

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Latent state ``φ(adapter(x))`` of a batch of source activations (``mask``: the
        inputs' attention mask, read by token reductions)."""
        check_shape(self.src_layer, x, self.in_adapter.shape)
        return self.encoder(self.in_adapter(x, mask))

    def advance(self, z: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Apply ``K`` ``steps`` times (default: all) to latent rows, in homogeneous form."""
        steps = self.steps if steps is None else steps
        return apply_homogeneous(torch.linalg.matrix_power(self.operator, steps), z)

    def read_out(self, z: torch.Tensor) -> torch.Tensor:
        """Apply the endpoint map ``E`` (identity unless edited)."""
        return apply_homogeneous(self.readout, z)

    def endpoint_map(self) -> torch.Tensor:
        """``E K^k`` in float64: the homogeneous map from ``z_0`` to the latent the decoder reads."""
        return self.readout.double() @ torch.linalg.matrix_power(self.operator.double(), self.steps)

    def latent_trajectory(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Latent states after 0, 1, ..., ``steps`` applications of K (before the readout)."""
        z = self.encode(x, mask)
        states = [z]
        for _ in range(self.steps):
            states.append(self.advance(states[-1], 1))
        return states

    def endpoint(self) -> torch.Tensor:
        """``E K^k`` (homogeneous, in the buffers' dtype), computed once and reused while the
        operator and the readout hold the same values (compared on every call: an edit through
        ``.data`` moves no version counter)."""
        operator, readout = self.operator, self.readout
        if operator.requires_grad or readout.requires_grad or operator.is_inference() or readout.is_inference():
            return readout @ torch.linalg.matrix_power(operator, self.steps)  # a graph or an inference tensor: no cache
        key = (self.steps, operator.dtype, operator.device, readout.dtype, readout.device)
        cached = self.__dict__.get("_endpoint")
        if (cached is None or cached[0] != key or not torch.equal(cached[1], operator)
                or not torch.equal(cached[2], readout)):
            with artifact_tensors():
                value = readout @ torch.linalg.matrix_power(operator, self.steps)
                self.__dict__["_endpoint"] = cached = (key, operator.clone(), readout.clone(), value)
        return cached[3]

    def final_latent(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The latent state fed to the decoder: ``E K^k φ(adapter(x))``."""
        return apply_homogeneous(self.endpoint(), self.encode(x, mask))

    def forward(self, x: torch.Tensor, like: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predict ``dst_layer``'s activation. ``like`` is its real output (the "mixed"
        diagnostic of a lossy reduction; ``None``: the training-mean template, strict), ``mask``
        the inputs' ``(B, N)`` attention mask, read by the ``"last"``/``"mean"`` reductions.
        Activations of another shape than fitted raise :class:`~koopman_hooks.errors.ShapeError`."""
        check_shape(self.src_layer, x, self.in_adapter.shape)
        if like is not None:
            check_shape(self.dst_layer, like, self.out_adapter.shape)
        device = self.operator.device
        if mask is None and self.info.get("attention_mask"):
            warn_without_mask([self.in_adapter.reduce, self.out_adapter.reduce], "the surrogate")
        mask = None if mask is None else mask.to(device)
        return self.from_adapted(self.in_adapter(x.to(device), mask), like, mask)

    def from_adapted(self, a: torch.Tensor, like: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The prediction from ``src_layer``'s *adapted* state ``a`` (what ``in_adapter`` gives)."""
        z = apply_homogeneous(self.endpoint(), self.encoder(a))
        return self.out_adapter.inverse(self.decoder(z), like, None if mask is None else mask.to(z.device))

    def edited(self, operator: torch.Tensor | None = None, readout: torch.Tensor | None = None, **info: Any) -> KoopmanSurrogate:
        """A new surrogate with the operator and/or endpoint map replaced."""
        with artifact_tensors():
            new = copy.deepcopy(self)
            if operator is not None:
                new.operator = operator.to(self.operator).clone()
            if readout is not None:
                new.readout = readout.to(self.readout).clone()
        new.info.update(info)
        return new

    # ------------------------------------------------------------------ persistence

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"operator": self.operator, "readout": self.readout}
        tensors.update(prefixed("encoder", self.encoder.state_dict()))
        tensors.update(prefixed("decoder", self.decoder.state_dict()))
        config: dict[str, Any] = {
            "steps": self.steps,
            "src_layer": self.src_layer,
            "dst_layer": self.dst_layer,
            "encoder_dims": _dims(self.encoder, self.in_adapter.width),
            "decoder_dims": _dims(self.decoder, self.latent_dim),
            "info": self.info,
        }
        for name, adapter in (("in_adapter", self.in_adapter), ("out_adapter", self.out_adapter)):
            tensors.update(prefixed(name, adapter.state_dict()))
            config[name] = {"shape": list(adapter.shape), "reduce": adapter.reduce}
        return tensors, config

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save to a safetensors file; :meth:`load` restores an identical surrogate."""
        tensors, config = self.state_tensors()
        save_tensors(path, tensors, "surrogate", config)

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> KoopmanSurrogate:
        """The surrogate of :meth:`state_tensors`' output (``ConfigError``/``ValueError``/``KeyError``/
        ``RuntimeError`` when they do not fit together)."""
        with artifact_tensors():
            return cls._from_state(tensors, config)

    @classmethod
    def _from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> KoopmanSurrogate:
        header = from_mapping(SurrogateHeader, config, "surrogate")
        if not 1 <= header.steps <= MAX_STEPS:
            raise ValueError(f"steps must be in 1..{MAX_STEPS}, got {header.steps}")
        latent = header.encoder_dims[-1]
        if header.decoder_dims[0] != latent:
            raise ValueError(f"the encoder gives {latent} latent coordinates, the decoder reads {header.decoder_dims[0]}")
        for name in ("operator", "readout"):
            if tuple(tensors[name].shape) != (latent + 1, latent + 1):
                raise ValueError(f"{name} must be {latent + 1} x {latent + 1} (latent {latent}, homogeneous), "
                                 f"got {tuple(tensors[name].shape)}")
        adapters = {}
        for name, part in (("in_adapter", header.in_adapter), ("out_adapter", header.out_adapter)):
            t = unprefixed(name, tensors)
            adapters[name] = LayerAdapter(part.shape, part.reduce, t["mean"], t["basis"], t["scale"], t.get("template"))
        encoder, decoder = _module(list(header.encoder_dims)), _module(list(header.decoder_dims))
        encoder.load_state_dict(unprefixed("encoder", tensors))
        decoder.load_state_dict(unprefixed("decoder", tensors))
        return cls(
            adapters["in_adapter"], adapters["out_adapter"], encoder, decoder, tensors["operator"],
            header.steps, header.src_layer, header.dst_layer, tensors["readout"], header.info,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KoopmanSurrogate:
        """A surrogate saved by :meth:`save` (:class:`~koopman_hooks.errors.IncompatibleFileError`
        if the file is not one, or is corrupt)."""
        tensors, config = load_tensors(path, "surrogate")
        try:
            return cls.from_state(tensors, config)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise IncompatibleFileError(f"{path} is not a valid surrogate file: {err}") from None

    def extra_repr(self) -> str:
        return f"{self.src_layer!r} -> {self.dst_layer!r}, steps={self.steps}, latent_dim={self.latent_dim}"
