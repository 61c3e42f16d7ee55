"""A bounded sample of network representations next to the surrogate's latent trajectory."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from koopman_hooks.core import distributed
from koopman_hooks.core.capture import iter_captures
from koopman_hooks.core.hooks import preserved_state
from koopman_hooks.core.layers import resolve_layers
from koopman_hooks.core.select import make_selectors
from koopman_hooks.fitting.fitted import FittedProbe


@dataclass(frozen=True)
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
    probe: FittedProbe, loader: Iterable[Any], layers: Sequence[str] | str | None = None, n_samples: int = 2000
) -> Trajectories:
    """The first ``n_samples`` of ``loader`` at network ``layers`` (default: the probed ones,
    names or glob patterns) and along the surrogate from ``layers[0]`` to ``layers[-1]``."""
    ae = probe.autoencoder
    first = probe.layers[0]
    names = resolve_layers(probe.model, layers, minimum=1) if layers else probe.layers
    wanted = list(dict.fromkeys([*names, first]))
    selectors = {**make_selectors(wanted, None), **{n: s for n, s in probe.selectors.items() if n in wanted}}
    network: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    steps: list[list[torch.Tensor]] = [[] for _ in range(ae.offsets[-1] + 1)]
    labels: list[torch.Tensor] = []
    seen = 0
    with preserved_state(probe.model), distributed.empty_shards(allowed=True):
        captures = iter_captures(probe.model, selectors, loader, probe.batch_spec, ordered=False,
                                 shapes={n: shape for n, shape in probe.shapes.items() if n in wanted})
        for captured in captures:
            take = min(n_samples - seen, captured.activations[first].shape[0])
            for name in names:
                network[name].append(captured.activations[name][:take].flatten(1).float().cpu())
            mask = probe.mask_of(captured.inputs)
            mask = None if mask is None else mask[:take]
            z = ae.encoder(probe.adapters[first](captured.activations[first][:take].to(probe.device, torch.float32), mask))
            for t in range(len(steps)):
                steps[t].append(ae.decoder(z).cpu())
                z = ae.operator.step(z, 1)
            if captured.labels is not None:
                labels.append(captured.labels[:take].cpu())
            seen += take
            if seen >= n_samples:
                break
    local = None if not seen else Trajectories(  # a rank whose shard was empty has none
        {name: torch.cat(chunks) for name, chunks in network.items()},
        [torch.cat(chunks) for chunks in steps],
        torch.cat(labels) if labels else None,
    )
    if not distributed.active():
        assert local is not None
        return local
    # every rank sampled its shard: the first n_samples of the ranks' samples, in rank order
    parts = [p for p in distributed.gathered(local) if p is not None]
    counts = [min(len(p.surrogate[0]), max(n_samples - sum(len(q.surrogate[0]) for q in parts[:i]), 0))
              for i, p in enumerate(parts)]
    return Trajectories(
        {name: torch.cat([p.network[name][:t] for p, t in zip(parts, counts)]) for name in names},
        [torch.cat([p.surrogate[s][:t] for p, t in zip(parts, counts)]) for s in range(len(steps))],
        torch.cat([p.labels[:t] for p, t in zip(parts, counts) if p.labels is not None])
        if parts[0].labels is not None else None,
    )
