"""The fit: closed-form start, then gradient steps from a cache, keeping the best held-out state.

1. pass 1 over the data: per-layer PCA adapters (and, on the first batch, a trace of the model,
   the multiply-adds of the replaced modules, and whether the model's tail can be run alone);
2. pass 2 -- replaying pass 1's reduced activations where they fit in ``replay_mb``, else over
   the data again -- every sample's adapted states, scores and labels into a :class:`StateCache`;
3. the closed-form linear start (:mod:`koopman_hooks.koopman.start`) from the cached training
   rows: before any gradient step the surrogate *is* the ridge (DMD) baseline; the cached
   states of the later layers are rotated into its coordinates once;
4. epochs of AdamW on the cache; a held-out split (``val_fraction``, or ``val_loader``) scores
   every state, the best one is kept (:mod:`koopman_hooks.fitting.epochs`).

Nothing about the model changes (weights, modes, hooks, ``requires_grad``, gradients, the
global RNG), even when the fit raises.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from koopman_hooks.core import distributed
from koopman_hooks.core.batches import BatchSpec, amp_dtype, mask_of, move_inputs, padding_side, repeated_rows
from koopman_hooks.core.capture import Captured
from koopman_hooks.core.hooks import frozen_parameters, preserved_state
from koopman_hooks.core.layers import module_device, unwrap_model
from koopman_hooks.core.precision import bf16_pays
from koopman_hooks.core.select import OutputSelector
from koopman_hooks.core.shapes import parameters_digest
from koopman_hooks.errors import ConfigError, EmptyLoaderError, warn
from koopman_hooks.fitting import sizing
from koopman_hooks.fitting.cache import StateCache
from koopman_hooks.fitting.config import ProbeConfig
from koopman_hooks.fitting.epochs import Schedule, Tail, train
from koopman_hooks.fitting.fitted import FittedProbe
from koopman_hooks.fitting.head import ignored_part_reaches_output
from koopman_hooks.fitting.passes import (
    Calibration,
    PairMoments,
    PassRows,
    Replay,
    Sample,
    calibrate,
    fill_cache,
    fit_adapters,
    inputs_of,
    live_rows,
    rotate_cached_states,
)
from koopman_hooks.koopman.adapters import LayerAdapter
from koopman_hooks.koopman.autoencoder import AutoencoderConfig, KoopmanAutoencoder
from koopman_hooks.koopman.losses import LossWeights
from koopman_hooks.koopman.reduce import is_lossy
from koopman_hooks.koopman.start import linear_start
from koopman_hooks.koopman.surrogate import artifact_tensors
from koopman_hooks.maths.rng import preserved_host_streams

DEFAULT_EPOCHS = 60
MAX_VAL_ROWS = 5000
MIN_VAL_ROWS = 250
CACHED_TRAIN_ROWS = 16384  # at most this many training rows are cached (a seeded uniform sample)
REPLAY_BATCH = 1024  # rows of pass 1's kept batches adapted at a time in pass 2


def held_out_rows(n: int, fraction: float, world: int = 1) -> int:
    """How many of a shard's ``n`` rows are held out: ``fraction`` of them, at least 250 rows
    (but no more than a fifth of the data) and at most 5,000 (over all ranks)."""
    if n < 20 or fraction <= 0:
        return 0
    return min(max(int(round(n * fraction)), min(MIN_VAL_ROWS // world, n // 5)), MAX_VAL_ROWS // world)


def fit_probe(
    model: nn.Module,
    config: ProbeConfig,
    selectors: Mapping[str, OutputSelector],
    loader: Iterable[Any],
    epochs: int | None = None,
    device: torch.device | str | None = None,
    verbose: bool = True,
    val_loader: Iterable[Any] | None = None,
    keep_cache: bool = False,
) -> FittedProbe:
    """Fit a probe of ``model`` on ``loader`` (see the module docstring); ``epochs`` is an upper
    bound (default 60): training stops after a cosine cycle of the learning rate that improves
    the held-out score by less than 5%. ``keep_cache`` hands the cache of rows to the fitted
    probe (``FittedProbe.fit_cache``) instead of deleting it. Under an
    initialised ``torch.distributed`` process group every rank passes its own shard of the data
    and all ranks end with the same fitted probe."""
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ConfigError(f"epochs must be a positive int or None, got {epochs!r}")
    start_time = time.perf_counter()
    device = torch.device(device) if device is not None else module_device(model)
    devices = [device] if device.type == "cuda" else []
    # artifact_tensors: ordinary tensors and no gradients, also inside torch.no_grad() or
    # torch.inference_mode(); the training steps turn gradients on for themselves
    with torch.random.fork_rng(devices=devices), preserved_host_streams(config.seed), preserved_state(model), \
            frozen_parameters(model), artifact_tensors():
        # the autoencoder's initial weights come from the CPU generator, seeded inside the fork; not
        # torch.manual_seed, which would also (lazily) reseed every GPU's generator, outside the fork
        torch.random.default_generator.manual_seed(config.seed)
        cache, kept = StateCache(config.cache_mb), False
        replay = Replay(config.replay_mb, config.cache_mb)
        try:
            run = _Run(model, config, selectors, device, verbose)
            adapters, calib = run.adapters(loader, replay)
            train_rows, val_rows, passes = run.cache(cache, adapters, calib, loader, val_loader, replay)
            replay.close()
            fitted = run.train(cache, adapters, calib, train_rows, val_rows, epochs)
            fitted.info.update(model_passes=passes, cache_on_disk=cache.on_disk, cache_mb=cache.nbytes / 2**20,
                               cache_kept=keep_cache)
            if keep_cache:  # the kept rows hold while the weights have this hash (~1 s per GB of weights)
                fitted.model_digest = parameters_digest(unwrap_model(model))
                fitted.keep_cache(cache, run.loader_rows)
                kept = True
        finally:
            replay.close()
            if not kept:  # also after an exception: the temporary folders go
                cache.close()
    fitted.fit_seconds = time.perf_counter() - start_time
    return fitted


class _Run:
    """The steps of one fit, sharing the settings and the notes on what was chosen and why."""

    def __init__(self, model: nn.Module, config: ProbeConfig, selectors: Mapping[str, OutputSelector], device: torch.device,
                 verbose: bool) -> None:
        self.model, self.config, self.selectors, self.device, self.verbose = model, config, selectors, device, verbose
        self.layers = list(config.layers)
        self.spec = BatchSpec(config.input_key, config.label_key, config.ignore_keys, config.amp)
        self.generator = torch.Generator().manual_seed(config.seed + distributed.rank())
        self.notes: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.rows = 0  # rows this rank's loader yielded in pass 1
        self.moments: PairMoments | None = None
        self.loader_rows = 0  # rows of the cache that came from the fit's loader (val_loader's follow)
        self.padding: str | None = None

    def adapters(self, loader: Iterable[Any], replay: Replay) -> tuple[dict[str, LayerAdapter], Calibration]:
        """Pass 1 (merged over ranks), and the calibration on the first batch; ``replay`` keeps
        the batches for pass 2 where they fit."""
        config = self.config
        found: dict[str, Calibration] = {}
        want_tail = config.loss_weights.output is None or config.loss_weights.output > 0
        detect_head = config.per_layer("reduce")[self.layers[-1]] is None

        def on_first(captured: Captured) -> dict[str, str]:
            found["calibration"] = calib = calibrate(self.model, captured, self.layers, self.selectors, want_tail,
                                                     detect_head, config.mask_key, config.per_layer("reduce"),
                                                     amp_dtype(config.amp))
            replay.keep_scores, replay.keep_inputs = calib.keeps_scores, calib.keeps_inputs
            self.padding = padding_side(mask_of(captured.inputs, config.mask_key))  # the first batch's
            return {} if calib.reduce is None else {self.layers[-1]: calib.reduce}

        with distributed.empty_shards(allowed=False):  # an empty shard: every rank raises, naming it
            fitter = fit_adapters(self.model, self.layers, self.selectors, loader, self.spec, config.per_layer("reduce"),
                                  self.device, on_first, config.mask_key, replay)
        parts = distributed.gathered(fitter.n)
        fitter = distributed.merged(fitter)
        calib = agreed(found["calibration"])
        self.notes.update(calib.notes)
        if calib.output_reads_last is False:
            _warn_unread_selection(self.layers[-1], self.selectors[self.layers[-1]].describe(), self.notes)
        self.shapes = dict(fitter.shapes)
        first = self.layers[0]
        if config.per_layer("reduce")[first] is None:  # the default reduction, as the fitter resolved it
            _warn_lossy_source(first, self.shapes[first], fitter.reduce[first] or "flatten", self.notes)
        self.rows = parts[distributed.rank()]
        width = config.width or fitter.width_for(config.variance, config.max_width)
        if config.latent_dim is not None and config.width is None and width > config.latent_dim:
            width, self.notes["width"] = config.latent_dim, f"capped at latent_dim={config.latent_dim}"
        elif config.width is None and config.latent_dim is None:
            features_in, features_out = fitter.moments[self.layers[0]].dim, fitter.moments[self.layers[-1]].dim
            width, self.notes["width"] = sizing.width_for(width, features_in, features_out, calib.replaced_macs)
        return fitter.finalize(width), calib

    def cache(self, cache: StateCache, adapters: Mapping[str, LayerAdapter], calib: Calibration, loader: Iterable[Any],
              val_loader: Iterable[Any] | None, replay: Replay) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Pass 2 -- replayed from pass 1's kept batches where they fit, else over the data -- the
        training rows' moments, and a bounded sample of rows in the cache; returns the cached
        training rows, the cached held-out rows and the passes the model made over data."""
        world = distributed.world_size()
        width = next(iter(adapters.values())).width
        self.moments = PairMoments(len(self.layers), width, self.device)
        held = 0 if val_loader is not None else held_out_rows(self.rows, self.config.val_fraction, world)
        sample = Sample.draw(self.rows, held, CACHED_TRAIN_ROWS // world, self.generator)
        model_args = (self.model, self.layers, self.selectors, adapters)
        if replay.active:
            batches = replay.rows([adapters[name] for name in self.layers], self.device, REPLAY_BATCH)
            self.notes["passes"] = "pass 2 replayed pass 1's reduced activations: the model ran once"
        else:
            batches = live_rows(*model_args, loader, self.spec, self.shapes, self.device, calib.keeps_scores,
                                self.config.mask_key)
            self.notes["passes"] = f"the model ran twice ({replay.dropped_because})"
        try:
            flags = [fill_cache(cache, batches, calib.keeps_inputs, sample, self.moments)]
        except EmptyLoaderError:
            if replay.active:
                raise
            raise EmptyLoaderError(
                f"the loader, iterated a second time ({replay.dropped_because})",
                "it gave batches the first time, so it cannot be iterated twice (a generator or an iterator?): "
                "pass a DataLoader or a list, or raise replay_mb so that the first pass is replayed") from None
        passes = 1 if replay.active else 2
        self.loader_rows = len(flags[0])
        if val_loader is not None:
            val = live_rows(*model_args, val_loader, self.spec, self.shapes, self.device, calib.keeps_scores,
                            self.config.mask_key)
            flags.append(fill_cache(cache, _labelled_like(val, "labels" in cache.fields), calib.keeps_inputs, None, None))
            passes += 1
        cache.finalize()
        out = torch.cat(flags)
        self.moments = distributed.merged(self.moments)
        return (~out).nonzero().squeeze(1), out.nonzero().squeeze(1), passes

    def train(self, cache: StateCache, adapters: Mapping[str, LayerAdapter], calib: Calibration, train_rows: torch.Tensor,
              val_rows: torch.Tensor, epochs: int | None) -> FittedProbe:
        """The closed-form start from the cached training rows, then the epochs."""
        config, layers, device, notes = self.config, self.layers, self.device, self.notes
        width = next(iter(adapters.values())).width
        steps = config.steps
        if steps is None:
            steps, notes["steps"] = sizing.steps_from_trace(layers, calib.trace)
        offsets = [0]
        for s in steps:
            offsets.append(offsets[-1] + s)
        assert self.moments is not None
        start = linear_start(layers, adapters, self.moments.first, offsets, config.ridge, self.moments.consecutive)
        total_rows = self.moments.joint.n
        latent_dim = config.latent_dim
        if latent_dim is None:
            latent_dim, notes["latent_dim"] = sizing.latent_dim_for(width)
            if config.rank is not None and config.rank > latent_dim:
                raise ConfigError(f"rank={config.rank} is above the latent_dim chosen from the data ({latent_dim}: "
                                  f"{notes['latent_dim']}): pass latent_dim >= {config.rank} or a smaller rank")
        features_in, features_out = adapters[layers[0]].features, adapters[layers[-1]].features
        hidden = config.hidden
        if hidden is None:
            hidden, notes["hidden"] = sizing.hidden_for(features_in, features_out, width, latent_dim, calib.replaced_macs)
        batch_size = config.batch_size
        if batch_size is None:
            batch_size, notes["batch_size"] = sizing.batch_size_for(int(distributed.summed([len(train_rows)])[0]))
        ae_config = AutoencoderConfig(width, latent_dim, tuple(hidden), config.operator, config.rank, tuple(steps))
        ae = KoopmanAutoencoder.from_linear(ae_config, start.operator, seed=config.seed).to(device)
        rotate_cached_states(cache, [start.rotations[n] for n in layers[1:]])
        tail = _tail(calib, device)
        weights = config.loss_weights
        if weights.output is None:
            weights = LossWeights(**{**weights.as_dict(), "output": 1.0 if tail is not None else 0.0})
        # per process, as DDP: every rank takes batches of this size from its own shard, so a fit over
        # W processes takes 1/W of the steps per epoch (the autoencoder's steps are overhead-bound:
        # halving the batch per rank barely shortens a step)
        step_macs = batch_size * sizing.surrogate_macs(0, 0, width, latent_dim, hidden)  # φ, K, ψ over a batch
        amp, amp_reason = _train_amp(config.train_amp, device, step_macs)
        schedule = Schedule(epochs or DEFAULT_EPOCHS, batch_size, config.lr, config.weight_decay, config.patience,
                            config.ridge if config.operator_fit == "ridge" else None, self.verbose and distributed.is_main(),
                            amp, config.output_temperature)
        # with operator_fit="ridge" every epoch refits K before it is scored, so the kept state
        # (an epoch's, or the closed-form start) holds the K it was scored with: no refit after it
        outcome = train(ae, cache, train_rows, val_rows, weights, schedule, device, start.adapters[layers[-1]],
                        tail, self.generator)
        held_out = int(distributed.summed([len(val_rows)])[0])
        last = layers[-1]
        reaches = ignored_part_reaches_output(self.model, last, self.selectors[last], adapters[last], calib.example,
                                              mask_of(calib.example, config.mask_key))
        info: dict[str, Any] = {
            "fit_samples": total_rows, "held_out_samples": held_out, "world_size": distributed.world_size(),
            "epochs_run": outcome.epochs_run, "stopped_because": outcome.stopped_because,
            "kept_epoch": outcome.kept_epoch, "output_loss": bool(weights.output),
            "tail_inputs": calib.tail_inputs, "reduce": {name: adapters[name].reduce for name in layers},
            "lossy_reduction_reaches_output": reaches,
            "output_reads_last_layer": calib.output_reads_last,
            "start_score": None if outcome.start_score is None else outcome.start_score.describe(),
            "kept_score": None if outcome.kept_score is None else outcome.kept_score.describe(),
            "train_amp": f"{'bf16' if amp else 'float32'} ({amp_reason})",
            "attention_mask": mask_of(calib.example, config.mask_key) is not None,  # the fit's batches had one
            "padding": self.padding,  # which side the first batch was padded on (None: no padding seen)
        }
        if not held_out:
            info["kept_because"] = (f"no held-out rows (val_fraction={config.val_fraction:g}, {total_rows} rows: fewer than "
                                    "20 hold none out): the last epoch" if config.val_fraction else
                                    "no held-out rows (val_fraction=0): the last epoch")
            if config.val_fraction:
                warn(f"the fit saw {total_rows} rows: too few to hold any out (20 or more hold "
                     f"val_fraction={config.val_fraction:g} of them out), so nothing checked that its "
                     f"{outcome.epochs_run} epochs improved on the closed-form start, whose {width} principal "
                     "components and linear map were estimated from those rows alone; fit on more data, or "
                     "pass val_loader=")
        elif outcome.kept_epoch < 0:
            info["kept_because"] = "the closed-form start scored best on held-out data"
        else:
            info["kept_because"] = f"best held-out score at epoch {outcome.kept_epoch}"
        sizes = sizing.Sizes(width, latent_dim, tuple(hidden), tuple(steps), batch_size,
                             sizing.surrogate_macs(features_in, features_out, width, latent_dim, hidden),
                             calib.replaced_macs, dict(notes))
        return FittedProbe(self.model, config, self.selectors, start.adapters, ae, start.baselines, outcome.history,
                           None, device, sizes, info, calib.tail,
                           calib.example if calib.tail_inputs == "repeated" else None)


def _warn_unread_selection(layer: str, select: int | str | None, notes: dict[str, str]) -> None:
    """Say so (a warning, and a note in ``sizes.notes``) when the model's output does not move with the
    tensor the probe reads at its last layer: a patched model would then give exactly the
    model's outputs, and an edit (``unlearn``) would change nothing."""
    chosen = "the first tensor of its output" if select is None else f"select={select!r}"
    notes["output_reads_last"] = (f"the model's output does not read {layer!r}'s probed tensor ({chosen}): patched "
                                  "outputs are the model's own and edits change nothing")
    warn(f"the model's output does not change when {layer!r}'s probed tensor ({chosen}) does, so the surrogate "
         "cannot change it: a patched model gives the model's own outputs and unlearn() edits change nothing. "
         "Probe the tensor the rest of the model reads: pass select= for that layer (an index or key of its "
         "output), or probe the layer that produces it")


def _warn_lossy_source(layer: str, shape: tuple[int, ...], spec: str, notes: dict[str, str]) -> None:
    """Say so (a warning, and a note in ``repr``) when the default reduction ``spec`` of the first
    probed layer, the surrogate's whole input, drops part of it (a layer over 4,096 features)."""
    if not is_lossy(spec, shape):
        return
    notes["reduce_source"] = (f"{layer!r} ({' x '.join(map(str, shape))} = {math.prod(shape):,} features) read through "
                              f"{spec!r} by default: the surrogate sees only that")
    warn(f"the first probed layer {notes['reduce_source']}; pass reduce={{{layer!r}: 'flatten'}} to read all of "
         "it (its principal components then hold up to max_width of it), or probe a smaller layer")


def _train_amp(option: str | None, device: torch.device, step_macs: int) -> tuple[bool, str]:
    """Whether the autoencoder's steps autocast to bfloat16, and why; one answer for every rank
    (``"auto"``: bfloat16 only where it pays on every rank's device)."""
    if option is None:
        return False, "train_amp=None"
    if option == "bf16":
        return True, "train_amp='bf16'"
    fast, reason = bf16_pays(device, step_macs)
    if distributed.minimum(int(fast)) < int(fast):
        return False, f"{reason}, but not on every rank"
    return fast, reason


def agreed(calib: Calibration) -> Calibration:
    """One calibration for every rank: rank 0's sizes and steps; a tail only if every rank found
    the same kind of tail."""
    views = distributed.gathered((calib.tail_inputs, calib.replaced_macs, calib.n_outputs))
    if len({v[0] for v in views}) > 1:
        calib.tail, calib.tail_inputs = None, None
        calib.notes["tail"] = "the ranks disagree on whether the model's tail can run alone"
    calib.replaced_macs, calib.n_outputs = views[0][1], views[0][2]
    return calib


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


def _labelled_like(rows: Iterable[PassRows], labelled: bool) -> Iterator[PassRows]:
    """``val_loader``'s rows with labels where the fit loader's have them (-1 where it gives none:
    held-out rows' labels are never read) and without where they have none: one cache layout."""
    for batch in rows:
        if labelled and batch.labels is None:
            batch = dataclasses.replace(batch, labels=torch.full((len(batch.states[0]),), -1, dtype=torch.long))
        elif not labelled and batch.labels is not None:
            batch = dataclasses.replace(batch, labels=None)
        yield batch

