"""Betti numbers of layer point clouds.

Counts how the topology of a data set changes from layer to layer (Naitzat et al.,
"Topology of deep neural networks", JMLR 2020) so that a network and its Koopman
surrogate can be compared step by step.

Persistent homology comes from giotto-tda, an optional extra::

    pip install 'koopman_hooks[topology]'

Conventions used throughout:

- every cloud is flattened to ``(n, d)`` float64 and :func:`normalise`-d (centred, unit
  RMS norm) before it is compared with any other;
- β_k at scale ε counts the degree-k persistence intervals with ``birth <= ε < death``
  (the convention of ``gtda.diagrams.BettiCurve``); infinite (essential) bars count,
  including the one H0 bar of the whole cloud that giotto-tda drops by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor

_INSTALL_HINT = "pip install 'koopman_hooks[topology]'"
# Filtration cut-off relative to ε: any cut-off >= ε gives exact counts at ε (bars still
# alive there come back as infinite); the margin only absorbs ripser's float32 distances.
_THRESHOLD_MARGIN = 1e-4
_STATS_CHUNK = 4096
METRICS = ("euclidean", "knn")


def _vietoris_rips(**kwargs: Any) -> Any:
    try:
        from gtda.homology import VietorisRipsPersistence
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"koopman_hooks.topology needs giotto-tda: {_INSTALL_HINT}") from err
    return VietorisRipsPersistence(**kwargs)


def _as_2d(points: ArrayLike) -> np.ndarray:
    """``(n, ...)`` array or tensor -> ``(n, d)`` array (no copy where possible)."""
    if isinstance(points, torch.Tensor):
        points = points.detach().cpu().numpy()
    points = np.asarray(points)
    if points.ndim == 0:
        raise ValueError("expected a point cloud of shape (n, ...), got a scalar")
    return points.reshape(points.shape[0], -1)


def _labels_array(labels: ArrayLike) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    return np.asarray(labels).reshape(-1)


# --------------------------------------------------------------------------- clouds


def normalise(points: ArrayLike, rows: np.ndarray | None = None) -> np.ndarray:
    """Flatten to ``(n, d)`` float64, centre, and scale to unit RMS norm (mean ‖x‖² = 1).

    The mean and scale are always computed from *all* rows; ``rows`` (indices) only picks
    which normalised rows are returned, so a large cloud need not be copied in full and
    a subsample is normalised exactly as the whole cloud would be. A cloud whose points
    all coincide is only centred (scale 1).
    """
    x = _as_2d(points)
    if x.shape[0] == 0:
        return np.zeros((0, x.shape[1]))
    mean = x.mean(axis=0, dtype=np.float64)
    sq = 0.0
    for start in range(0, x.shape[0], _STATS_CHUNK):
        chunk = x[start : start + _STATS_CHUNK].astype(np.float64) - mean
        sq += float(np.einsum("ij,ij->", chunk, chunk))
    rms = np.sqrt(sq / x.shape[0])
    picked = x if rows is None else x[np.asarray(rows)]
    out = picked.astype(np.float64) - mean
    return out / rms if rms > 0 else out


def principal_projection(points: ArrayLike, variance: float, dims: int | None = None) -> np.ndarray:
    """Centre, keep the principal components holding ``variance`` of the variance (or the
    first ``dims`` of them, when given), scale to unit RMS: ``(n, r)`` float64. The lens the
    probe's PCA adapters see a layer through, so that network layers and decoded surrogate
    states can be compared like for like (small, noisy directions no longer split off
    isolated points)."""
    if not 0.0 < variance <= 1.0:
        raise ValueError(f"variance must be in (0, 1], got {variance}")
    if dims is not None and dims < 1:
        raise ValueError(f"dims must be >= 1, got {dims}")
    x = _as_2d(points).astype(np.float64)
    x = x - x.mean(axis=0)
    if x.shape[0] < 2 or not np.any(x):
        return x
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    energy = np.cumsum(s**2) / np.sum(s**2)
    keep = int(np.searchsorted(energy, variance - 1e-12)) + 1 if dims is None else min(dims, len(s))
    projected = u[:, :keep] * s[:keep]
    return projected / np.sqrt(np.mean(np.sum(projected**2, axis=1)))


def subsample_indices(n: int, n_points: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subsample of ``n_points`` of ``range(n)``, no replacement.

    All of ``range(n)`` when ``n_points`` is ``None`` or ``>= n``. Apply the same indices
    to every cloud that must be compared sample for sample (layer i and surrogate step i).
    """
    if n_points is None or n_points >= n:
        return np.arange(n)
    if n_points < 0:
        raise ValueError(f"n_points must be >= 0, got {n_points}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=n_points, replace=False))


def subsample(points: ArrayLike, n_points: int | None, seed: int) -> np.ndarray:
    """Rows of ``points`` (flattened to ``(n, d)``) at :func:`subsample_indices`."""
    x = _as_2d(points)
    return x[subsample_indices(x.shape[0], n_points, seed)]


def epsilon_from_reference(points: ArrayLike, quantile: float = 1.0, k: int = 10) -> float:
    """The scale ε: the ``quantile`` of the distances from each point to its k-th neighbour.

    ``points`` should already be :func:`normalise`-d and subsampled as they will be
    analysed (the density, hence the scale, depends on the number of points).

    Default ``k=10, quantile=1.0``: ε is the smallest radius at which *every* reference
    point has 10 neighbours. In the Rips complex at ε no component can then have 10 or
    fewer points, so stray noise points are never counted as components. On noisy
    circles, squares, disks, spheres and Gaussians (2-50 D, 200-2000 points) this ε was
    1.04-2.3x the longest minimum-spanning-tree edge (so each is one component), while
    for clusters separated by gaps it stayed at 0.1-0.4x the gap between them. A
    quantile of 1-NN distances (e.g. the median) is far too small: a noisy circle
    breaks into hundreds of components. Lower ``quantile`` (e.g. 0.99) to be robust to
    a few far outliers, at the price of allowing small isolated groups.
    """
    x = _as_2d(points).astype(np.float64, copy=False)
    n = x.shape[0]
    if n < 2:
        return 0.0
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    from scipy.spatial import cKDTree

    k = max(1, min(k, n - 1))
    dist, _ = cKDTree(x).query(x, k=k + 1)  # column 0 is the point itself
    return float(np.quantile(dist[:, k], quantile))


# --------------------------------------------------------------------------- Betti numbers


def knn_geodesic(points: ArrayLike, n_neighbors: int = 10) -> np.ndarray:
    """Hop distances ``(n, n)`` on the symmetric ``n_neighbors``-nearest-neighbour graph
    (``inf`` between its components), via giotto-tda's ``KNeighborsGraph`` and
    ``GraphGeodesicDistance``. The scale-free metric of Naitzat et al.: it ignores how far
    apart or how dense a layer's points are, and keeps only who neighbours whom."""
    try:
        from gtda.graphs import GraphGeodesicDistance, KNeighborsGraph
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"koopman_hooks.topology needs giotto-tda: {_INSTALL_HINT}") from err
    x = _as_2d(points).astype(np.float64, copy=False)
    k = max(1, min(int(n_neighbors), x.shape[0] - 1))
    graph = KNeighborsGraph(n_neighbors=k, mode="connectivity", n_jobs=1).fit_transform(x[None])
    return GraphGeodesicDistance(directed=False, unweighted=True, n_jobs=1).fit_transform(graph)[0]


