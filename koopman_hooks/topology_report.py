"""Betti numbers of a probed network next to its Koopman surrogate (``probe.topology``)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

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
    metric: str = "euclidean",
    n_neighbors: int = 10,
    variance: float | None = None,
) -> dict[str, Any]:
    """See :meth:`KoopmanProbe.topology`."""
    start = time.perf_counter()
    traj = collect_trajectories(probe, loader, layers, n_points)
    names = list(traj.network)
    network_clouds = [traj.network[name].numpy() for name in names]
    surrogate_clouds = [step.numpy() for step in traj.surrogate]
    if variance is not None:  # the same principal-component lens for every cloud, before ε
        network_clouds = [topology.principal_projection(c, variance) for c in network_clouds]
        surrogate_clouds = [topology.principal_projection(c, variance) for c in surrogate_clouds]
    labels = traj.labels.numpy() if per_class and traj.labels is not None else None
    rule: dict[str, Any] | str
    if epsilon is not None:
        rule = "given"
    elif metric == "knn":
        rule, epsilon = {"hops": 1, "n_neighbors": n_neighbors}, 1.0
    else:
        rule = {"quantile": quantile, "k": k, "reference": names[0]}
        reference = topology.normalise(network_clouds[0])
        epsilon = topology.epsilon_from_reference(reference, quantile=quantile, k=k)
    options = {"labels": labels, "dims": dims, "metric": metric, "n_neighbors": n_neighbors}
    net = topology.betti_sequence(network_clouds, epsilon, n_points, seed, **options)
    sur = topology.betti_sequence(surrogate_clouds, epsilon, n_points, seed, **options)
    # headline counts: summed over classes when counted per class (as Naitzat et al. do)
    counts = {}
    for name, seq in (("network", net), ("surrogate", sur)):
        for dim in (0, 1):
            pooled = getattr(seq, f"betti{dim}")
            if seq.per_class is not None and pooled is not None:
                counts[f"{name}_betti{dim}_pooled"] = pooled
                pooled = [int(v) for v in np.sum([c[f"betti{dim}"] for c in seq.per_class.values()], axis=0)]
            counts[f"{name}_betti{dim}"] = pooled
    result: dict[str, Any] = {
        "epsilon": net.epsilon,
        "epsilon_rule": rule,
        "metric": metric,
        "variance": variance,
        "count": "sum over classes" if labels is not None else "pooled",
        "n_points": len(net.indices),
        "network_layers": names,
        "surrogate_steps": list(range(len(surrogate_clouds))),
        **counts,
    }
    b0_net, b0_sur = counts["network_betti0"], counts["surrogate_betti0"]
    result["spearman_network"] = topology.spearman(b0_net) if b0_net else None
    result["spearman_surrogate"] = topology.spearman(b0_sur) if b0_sur else None
    if b0_net and b0_sur:
        result["final_betti0_relative_error"] = abs(b0_sur[-1] - b0_net[-1]) / max(b0_net[-1], 1)
    if labels is not None:
        result["per_class"] = {
            str(c): {"network": net.per_class[c], "surrogate": sur.per_class[c]} for c in net.per_class
        }
    result["seconds"] = time.perf_counter() - start
    return result
