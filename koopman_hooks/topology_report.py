"""Betti numbers of a probed network next to its Koopman surrogate (``probe.topology``)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from koopman_hooks import topology
from koopman_hooks.representations import collect_trajectories

if TYPE_CHECKING:
    from koopman_hooks.probe import KoopmanProbe


def probe_topology(
    probe: KoopmanProbe,
    loader: Iterable,
    n_points: int = 2000,
    layers: Sequence[str] | None = None,
    epsilon: float | None = None,
    quantile: float = 0.99,
    k: int = 1,
    dims: Sequence[int] = (0, 1),
    per_class: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """See :meth:`KoopmanProbe.topology`."""
    start = time.perf_counter()
    traj = collect_trajectories(probe, loader, layers, n_points)
    names = list(traj.network)
    network_clouds = [traj.network[name].numpy() for name in names]
    surrogate_clouds = [step.numpy() for step in traj.surrogate]
    labels = traj.labels.numpy() if per_class and traj.labels is not None else None
    rule: dict[str, Any] | str = "given" if epsilon is not None else {"quantile": quantile, "k": k, "reference": names[0]}
    if epsilon is None:
        reference = topology.normalise(network_clouds[0])
        epsilon = topology.epsilon_from_reference(reference, quantile=quantile, k=k)
    net = topology.betti_sequence(network_clouds, epsilon, n_points, seed, labels=labels, dims=dims)
    sur = topology.betti_sequence(surrogate_clouds, epsilon, n_points, seed, labels=labels, dims=dims)
    result: dict[str, Any] = {
        "epsilon": net.epsilon,
        "epsilon_rule": rule,
        "n_points": len(net.indices),
        "network_layers": names,
        "surrogate_steps": list(range(len(surrogate_clouds))),
        "network_betti0": net.betti0,
        "network_betti1": net.betti1,
        "surrogate_betti0": sur.betti0,
        "surrogate_betti1": sur.betti1,
        "spearman_network": topology.spearman(net.betti0) if net.betti0 else None,
        "spearman_surrogate": topology.spearman(sur.betti0) if sur.betti0 else None,
    }
    if net.betti0 and sur.betti0:
        final_net, final_sur = net.betti0[-1], sur.betti0[-1]
        result["final_betti0_relative_error"] = abs(final_sur - final_net) / max(final_net, 1)
    if labels is not None:
        result["per_class"] = {
            str(c): {"network": net.per_class[c], "surrogate": sur.per_class[c]} for c in net.per_class
        }
    result["seconds"] = time.perf_counter() - start
    return result
