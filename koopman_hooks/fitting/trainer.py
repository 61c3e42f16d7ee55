"""The fit: adapters in one streamed pass, then the Koopman autoencoder by gradient descent.

:func:`fit_probe` returns a :class:`~koopman_hooks.fitting.fitted.FittedProbe`; nothing about
the model changes (weights, modes, hooks, ``requires_grad``, gradients, the global RNG).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from koopman_hooks.core.batches import BatchSpec, call_model
from koopman_hooks.core.capture import iter_captures
from koopman_hooks.core.hooks import preserved_state
from koopman_hooks.core.layers import module_device
from koopman_hooks.core.patching import PatchedModel
from koopman_hooks.core.select import OutputSelector
from koopman_hooks.fitting.config import ProbeConfig
from koopman_hooks.fitting.fitted import FittedProbe
from koopman_hooks.koopman.adapters import AdapterFitter, LayerAdapter
from koopman_hooks.koopman.autoencoder import AutoencoderConfig, KoopmanAutoencoder
from koopman_hooks.koopman.linear import LinearBaselineFitter, RidgeOperatorFitter
from koopman_hooks.koopman.losses import TopologicalLoss, koopman_losses, output_matching_loss


class _Stage:
    """A fitted probe under construction: the pieces :class:`FittedProbe` needs, as they come."""

    def __init__(self, model: nn.Module, config: ProbeConfig, selectors: Mapping[str, OutputSelector], device: torch.device):
        self.model, self.config, self.selectors, self.device = model, config, dict(selectors), device

    def probe(self, adapters: Mapping[str, LayerAdapter], autoencoder: KoopmanAutoencoder,
              baselines: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
              history: list[dict[str, float]] | None = None) -> FittedProbe:
        return FittedProbe(self.model, self.config, self.selectors, adapters, autoencoder, baselines or {}, history or [],
                           device=self.device)


def fit_adapters(stage: _Stage, loader: Iterable[Any]) -> dict[str, LayerAdapter]:
    """One streamed pass: the per-layer PCA adapters (see :class:`AdapterFitter`)."""
    config = stage.config
    fitter = AdapterFitter(config.layers, config.per_layer("reduce"), config.procrustes, device=stage.device)
    spec = BatchSpec(config.input_key, config.label_key, config.ignore_keys)
    for captured in iter_captures(stage.model, stage.selectors, loader, spec, stop_early=True):
        fitter.update(captured.activations)
    width = config.width or fitter.width_for(config.variance, config.max_width)
    return fitter.finalize(width)


class _LiveSurrogate(nn.Module):
    """The surrogate being trained (shares the autoencoder's parameters), for the output loss."""

    def __init__(self, src: LayerAdapter, dst: LayerAdapter, autoencoder: KoopmanAutoencoder, steps: int) -> None:
        super().__init__()
        self.src, self.dst, self.autoencoder, self.steps = src, dst, autoencoder, steps

    def forward(self, x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        a = self.src(x.to(self.src.basis.device, torch.float32))
        return self.dst.inverse(self.autoencoder.predict(a, self.steps), like)


def train_autoencoder(stage: _Stage, adapters: Mapping[str, LayerAdapter], loader: Iterable[Any], epochs: int,
                      verbose: bool) -> FittedProbe:
    """``epochs`` passes of AdamW (cosine schedule) over the adapted states of ``loader``."""
    config = stage.config
    layers = list(config.layers)
    width = next(iter(adapters.values())).width
    ae_config = AutoencoderConfig(width, config.latent_dim, config.hidden, config.operator, config.rank, config.steps)
    ae = KoopmanAutoencoder(ae_config).to(stage.device)
    probe = stage.probe(adapters, ae)
    weights = config.loss_weights
    topological = TopologicalLoss() if weights.topological else None
    ridge_fit = config.operator_fit == "ridge"
    params = [p for n, p in ae.named_parameters() if not (ridge_fit and n.startswith("operator."))]
    ae.operator.requires_grad_(not ridge_fit)
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=epochs)
    baseline = LinearBaselineFitter(len(layers), width, device=stage.device)
    live_patch = None
    if weights.output:
        first, last = layers[0], layers[-1]
        live = _LiveSurrogate(adapters[first], adapters[last], ae, ae.offsets[-1])
        live_patch = PatchedModel(stage.model, live, first, last, probe.selector(first), probe.selector(last))
    history: list[dict[str, float]] = []
    bar = tqdm(range(epochs), desc="koopman fit", disable=not verbose)
    for epoch in bar:
        ae.train()
        sums: dict[str, Any] = {}
        n_batches = 0
        for captured in probe.captures(loader, stop_early=live_patch is None):
            states = probe.adapted(captured.activations)
            if epoch == 0:
                baseline.update(states)
            losses = koopman_losses(ae, states, weights, topological, config.ridge if ridge_fit else None)
            if live_patch is not None:
                losses["output"] = output_matching_loss(call_model(live_patch, captured.inputs), captured.output)
                losses["total"] = losses["total"] + weights.output * losses["output"]
            # gradients of the autoencoder only: the model's parameters never get a .grad
            grads = torch.autograd.grad(losses["total"], params, allow_unused=True)
            for param, grad in zip(params, grads):
                param.grad = grad
            nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value.detach().double()
            n_batches += 1
        schedule.step()
        record: dict[str, float] = {key: float(value) / n_batches for key, value in sums.items()}
        record["epoch"] = epoch
        history.append(record)
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k != "epoch"})
    if ridge_fit:
        operator = RidgeOperatorFitter(config.latent_dim, device=stage.device)
        with torch.no_grad():
            for captured in probe.captures(loader, stop_early=True):
                operator.update([ae.encoder(a) for a in probe.adapted(captured.activations)])
        ae.operator.set_matrix(operator.finalize(config.ridge))
    ae.eval()
    baselines = dict(zip(layers[1:], baseline.finalize(config.ridge)))
    return stage.probe(adapters, ae, baselines, history)


def fit_probe(
    model: nn.Module,
    config: ProbeConfig,
    selectors: Mapping[str, OutputSelector],
    loader: Iterable[Any],
    epochs: int = 50,
    device: torch.device | str | None = None,
    verbose: bool = True,
) -> FittedProbe:
    """Fit adapters, autoencoder and operator by streaming ``loader``; returns the fitted probe.

    One pass fits the adapters, then ``epochs`` passes train the autoencoder. Only one batch of
    activations is held at a time. The model's weights, train/eval modes and hooks are the same
    afterwards, even if fitting raises; the global RNG is left as it was (the fit seeds its own).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    start = time.perf_counter()
    device = torch.device(device) if device is not None else module_device(model)
    stage = _Stage(model, config, selectors, device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), preserved_state(model):
        torch.manual_seed(config.seed)
        adapters = fit_adapters(stage, loader)
        fitted = train_autoencoder(stage, adapters, loader, epochs, verbose)
    fitted.fit_seconds = time.perf_counter() - start
    return fitted
