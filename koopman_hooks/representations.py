"""Collect a bounded sample of network representations and surrogate trajectories."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from koopman_hooks.batches import call_model, move_inputs, split_batch
from koopman_hooks.hooks import make_selectors, preserved_state, record, resolve_layers

if TYPE_CHECKING:
    from koopman_hooks.probe import KoopmanProbe


@dataclass
class Trajectories:
    """``n`` samples seen two ways: the network's layers, and the surrogate's steps 0..k.

    ``network[name]`` is ``(n, F)`` (flattened activations), ``surrogate[t]`` is ``(n, width)``
    (step ``t`` decoded by ψ into the adapted space), ``labels`` is ``(n,)`` or ``None``.
    """

    network: dict[str, torch.Tensor]
    surrogate: list[torch.Tensor]
    labels: torch.Tensor | None


@torch.no_grad()
def collect_trajectories(
    probe: KoopmanProbe, loader: Iterable, layers: Sequence[str] | None = None, n_samples: int = 2000
) -> Trajectories:
    """The first ``n_samples`` of ``loader`` at network ``layers`` (default: the probed ones,
    names or glob patterns) and along the surrogate from ``layers[0]`` to ``layers[-1]``."""
    ae = probe._check_fitted()
    model = probe._inner
    names = resolve_layers(model, list(layers)) if layers else list(probe.layers)
    wanted = list(dict.fromkeys([*names, probe.layers[0]]))
    selectors = {**make_selectors(wanted, None), **{n: s for n, s in probe.selectors.items() if n in wanted}}
    network: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    steps: list[list[torch.Tensor]] = [[] for _ in range(ae.offsets[-1] + 1)]
    labels: list[torch.Tensor] = []
    seen = 0
    with preserved_state(probe.model):
        for batch in loader:
            inputs, y = split_batch(batch, probe.input_key, probe.label_key)
            with record(model, selectors) as rec:
                call_model(probe.model, move_inputs(inputs, _device(model)))
            take = min(n_samples - seen, next(iter(rec.activations.values())).shape[0])
            for name in names:
                network[name].append(rec.activations[name][:take].flatten(1).float().cpu())
            z = ae.encoder(probe.adapters[probe.layers[0]](rec.activations[probe.layers[0]][:take].to(probe.device, torch.float32)))
            for t in range(len(steps)):
                steps[t].append(ae.decoder(z).cpu())
                z = ae.operator.step(z, 1)
            if y is not None:
                labels.append(y[:take].cpu())
            seen += take
            if seen >= n_samples:
                break
    if seen == 0:
        raise ValueError("the loader yielded no batches")
    return Trajectories(
        {name: torch.cat(chunks) for name, chunks in network.items()},
        [torch.cat(chunks) for chunks in steps],
        torch.cat(labels) if labels else None,
    )


def _device(module: torch.nn.Module) -> torch.device:
    for tensor in [*module.parameters(), *module.buffers()]:
        return tensor.device
    return torch.device("cpu")