def _diagram(
    points: np.ndarray, dims: Sequence[int], max_edge_length: float, metric: str = "euclidean", n_neighbors: int = 10
) -> np.ndarray:
    """One persistence diagram ``(n_bars, 3)`` = (birth, death, dim); essential bars are inf."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    vr = _vietoris_rips(
        metric="precomputed" if metric == "knn" else "euclidean",
        homology_dimensions=tuple(sorted(dims)),
        max_edge_length=float(max_edge_length),
        infinity_values=np.inf,
        reduced_homology=False,  # keep the H0 bar of the whole cloud
        n_jobs=1,  # joblib parallelises over clouds only; with one cloud it is overhead
    )
    data = knn_geodesic(points, n_neighbors) if metric == "knn" and len(points) > 1 else points
    if metric == "knn" and len(points) <= 1:
        data = np.zeros((len(points), len(points)))
    return vr.fit_transform(data[None])[0]


def _count_alive(diagram: np.ndarray, dims: Sequence[int], epsilons: np.ndarray) -> np.ndarray:
    """``(len(dims), len(epsilons))`` counts of bars with ``birth <= ε < death``."""
    out = np.zeros((len(dims), len(epsilons)), dtype=int)
    for i, dim in enumerate(dims):
        bars = diagram[diagram[:, 2] == dim]
        alive = (bars[:, 0:1] <= epsilons[None]) & (epsilons[None] < bars[:, 1:2])
        out[i] = alive.sum(axis=0)
    return out


def betti_curves(
    points: ArrayLike,
    epsilons: ArrayLike,
    dims: Sequence[int] = (0, 1),
    max_edge_length: float | None = None,
    metric: str = "euclidean",
    n_neighbors: int = 10,
) -> np.ndarray:
    """β_k at each scale: an int array ``(len(dims), len(epsilons))``, rows in ``dims`` order.

    One Vietoris-Rips diagram is computed with the filtration cut at
    ``max_edge_length`` (default: just above ``max(epsilons)``, which is exact for every
    bar alive at those scales) and bars are counted with ``birth <= ε < death``. Points
    are used as given: normalise first. ``metric="knn"`` measures ε in hops on the
    ``n_neighbors``-NN graph (:func:`knn_geodesic`) instead of Euclidean distance.
    """
    x = _as_2d(points).astype(np.float64, copy=False)
    eps = np.atleast_1d(np.asarray(epsilons, dtype=np.float64))
    dims = tuple(dims)
    if x.shape[0] == 0 or eps.size == 0:
        return np.zeros((len(dims), eps.size), dtype=int)
    if max_edge_length is None:
        max_edge_length = float(eps.max()) * (1 + _THRESHOLD_MARGIN) + 1e-12
    elif max_edge_length < eps.max():
        raise ValueError(f"max_edge_length {max_edge_length} is below the largest ε {eps.max()}")
    return _count_alive(_diagram(x, dims, max_edge_length, metric, n_neighbors), dims, eps)


def betti_numbers(
    points: ArrayLike,
    epsilon: float,
    dims: Sequence[int] = (0, 1),
    max_edge_length: float | None = None,
    metric: str = "euclidean",
    n_neighbors: int = 10,
) -> dict[int, int]:
    """β_k of the Vietoris-Rips complex at scale ``epsilon``, as ``{k: β_k}``.

    Points are used as given: normalise first. With ``dims=(0,)`` only H0 is computed
    (about 0.1 s for 2,000 points); H1 costs more, growing with the number of edges ≤ ε.
    With ``metric="knn"`` ε counts hops on the ``n_neighbors``-NN graph: at ``ε = 1``, β0
    is its number of connected components.
    """
    counts = betti_curves(points, np.array([epsilon]), dims=dims, max_edge_length=max_edge_length, metric=metric,
                          n_neighbors=n_neighbors)
    return {dim: int(c) for dim, c in zip(dims, counts[:, 0])}


# --------------------------------------------------------------------------- sequences


@dataclass(frozen=True)
class BettiSequence:
    """Betti numbers of a sequence of clouds (e.g. one per layer) at one scale.

    ``betti0`` / ``betti1`` hold one count per cloud (``None`` when that degree was not
    asked for). ``per_class`` maps each label to ``{"betti0": [...], "betti1": [...]}``,
    or is ``None`` without labels. ``indices`` are the sample rows used for the pooled
    counts (the same for every cloud).
    """

    epsilon: float
    betti0: list[int] | None
    betti1: list[int] | None
    per_class: dict[Any, dict[str, list[int] | None]] | None = None
    indices: np.ndarray = field(default_factory=lambda: np.arange(0), compare=False, repr=False)


def _sequence_counts(
    clouds: Sequence[ArrayLike], rows: np.ndarray, epsilon: float, dims: Sequence[int], metric: str, n_neighbors: int
) -> dict[str, list[int] | None]:
    counts = [betti_numbers(normalise(c, rows=rows), epsilon, dims=dims, metric=metric, n_neighbors=n_neighbors)
              for c in clouds]
    return {f"betti{k}": ([c[k] for c in counts] if k in dims else None) for k in (0, 1)}


def betti_sequence(
    clouds: Sequence[ArrayLike],
    epsilon: float | None = None,
    n_points: int | None = 2000,
    seed: int = 0,
    quantile: float = 1.0,
    k: int = 10,
    labels: ArrayLike | None = None,
    dims: Sequence[int] = (0, 1),
    metric: str = "euclidean",
    n_neighbors: int = 10,
    variance: float | None = None,
) -> BettiSequence:
    """Betti numbers of every cloud at one scale ε, the clouds treated identically.

    ``clouds[i]`` holds the same ``n`` samples, in the same order, at step ``i`` (e.g.
    layer activations, or a surrogate's predicted states). Each cloud is normalised by
    its own centre and RMS (:func:`normalise`, statistics over all ``n`` samples), the
    same ``n_points`` rows are drawn from every cloud (seeded), and ε, unless given, is
    :func:`epsilon_from_reference` of the normalised, subsampled ``clouds[0]``.

    With ``labels`` (one per sample), each class is also counted on its own, as Naitzat
    et al. do: up to ``n_points`` rows of that class (seeded, the same for every cloud),
    normalised with the whole cloud's statistics, at the same ε.

    ``variance`` (e.g. 0.99) first reduces every cloud to the principal components holding
    that share of its variance (:func:`principal_projection`).

    ``metric="knn"`` (Naitzat et al.) counts on each cloud's own ``n_neighbors``-NN graph,
    with ε in hops (default 1: β0 is the number of connected components); per class, the
    graph is built on that class's points alone.
    """
    if len(clouds) == 0:
        raise ValueError("betti_sequence needs at least one cloud")
    dims = tuple(dims)
    if not set(dims) <= {0, 1}:
        raise ValueError(f"dims must be a subset of (0, 1), got {dims}")
    n = _as_2d(clouds[0]).shape[0]
    if any(_as_2d(c).shape[0] != n for c in clouds):
        raise ValueError(f"all clouds must hold the same {n} samples: got {[len(c) for c in clouds]}")

    if variance is not None:
        clouds = [principal_projection(c, variance) for c in clouds]
    rows = subsample_indices(n, n_points, seed)
    if epsilon is None:
        epsilon = 1.0 if metric == "knn" else epsilon_from_reference(normalise(clouds[0], rows=rows), quantile=quantile, k=k)
    pooled = _sequence_counts(clouds, rows, epsilon, dims, metric, n_neighbors)

    per_class = None
    if labels is not None:
        lab = _labels_array(labels)
        if lab.shape[0] != n:
            raise ValueError(f"got {lab.shape[0]} labels for {n} samples")
        per_class = {}
        for cls in np.unique(lab):
            members = np.flatnonzero(lab == cls)
            cls_rows = members[subsample_indices(members.size, n_points, seed)]
            key = cls.item() if hasattr(cls, "item") else cls
            per_class[key] = _sequence_counts(clouds, cls_rows, epsilon, dims, metric, n_neighbors)

    return BettiSequence(
        epsilon=float(epsilon),
        betti0=pooled["betti0"],
        betti1=pooled["betti1"],
        per_class=per_class,
        indices=rows,
    )


def spearman(sequence: Sequence[float]) -> float:
    """Spearman ρ between position (0, 1, 2, ...) and value: +1 rising, -1 falling.

    Returns ``0.0`` ("no monotone trend") where ρ is undefined: fewer than two values
    or all values equal (a Betti sequence that never changes), so results can be
    averaged without NaN.
    """
    values = np.asarray(sequence, dtype=np.float64).reshape(-1)
    if values.size < 2 or np.all(values == values[0]):
        return 0.0
    from scipy.stats import spearmanr

    rho = spearmanr(np.arange(values.size), values).statistic
    return float(rho) if np.isfinite(rho) else 0.0
