"""The fit: closed-form start, then gradient steps from a cache, keeping the best held-out state.

1. pass 1 over the data: per-layer PCA adapters (and, on the first batch, a trace of the model,
   the multiply-adds of the replaced modules, and whether the model's tail can be run alone);
2. pass 2: every sample's adapted states, scores and labels into a :class:`StateCache`;
3. the closed-form linear start (:mod:`koopman_hooks.koopman.start`) from the cached training
   rows: before any gradient step the surrogate *is* the ridge (DMD) baseline;
4. epochs of AdamW on the cache; a held-out split (``val_fraction``, or ``val_loader``) scores
   every state, the best one is kept (:mod:`koopman_hooks.fitting.epochs`).

Nothing about the model changes (weights, modes, hooks, ``requires_grad``, gradients, the
global RNG), even when the fit raises.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from koopman_hooks.core.batches import BatchSpec, mask_of, move_inputs, repeated_rows
from koopman_hooks.core.capture import Captured
from koopman_hooks.core.hooks import frozen_parameters, preserved_state
from koopman_hooks.core.layers import module_device
from koopman_hooks.core.select import OutputSelector
from koopman_hooks.errors import ConfigError
from koopman_hooks.fitting import sizing
from koopman_hooks.fitting.cache import StateCache
from koopman_hooks.fitting.config import ProbeConfig
from koopman_hooks.fitting.epochs import Schedule, Tail, refit_operator, train
from koopman_hooks.fitting.fitted import FittedProbe
from koopman_hooks.fitting.head import ignored_part_reaches_output
from koopman_hooks.fitting.passes import Calibration, calibrate, fill_cache, fit_adapters, inputs_of
from koopman_hooks.koopman.autoencoder import AutoencoderConfig, KoopmanAutoencoder
from koopman_hooks.koopman.losses import LossWeights
from koopman_hooks.koopman.start import linear_start
from koopman_hooks.maths.stats import StreamingMoments

DEFAULT_EPOCHS = 60
MAX_VAL_ROWS = 5000
MIN_VAL_ROWS = 250


def _split(n: int, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train rows, held-out rows)``: a seeded random ``fraction`` held out (at least 250 rows but
    no more than a fifth of the data, at most 5,000)."""
    order = torch.randperm(n, generator=generator)
    held = min(max(int(round(n * fraction)), min(MIN_VAL_ROWS, n // 5)), MAX_VAL_ROWS) if n >= 20 and fraction > 0 else 0
    return order[held:].sort().values, order[:held].sort().values


def _pair_moments(cache: StateCache, rows: torch.Tensor, layers: int,
                  width: int) -> tuple[list[StreamingMoments], list[StreamingMoments]]:
    """Moments of ``(a_0, a_j)`` and of ``(a_{j-1}, a_j)`` for every later layer ``j``."""
    first = [StreamingMoments(width, width) for _ in range(layers - 1)]
    consecutive = [StreamingMoments(width, width) for _ in range(layers - 1)] if layers > 2 else []
    for fields in cache.batches(rows, 1024):
        for j, m in enumerate(first, start=1):
            m.update(fields["s0"], fields[f"s{j}"])
        for j, m in enumerate(consecutive, start=1):
            m.update(fields[f"s{j - 1}"], fields[f"s{j}"])
    return first, consecutive


def fit_probe(
    model: nn.Module,
    config: ProbeConfig,
    selectors: Mapping[str, OutputSelector],
    loader: Iterable[Any],
    epochs: int | None = None,
    device: torch.device | str | None = None,
    verbose: bool = True,
    val_loader: Iterable[Any] | None = None,
) -> FittedProbe:
    """Fit a probe of ``model`` on ``loader`` (see the module docstring); ``epochs`` is an upper
    bound (default 60): training stops once the held-out score stops improving."""
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ConfigError(f"epochs must be a positive int or None, got {epochs!r}")
    start_time = time.perf_counter()
    device = torch.device(device) if device is not None else module_device(model)
    layers = list(config.layers)
    spec = BatchSpec(config.input_key, config.label_key, config.ignore_keys)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), preserved_state(model), frozen_parameters(model):
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        want_tail = config.loss_weights.output is None or config.loss_weights.output > 0
        detect_head = config.per_layer("reduce")[layers[-1]] is None
        found: dict[str, Calibration] = {}

        def on_first(captured: Captured) -> dict[str, str]:
            found["calibration"] = calib = calibrate(model, captured, layers, selectors, want_tail, detect_head,
                                                     config.mask_key)
            return {} if calib.reduce is None else {layers[-1]: calib.reduce}

        fitter = fit_adapters(model, layers, selectors, loader, spec, config.per_layer("reduce"), device, on_first,
                              config.mask_key)
        calib = found["calibration"]
        notes = dict(calib.notes)
        width = config.width or fitter.width_for(config.variance, config.max_width)
        if config.latent_dim is not None and config.width is None and width > config.latent_dim:
            width, notes["width"] = config.latent_dim, f"capped at latent_dim={config.latent_dim}"
        adapters = fitter.finalize(width)
        reaches = ignored_part_reaches_output(model, layers[-1], selectors[layers[-1]], adapters[layers[-1]],
                                              calib.example, mask_of(calib.example, config.mask_key))
        steps = config.steps
        if steps is None:
            steps, notes["steps"] = sizing.steps_from_trace(layers, calib.trace)
        with StateCache(config.cache_mb) as cache:
            keep_scores = calib.n_outputs is not None
            keep_inputs = calib.tail_inputs == "real"
            fill_cache(cache, model, layers, selectors, adapters, loader, spec, fitter.shapes, device, keep_scores,
                       keep_inputs, config.mask_key)
            passes = 2
            if val_loader is not None:
                n_fit = cache.n
                fill_cache(cache, model, layers, selectors, adapters, val_loader, spec, fitter.shapes, device,
                           keep_scores, keep_inputs, config.mask_key)
                passes += 1
                cache.finalize()
                train_rows, val_rows = torch.arange(n_fit), torch.arange(n_fit, cache.n)
            else:
                cache.finalize()
                train_rows, val_rows = _split(cache.n, config.val_fraction, generator)
            batch_size = config.batch_size
            if batch_size is None:
                batch_size, notes["batch_size"] = sizing.batch_size_for(len(train_rows))
            offsets = [0]
            for s in steps:
                offsets.append(offsets[-1] + s)
            moments, consecutive = _pair_moments(cache, train_rows, len(layers), width)
            start = linear_start(layers, adapters, moments, offsets, config.ridge, consecutive)
            latent_dim = config.latent_dim
            if latent_dim is None:
                latent_dim, notes["latent_dim"] = sizing.latent_dim_for(width)
            features_in, features_out = adapters[layers[0]].features, adapters[layers[-1]].features
            hidden = config.hidden
            if hidden is None:
                hidden, notes["hidden"] = sizing.hidden_for(features_in, features_out, width, latent_dim, calib.replaced_macs)
            ae_config = AutoencoderConfig(width, latent_dim, tuple(hidden), config.operator, config.rank, tuple(steps))
            ae = KoopmanAutoencoder.from_linear(ae_config, start.operator, seed=config.seed).to(device)
            rotations = [None] + [start.rotations[n].to(device) for n in layers[1:]]
            tail = _tail(calib, device)
            weights = config.loss_weights
            if weights.output is None:
                weights = LossWeights(**{**weights.as_dict(), "output": 1.0 if tail is not None else 0.0})
            schedule = Schedule(epochs or DEFAULT_EPOCHS, batch_size, config.lr, config.weight_decay, config.patience,
                                config.ridge if config.operator_fit == "ridge" else None, verbose)
            outcome = train(ae, cache, train_rows, val_rows, rotations, weights, schedule, device,
                            start.adapters[layers[-1]], tail, generator)
            if config.operator_fit == "ridge":
                refit_operator(ae, cache, train_rows, rotations, device, config.ridge)
            info = {
                "model_passes": passes, "fit_samples": len(train_rows), "held_out_samples": len(val_rows),
                "cache_on_disk": cache.on_disk, "cache_mb": cache.nbytes / 2**20, "epochs_run": outcome.epochs_run,
                "kept_epoch": outcome.kept_epoch, "output_loss": bool(weights.output), "tail_inputs": calib.tail_inputs,
                "reduce": dict(fitter.reduce), "lossy_reduction_reaches_output": reaches,
                "start_score": None if outcome.start_score is None else outcome.start_score.describe(),
                "kept_score": None if outcome.kept_score is None else outcome.kept_score.describe(),
            }
            if not len(val_rows):
                info["kept_because"] = "no held-out rows (val_fraction=0): the last epoch"
            elif outcome.kept_epoch < 0:
                info["kept_because"] = "the closed-form start scored best on held-out data"
            else:
                info["kept_because"] = f"best held-out score at epoch {outcome.kept_epoch}"
        sizes = sizing.Sizes(width, latent_dim, tuple(hidden), tuple(steps), batch_size,
                             sizing.surrogate_macs(features_in, features_out, width, latent_dim, hidden),
                             calib.replaced_macs, notes)
    fitted = FittedProbe(model, config, selectors, start.adapters, ae, start.baselines, outcome.history,
                         time.perf_counter() - start_time, device, sizes, info, calib.tail,
                         calib.example if calib.tail_inputs == "repeated" else None)
    return fitted


def _tail(calib: Calibration, device: torch.device) -> Tail | None:
    runner = calib.tail
    if runner is None:
        return None
    if calib.tail_inputs == "repeated":
        def tail(rows: Mapping[str, torch.Tensor], value: torch.Tensor) -> Any:
            return runner(repeated_rows(calib.example, len(value)), value)
    else:
        def tail(rows: Mapping[str, torch.Tensor], value: torch.Tensor) -> Any:
            return runner(move_inputs(inputs_of(rows, calib.example), device), value)
    return tail

