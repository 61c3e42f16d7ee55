"""Betti numbers of a probed network next to its Koopman surrogate (``probe.topology``)."""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from koopman_hooks.analysis import betti
from koopman_hooks.analysis.trajectories import collect_trajectories
from koopman_hooks.errors import ConfigError
from koopman_hooks.fitting.fitted import FittedProbe


def _check_options(n_points: Any, epsilon: Any, k: Any, n_neighbors: Any) -> None:
    for name, value in (("n_points", n_points), ("k", k), ("n_neighbors", n_neighbors)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ConfigError(f"{name} must be a positive int, got {value!r}")
    if epsilon is not None and (isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real)
                                or not math.isfinite(epsilon) or epsilon <= 0):
        raise ConfigError(f"epsilon must be a positive finite number or None (chosen from the data), got {epsilon!r}")


def compare_topology(
    probe: FittedProbe,
    loader: Iterable[Any],
    n_points: int = 2000,
    layers: Sequence[str] | str | None = None,
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
    """Betti numbers of the network's layers and of the surrogate's steps 0..k, at one ε.

    ``layers`` (names or globs; default the probed layers) are read from the network;
    surrogate steps are decoded by ψ into the adapted space. Every cloud is centred and
    scaled to unit RMS, the same ``n_points`` samples are used throughout, and ε (unless
    given) is the ``quantile`` of ``k``-th-neighbour distances in the first network layer.
    ``metric="knn"`` counts on each cloud's ``n_neighbors``-NN graph instead (Naitzat et
    al.; ε in hops, default 1, so β0 counts its components). With ``per_class`` each class
    is counted on its own and the headline counts are the sums over classes. ``variance``
    (e.g. 0.99) first reduces every cloud to the principal components holding that share
    of its variance, the lens the probe's PCA adapters see layers through; a surrogate step
    that stands for a network layer (step 0 for the first probed layer, the last step for the
    last, every step at a probed layer's offset) keeps as many components as that layer, so
    that both are counted in the same dimension (``lens_dims`` in the result).
    ``start_betti0_relative_error`` compares step 0 with the first probed layer and
    ``final_betti0_relative_error`` the last step with the last one; each is ``None`` when
    ``layers`` leaves that layer out.
    """
    _check_options(n_points, epsilon, k, n_neighbors)
    start = time.perf_counter()
    traj = collect_trajectories(probe, loader, layers, n_points)
    names = list(traj.network)
    network_clouds = [traj.network[name].numpy() for name in names]
    surrogate_clouds = [step.numpy() for step in traj.surrogate]
    lens_dims: dict[str, list[int]] | None = None
    if variance is not None:  # the same principal-component lens for every cloud, before ε
        network_clouds = [betti.principal_projection(c, variance) for c in network_clouds]
        # a surrogate step that stands for a network layer (the step at a probed layer's offset)
        # is seen through as many principal directions as that layer: the decoded states lack
        # part of the layer's small-variance tail, so "90% of its own variance" would count its
        # components in fewer dimensions than the layer's
        stands_for = {step: names.index(layer) for layer, step in zip(probe.layers, probe.autoencoder.offsets)
                      if layer in names}
        surrogate_clouds = [
            betti.principal_projection(c, variance, network_clouds[stands_for[t]].shape[1] if t in stands_for else None)
            for t, c in enumerate(surrogate_clouds)
        ]
        lens_dims = {"network": [c.shape[1] for c in network_clouds], "surrogate": [c.shape[1] for c in surrogate_clouds]}
    labels = traj.labels.numpy() if per_class and traj.labels is not None else None
    rule: dict[str, Any] | str
    if epsilon is not None:
        rule = "given"
    elif metric == "knn":
        rule, epsilon = {"hops": 1, "n_neighbors": n_neighbors}, 1.0
    else:
        rule = {"quantile": quantile, "k": k, "reference": names[0]}
        reference = betti.normalise(network_clouds[0])
        epsilon = betti.epsilon_from_reference(reference, quantile=quantile, k=k)
    net = betti.betti_sequence(network_clouds, epsilon, n_points, seed, labels=labels, dims=dims, metric=metric,
                               n_neighbors=n_neighbors)
    sur = betti.betti_sequence(surrogate_clouds, epsilon, n_points, seed, labels=labels, dims=dims, metric=metric,
                               n_neighbors=n_neighbors)
    # headline counts: summed over classes when counted per class (as Naitzat et al. do)
    counts: dict[str, list[int] | None] = {}
    for name, seq in (("network", net), ("surrogate", sur)):
        for dim in (0, 1):
            pooled = getattr(seq, f"betti{dim}")
            if seq.per_class is not None and pooled is not None:
                counts[f"{name}_betti{dim}_pooled"] = pooled
                by_class = [c[f"betti{dim}"] or [] for c in seq.per_class.values()]
                pooled = [int(v) for v in np.sum(by_class, axis=0)]
            counts[f"{name}_betti{dim}"] = pooled
    result: dict[str, Any] = {
        "epsilon": net.epsilon,
        "epsilon_rule": rule,
        "metric": metric,
        "variance": variance,
        "lens_dims": lens_dims,
        "count": "sum over classes" if labels is not None else "pooled",
        "n_points": len(net.indices),
        "network_layers": names,
        "surrogate_steps": list(range(len(surrogate_clouds))),
        **counts,
    }
    b0_net, b0_sur = counts["network_betti0"], counts["surrogate_betti0"]
    result["spearman_network"] = betti.spearman(b0_net) if b0_net else None
    result["spearman_surrogate"] = betti.spearman(b0_sur) if b0_sur else None
    if b0_net and b0_sur:
        # step 0 stands for the first probed layer and the last step for the last one: each is
        # compared with that layer where ``layers`` counts it (None where it does not)
        for key, step, layer in (("start", 0, probe.layers[0]), ("final", -1, probe.layers[-1])):
            net_b0 = b0_net[names.index(layer)] if layer in names else None
            result[f"{key}_betti0_relative_error"] = (None if net_b0 is None
                                                      else abs(b0_sur[step] - net_b0) / max(net_b0, 1))
    if net.per_class is not None and sur.per_class is not None:
        result["per_class"] = {str(c): {"network": net.per_class[c], "surrogate": sur.per_class[c]} for c in net.per_class}
    result["seconds"] = time.perf_counter() - start
    return result
