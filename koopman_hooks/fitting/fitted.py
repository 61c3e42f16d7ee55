"""``FittedProbe``: the artifact a fit returns -- adapters, autoencoder, baselines, history.

It is what analysis (:mod:`koopman_hooks.analysis`) and editing (:mod:`koopman_hooks.unlearning`)
work on, through its public attributes and methods only. It hands out independent frozen
:class:`~koopman_hooks.koopman.surrogate.KoopmanSurrogate` s and
:class:`~koopman_hooks.core.patching.PatchedModel` s, and saves to one safetensors file.
"""

from __future__ import annotations

import copy
import os
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from koopman_hooks.core import distributed
from koopman_hooks.core.batches import BatchSpec, Inputs, amp_dtype, batch_size_of, call_model, mask_of, repeated_rows, select_rows
from koopman_hooks.core.capture import Captured, capture_batch, iter_captures
from koopman_hooks.core.layers import get_module, module_device, module_name, unwrap_model
from koopman_hooks.core.patching import PatchedModel, check_patch_layers
from koopman_hooks.core.schema import check, from_mapping, to_mapping
from koopman_hooks.core.select import OutputSelector, Select, loaded_selectors
from koopman_hooks.core.serialization import load_tensors, prefixed, save_tensors, unprefixed
from koopman_hooks.core.shapes import parameter_mismatch, parameter_shapes, parameters_digest
from koopman_hooks.core.tail import TailRunner
from koopman_hooks.errors import ConfigError, IncompatibleFileError, LayerError, warn
from koopman_hooks.fitting.cache import StateCache
from koopman_hooks.fitting.config import ProbeConfig
from koopman_hooks.fitting.passes import CALIBRATION_ROWS, find_tail
from koopman_hooks.fitting.sizing import Sizes
from koopman_hooks.koopman.adapters import LayerAdapter
from koopman_hooks.koopman.autoencoder import AutoencoderConfig, KoopmanAutoencoder
from koopman_hooks.koopman.reduce import warn_without_mask
from koopman_hooks.koopman.surrogate import KoopmanSurrogate, artifact_tensors
from koopman_hooks.maths.linalg import homogeneous


class FittedProbe:
    """A fitted probe of ``model``: read-only after the fit.

    Attributes:
        model: the probed model (shared, never modified).
        config: the :class:`~koopman_hooks.fitting.config.ProbeConfig` it was fitted with.
        selectors: one :class:`~koopman_hooks.core.select.OutputSelector` per probed layer.
        adapters: one fitted :class:`~koopman_hooks.koopman.adapters.LayerAdapter` per layer.
        autoencoder: the trained :class:`~koopman_hooks.koopman.autoencoder.KoopmanAutoencoder`.
        baselines: ``{layer: (W, b)}``, the ridge DMD from ``layers[0]`` to each later layer.
        history: one record per epoch: mean training losses and held-out figures (epoch -1 is
            the closed-form start).
        fit_seconds: wall time of the fit.
        device: where the autoencoder and adapters live.
        sizes: the sizes the fit used and why (:class:`~koopman_hooks.fitting.sizing.Sizes`).
        info: how the fit went: model passes, samples, the epoch kept and why, ...
        tail: the model's output from a supplied ``layers[-1]`` activation alone (``None`` when
            the fit found none, or after loading).
        fit_cache: the rows the fit cached (every layer's states in ``adapters``' coordinates,
            the model's scores, labels), kept by ``fit(loader, keep_cache=True)`` until :meth:`release_cache`;
            ``unlearning_statistics(None)`` reads them instead of running the model. ``None``
            otherwise (and after loading).
    """

    def __init__(
        self,
        model: nn.Module,
        config: ProbeConfig,
        selectors: Mapping[str, OutputSelector],
        adapters: Mapping[str, LayerAdapter],
        autoencoder: KoopmanAutoencoder,
        baselines: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        history: Sequence[Mapping[str, Any]] = (),
        fit_seconds: float | None = None,
        device: torch.device | str | None = None,
        sizes: Sizes | None = None,
        info: Mapping[str, Any] | None = None,
        tail: TailRunner | None = None,
        tail_example: Inputs | None = None,
        model_digest: str | None = None,
    ) -> None:
        self.model, self.config = model, config
        self.selectors = dict(selectors)
        self.adapters = dict(adapters)
        self.autoencoder = autoencoder.eval()
        self.baselines = dict(baselines)
        self.history = [dict(h) for h in history]
        self.fit_seconds = fit_seconds
        self.device = torch.device(device) if device is not None else module_device(autoencoder)
        self.sizes = sizes
        self.info = dict(info or {})
        self.tail = tail
        self.tail_example = tail_example  # stand-in inputs for the tail, or None when it needs the real ones
        self._tail_searched = tail is not None
        self._patched: tuple[nn.Module, PatchedModel] | None = None  # the last patch() of patched_outputs
        self.fit_cache: StateCache | None = None
        self._cache_rows = 0
        # parameters_digest of the model as fitted: when the fit keeps its rows, or from a file; else None
        self.model_digest = model_digest
        self._cache_digest: str | None = None
        self._release: weakref.finalize | None = None

    # ------------------------------------------------------------------ the fit's cache

    def keep_cache(self, cache: StateCache, loader_rows: int | None = None) -> None:
        """Hold the fit's finalised cache of rows (``fit(loader, keep_cache=True)``) for analyses
        that can read it instead of running the model; ``loader_rows``: how many of its first
        rows came from the fit's own loader (the rest from ``val_loader``). It is released by
        :meth:`release_cache`, or when this object is garbage-collected or the interpreter exits."""
        self.release_cache()
        self.fit_cache = cache
        self._cache_rows = cache.n if loader_rows is None else int(loader_rows)
        self._cache_digest = self.model_digest or parameters_digest(unwrap_model(self.model))
        self._release = weakref.finalize(self, cache.close)

    def kept_rows(self) -> tuple[StateCache, int]:
        """The kept cache and how many of its first rows came from the fit's loader; a
        ``ValueError`` without one, or when the model's parameters or buffers changed in place
        since the fit (its rows would be stale)."""
        if self.fit_cache is None:
            raise ValueError("no loader given and the fit kept no cache: pass a loader, or fit with "
                             "probe.fit(loader, keep_cache=True)")
        if parameters_digest(unwrap_model(self.model)) != self._cache_digest:
            raise ValueError("the model's parameters or buffers changed since the fit, so the rows it cached are "
                             "stale; pass a loader (and refit the probe if the model changed for good)")
        return self.fit_cache, self._cache_rows

    def release_cache(self) -> None:
        """Free the kept cache (its RAM, and its temporary folder when it spilled to disk)."""
        if self._release is not None:
            self._release()
        self.fit_cache, self._release = None, None

    # ------------------------------------------------------------------ layers and data

    @property
    def layers(self) -> list[str]:
        return list(self.config.layers)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample activation shape of every probed layer (the shape contract)."""
        return {name: adapter.shape for name, adapter in self.adapters.items()}

    @property
    def batch_spec(self) -> BatchSpec:
        return BatchSpec(self.config.input_key, self.config.label_key, self.config.ignore_keys, self.config.amp)

    def layer_index(self, layer: str | nn.Module | None, default: int) -> int:
        """Position of ``layer`` (a name or the module) among the probed layers (``default``: None)."""
        if layer is None:
            return default % len(self.layers)
        if isinstance(layer, nn.Module):
            layer = module_name(self.model, layer)
        if layer not in self.layers:
            raise LayerError(f"{layer!r} is not a probed layer; probed: {self.layers}")
        return self.layers.index(layer)

    def selector(self, name: str) -> OutputSelector:
        return self.selectors.get(name) or OutputSelector(None, name)

    def captures(self, loader: Iterable[Any], stop_early: bool = False) -> Iterator[Captured]:
        """One hooked pass per batch of ``loader`` at the probed layers, checked against the
        fitted shapes (the caller sets the model's mode, e.g. with ``preserved_state``)."""
        selectors = {name: self.selector(name) for name in self.layers}
        return iter_captures(self.model, selectors, loader, self.batch_spec, stop_early=stop_early, shapes=self.shapes)

    def capture(self, batch: Any, stop_early: bool = False) -> Captured:
        """One hooked pass on one batch (see :meth:`captures`)."""
        selectors = {name: self.selector(name) for name in self.layers}
        return capture_batch(self.model, selectors, batch, self.batch_spec, stop_early=stop_early, shapes=self.shapes)

    def mask_of(self, inputs: Inputs) -> torch.Tensor | None:
        """The attention mask of a batch's inputs (``config.mask_key``), on the probe's device."""
        mask = mask_of(inputs, self.config.mask_key)
        if mask is None and self.info.get("attention_mask"):
            warn_without_mask([adapter.reduce for adapter in self.adapters.values()], "the probe")
        return None if mask is None else mask.to(self.device)

    def adapted(self, activations: Mapping[str, torch.Tensor], mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every probed layer's adapted state ``(B, width)``, in layer order (``mask``: the
        inputs' attention mask, see :meth:`mask_of`)."""
        mask = None if mask is None else mask.to(self.device)
        return [self.adapters[name](activations[name].to(self.device, torch.float32), mask) for name in self.layers]

    # ------------------------------------------------------------------ artifacts

    def surrogate(self, src: str | None = None, dst: str | None = None) -> KoopmanSurrogate:
        """A frozen, independent surrogate from ``src`` (default layers[0]) to ``dst`` (layers[-1])."""
        i, j = self.layer_index(src, 0), self.layer_index(dst, -1)
        if j <= i:
            raise LayerError(f"dst must come after src in forward order, got {self.layers[i]!r} -> {self.layers[j]!r}")
        ae = self.autoencoder
        with artifact_tensors():  # ordinary tensors, also inside torch.inference_mode()
            return KoopmanSurrogate(
                copy.deepcopy(self.adapters[self.layers[i]]).cpu(),
                copy.deepcopy(self.adapters[self.layers[j]]).cpu(),
                copy.deepcopy(ae.encoder).cpu(),
                copy.deepcopy(ae.decoder).cpu(),
                homogeneous(ae.operator.matrix().detach().cpu()),
                ae.offsets[j] - ae.offsets[i],
                self.layers[i],
                self.layers[j],
                info={"kind": "koopman", "operator": self.config.operator,
                      "attention_mask": bool(self.info.get("attention_mask"))},
            ).to(self.device)

    def linear_baseline(self, dst: str | None = None) -> KoopmanSurrogate:
        """The "linear surrogate without lifting": ridge DMD from layers[0]'s adapted state to ``dst``'s."""
        j = self.layer_index(dst, -1)
        if j == 0:
            raise LayerError("the linear baseline maps layers[0] to a later layer")
        weight, bias = self.baselines[self.layers[j]]
        with artifact_tensors():
            return KoopmanSurrogate(
                copy.deepcopy(self.adapters[self.layers[0]]).cpu(),
                copy.deepcopy(self.adapters[self.layers[j]]).cpu(),
                nn.Identity(),
                nn.Identity(),
                homogeneous(weight.T.cpu(), bias.cpu()),
                1,
                self.layers[0],
                self.layers[j],
                info={"kind": "linear_baseline", "attention_mask": bool(self.info.get("attention_mask"))},
            ).to(self.device)

    def patch(self, surrogate: nn.Module | None = None, src: str | None = None, dst: str | None = None,
              strict: bool = True, fast: bool = True) -> PatchedModel:
        """A new module: the model with ``dst``'s output replaced by the surrogate's prediction.

        ``surrogate`` defaults to :meth:`surrogate` (``src``/``dst`` choose the layers); an
        edited surrogate patches the same way. The model is shared. See
        :class:`~koopman_hooks.core.patching.PatchedModel` for ``strict`` and ``fast``;
        ``strict=False`` warns when the fit found that what the last layer's lossy reduction
        ignores reaches the model's output (the mixed model's figures are then not the
        surrogate's alone).
        """
        if surrogate is None:
            surrogate = self.surrogate(src, dst)
        check_patch_layers(surrogate, None if src is None else self.layers[self.layer_index(src, 0)],
                           None if dst is None else self.layers[self.layer_index(dst, -1)])
        src_layer = getattr(surrogate, "src_layer", None) or self.layers[self.layer_index(src, 0)]
        dst_layer = getattr(surrogate, "dst_layer", None) or self.layers[self.layer_index(dst, -1)]
        if not strict and dst_layer == self.layers[-1] and self.info.get("lossy_reduction_reaches_output"):
            warn(f"patch(strict=False): what reduce={self.adapters[dst_layer].reduce!r} ignores at {dst_layer!r} "
                 "reaches the model's output, so this mixed model copies part of the real forward pass: its figures "
                 "are a diagnostic, not the surrogate's; use strict=True (the default) for those")
        return PatchedModel(self.model, surrogate, src_layer, dst_layer, self.selector(src_layer), self.selector(dst_layer),
                            strict=strict, fast=fast, mask_key=self.config.mask_key)

    def find_tail(self, captured: Captured) -> None:
        """Look once, on a real batch, for a runner of the model's tail after the last probed
        layer (a loaded probe has none until then; a fitted one keeps the fit's)."""
        if self._tail_searched or captured.output is None:
            return
        self._tail_searched = True
        last = self.layers[-1]
        rows = torch.arange(min(CALIBRATION_ROWS, batch_size_of(captured.inputs)))
        example = select_rows(captured.inputs, rows)
        self.tail, kind = find_tail(self.model, example, captured.activations[last][rows], last, self.selector(last),
                                    amp_dtype(self.config.amp))
        self.tail_example = example if kind == "repeated" else None

    def outputs_from_states(self, dst: str, inputs: Inputs) -> bool:
        """Whether :meth:`patched_outputs`, for a surrogate ending at ``dst``, reads nothing of
        rows like ``inputs`` but their adapted states: the tail runs alone on stand-in inputs
        and there is no attention mask to read."""
        return self.tail_reads_states(dst, self.mask_of(inputs) is not None)

    def tail_reads_states(self, dst: str, masked: bool) -> bool:
        """:meth:`outputs_from_states` for rows with (``masked``) or without an attention mask."""
        return self.tail is not None and self.tail.dst == dst and self.tail_example is not None and not masked

    def patched_outputs(self, surrogate: nn.Module, inputs: Inputs, states: torch.Tensor | None = None) -> Any:
        """The model's output with ``surrogate`` patched in, for rows with these ``inputs``: from
        their source-layer adapted ``states`` through the model's tail alone when it can be run
        (no forward pass up to the source layer), else through the patched model (kept for the
        next call with the same surrogate, so it is calibrated once)."""
        if self.tail is not None and states is not None and hasattr(surrogate, "from_adapted"):
            if getattr(surrogate, "dst_layer", None) == self.tail.dst:
                stand_in = inputs if self.tail_example is None else repeated_rows(self.tail_example, len(states))
                predicted = surrogate.from_adapted(states, mask=self.mask_of(inputs))  # type: ignore[operator]
                return self.tail(stand_in, predicted)
        if self._patched is None or self._patched[0] is not surrogate:
            self._patched = (surrogate, self.patch(surrogate))
        return call_model(self._patched[1], inputs)

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save adapters, autoencoder, baselines, the config and the history to one safetensors file
        (under ``torch.distributed``, rank 0 writes it; the other ranks write nothing)."""
        if not distributed.is_main():
            return
        ae = self.autoencoder
        tensors: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.layers):
            tensors.update(prefixed(f"adapter.{i}", self.adapters[name].state_dict()))
        tensors.update(prefixed("autoencoder", ae.state_dict()))
        for name, (weight, bias) in self.baselines.items():
            i = self.layers.index(name)
            tensors[f"baseline.{i}.weight"], tensors[f"baseline.{i}.bias"] = weight, bias
        inner = unwrap_model(self.model)
        header = {
            "config": self.config.to_dict(),
            "shapes": [list(self.adapters[name].shape) for name in self.layers],
            "parameter_shapes": [to_mapping(parameter_shapes(get_module(inner, name))) for name in self.layers],
            "reduce": [self.adapters[name].reduce for name in self.layers],
            "autoencoder": to_mapping(ae.config),
            "sizes": None if self.sizes is None else to_mapping(self.sizes),
            "info": self.info,
            "history": self.history,
            "fit_seconds": self.fit_seconds,
            # the weights it describes: hashed when kept rows needed it, else now (the model as fitted)
            "model_digest": self.model_digest or parameters_digest(inner),
        }
        save_tensors(path, tensors, "probe", header)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        model: nn.Module,
        select: Select | Sequence[Select] | Mapping[str, Select] | None = None,
        device: str | torch.device | None = None,
    ) -> FittedProbe:
        """A probe saved by :meth:`save`, on ``model`` (which must have the same layers, of the
        same widths).

        Callable ``select`` functions are not saved: pass them again as ``select``. A file that
        is corrupt, made by another version, or made for a model whose probed layers have other
        parameter shapes raises :class:`~koopman_hooks.errors.IncompatibleFileError`.
        """
        tensors, header = load_tensors(path, "probe")
        try:
            config = ProbeConfig.from_dict(header["config"])
            n = len(config.layers)
            shapes = check(header["shapes"], tuple[tuple[int, ...], ...], "shapes")
            reduce = check(header["reduce"], tuple[str, ...], "reduce")
            saved = check(header.get("parameter_shapes"), tuple[dict[str, tuple[int, ...]], ...] | None,
                          "parameter_shapes")
            # None in files saved before parameter shapes were: the activation shapes are still checked in use
            fingerprints = (None,) * n if saved is None else saved
            if not len(shapes) == len(reduce) == len(fingerprints) == n:
                raise ConfigError(f"shapes, reduce and parameter_shapes need one entry per layer ({n})")
            ae_config = from_mapping(AutoencoderConfig, header["autoencoder"], "autoencoder")
            if len(ae_config.segment_steps) != n - 1:
                raise ConfigError(f"autoencoder.segment_steps needs one entry per layer pair ({n - 1}), "
                                  f"got {list(ae_config.segment_steps)}")
            sizes = None if header.get("sizes") is None else from_mapping(Sizes, header["sizes"], "sizes")
            info = check(header.get("info", {}), dict[str, Any], "info")
            history = check(header.get("history", []), tuple[dict[str, Any], ...], "history")
            fit_seconds = check(header.get("fit_seconds"), float | None, "fit_seconds")
            digest = check(header.get("model_digest"), str | None, "model_digest")
        except (ConfigError, KeyError, TypeError) as err:
            raise IncompatibleFileError(f"{path} is not a valid probe file: {err}") from None
        inner = unwrap_model(model)
        for name, fingerprint in zip(config.layers, fingerprints):
            module = get_module(inner, name)  # a clear LayerError with suggestions when missing
            mismatch = None if fingerprint is None else parameter_mismatch(name, fingerprint, module)
            if mismatch:
                raise IncompatibleFileError(f"{path} was saved for another model: {mismatch}")
        if digest is not None and digest != parameters_digest(inner):
            warn(f"{path} was fitted on other weights than this model's (its parameters or buffers "
                 "differ): the probe describes the model it was fitted on; refit it on this one")
        selectors = loaded_selectors(config.layers, config.select, config.callable_select, select)
        device = torch.device(device) if device is not None else module_device(inner)
        torch.empty(0, device=device)  # torch's own error for a device this machine lacks, not "invalid file"
        try:
            adapters = {}
            for i, name in enumerate(config.layers):
                t = unprefixed(f"adapter.{i}", tensors)
                adapters[name] = LayerAdapter(shapes[i], reduce[i], t["mean"], t["basis"], t["scale"], t.get("template")).to(device)
                if adapters[name].width != ae_config.width:
                    raise ValueError(f"adapter {name!r} has width {adapters[name].width}, the autoencoder {ae_config.width}")
            autoencoder = KoopmanAutoencoder(ae_config)
            autoencoder.load_state_dict(unprefixed("autoencoder", tensors))
        except (KeyError, RuntimeError, ValueError) as err:
            raise IncompatibleFileError(f"{path} is not a valid probe file: {err}") from None
        baselines = {
            name: (tensors[f"baseline.{i}.weight"].to(device), tensors[f"baseline.{i}.bias"].to(device))
            for i, name in enumerate(config.layers) if f"baseline.{i}.weight" in tensors
        }
        width = ae_config.width
        for name, (weight, bias) in baselines.items():
            if tuple(weight.shape) != (width, width) or tuple(bias.shape) != (width,):
                raise IncompatibleFileError(f"{path} is not a valid probe file: the linear baseline of {name!r} must be "
                                            f"{width} x {width} with {width} biases, got {tuple(weight.shape)} and "
                                            f"{tuple(bias.shape)}")
        return cls(model, config, selectors, adapters, autoencoder.to(device), baselines, history, fit_seconds, device,
                   sizes, info, model_digest=digest)

    def __repr__(self) -> str:
        c, ae = self.config, self.autoencoder.config
        return (f"FittedProbe(layers={list(c.layers)}, width={ae.width}, latent_dim={ae.latent_dim}, "
                f"hidden={list(ae.hidden)}, steps={list(ae.segment_steps)}, operator={c.operator!r})")
