"""Tests of koopman_hooks/analysis/betti.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from koopman_hooks.analysis.betti import (  # noqa: E402
    BettiSequence,
    betti_curves,
    betti_numbers,
    betti_sequence,
    epsilon_from_reference,
    knn_geodesic,
    normalise,
    principal_projection,
    spearman,
    subsample,
    subsample_indices,
)

pytest.importorskip("gtda")


def circle(n: int, radius: float = 1.0, centre: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.c_[radius * np.cos(t) + centre[0], radius * np.sin(t) + centre[1]]


def blobs(k: int, n: int, dim: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """k well-separated Gaussian blobs; returns points and their blob labels."""
    rng = np.random.default_rng(seed)
    centres = 10.0 * np.eye(k, max(k, dim))[:, :dim] if k <= dim else rng.normal(size=(k, dim)) * 10
    labels = np.arange(n) % k
    return centres[labels] + 0.3 * rng.normal(size=(n, dim)), labels


def random_rotation(dim: int, seed: int = 0) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return q



def test_normalise_centres_and_scales_to_unit_rms() -> None:
    x = np.random.default_rng(0).normal(loc=5.0, scale=3.0, size=(200, 2, 3))
    y = normalise(x)
    assert y.shape == (200, 6) and y.dtype == np.float64
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-12)
    assert np.mean(np.sum(y**2, axis=1)) == pytest.approx(1.0)
    # rows= selects rows of the whole-cloud normalisation; tensors give the same result
    rows = np.array([3, 7, 11])
    np.testing.assert_allclose(normalise(x, rows=rows), y[rows])
    np.testing.assert_allclose(normalise(torch.from_numpy(x)), y)



def test_subsample_indices_are_seeded_unique_and_capped() -> None:
    a = subsample_indices(1000, 100, seed=3)
    assert len(np.unique(a)) == 100 and a.max() < 1000
    np.testing.assert_array_equal(a, subsample_indices(1000, 100, seed=3))
    assert not np.array_equal(a, subsample_indices(1000, 100, seed=4))
    np.testing.assert_array_equal(subsample_indices(50, 100, seed=0), np.arange(50))
    np.testing.assert_array_equal(subsample_indices(50, None, seed=0), np.arange(50))
    x = np.arange(2000.0).reshape(1000, 2)
    np.testing.assert_array_equal(subsample(x, 100, seed=3), x[a])



def test_principal_projection_keeps_the_large_directions() -> None:
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(500, 3)) * [5.0, 3.0, 2.0]
    x = np.c_[signal, 0.01 * rng.normal(size=(500, 40))] @ random_rotation(43)
    y = principal_projection(x, 0.99)
    assert y.shape == (500, 3)
    assert np.mean(np.sum(y**2, axis=1)) == pytest.approx(1.0)
    # distances are the signal's, up to one scale: the projection is (nearly) an isometry on it
    d_sig = np.linalg.norm(signal[:50, None] - signal[None, :50], axis=-1)
    d_y = np.linalg.norm(y[:50, None] - y[None, :50], axis=-1)
    np.testing.assert_allclose(d_y / d_y.mean(), d_sig / d_sig.mean(), atol=0.01)
    assert principal_projection(x, 1.0).shape[1] == 43
    with pytest.raises(ValueError, match="variance"):
        principal_projection(x, 0.0)
    # a fixed number of directions: the largest ones, whatever share of the variance they hold
    five = principal_projection(x, 0.5, dims=5)
    assert five.shape == (500, 5) and np.mean(np.sum(five**2, axis=1)) == pytest.approx(1.0)
    np.testing.assert_allclose(np.abs(five[:, :3] / np.sqrt(np.mean(np.sum(five[:, :3] ** 2, axis=1)))), np.abs(y), atol=1e-3)
    assert principal_projection(x, 0.9, dims=100).shape[1] == 43
    with pytest.raises(ValueError, match="dims"):
        principal_projection(x, 0.9, dims=0)



def test_circle_has_one_component_and_one_loop() -> None:
    x = normalise(circle(150))
    eps = epsilon_from_reference(x)
    assert betti_numbers(x, eps) == {0: 1, 1: 1}
    # below the spacing of the points every point is its own component
    assert betti_numbers(x, 1e-3, dims=(0,)) == {0: 150}



@pytest.mark.parametrize("k", [3, 5])
def test_separated_blobs_are_separate_components(k: int) -> None:
    points, _ = blobs(k, 300)
    x = normalise(points)
    eps = epsilon_from_reference(x)
    assert betti_numbers(x, eps, dims=(0,)) == {0: k}



def test_two_concentric_circles() -> None:
    x = normalise(np.r_[circle(120, 1.0), circle(120, 2.5)])
    eps = epsilon_from_reference(x)
    assert betti_numbers(x, eps) == {0: 2, 1: 2}



def test_essential_bars_count_at_large_scale() -> None:
    # beyond every death only the whole-cloud H0 bar (dropped by gtda by default) remains
    x = normalise(circle(60))
    assert betti_numbers(x, 10.0) == {0: 1, 1: 0}



def test_knn_graph_counts_known_shapes_at_any_scale_or_density() -> None:
    rng = np.random.default_rng(0)
    ring = circle(200) + 0.01 * rng.normal(size=(200, 2))
    assert betti_numbers(ring, 1, metric="knn", n_neighbors=6) == {0: 1, 1: 1}
    # scale-free: scaling, or stretching one axis 20x, changes no neighbour relation that matters
    assert betti_numbers(1e3 * ring, 1, metric="knn", n_neighbors=6) == {0: 1, 1: 1}
    points, _ = blobs(4, 400)
    assert betti_numbers(points, 1, dims=(0,), metric="knn") == {0: 4}
    stretched = points * np.r_[20.0, np.ones(points.shape[1] - 1)]
    assert betti_numbers(stretched, 1, dims=(0,), metric="knn") == {0: 4}
    # two concentric circles: two components, two loops
    rings = np.r_[circle(150, 1.0), circle(150, 2.5)]
    assert betti_numbers(rings, 1, metric="knn", n_neighbors=4) == {0: 2, 1: 2}
    # hop distances: inf between components, the graph's path lengths within one
    hops = knn_geodesic(np.r_[np.zeros((3, 2)) + [0, 0], np.zeros((3, 2)) + [9, 9]] + 1e-3 * np.arange(6)[:, None], 2)
    assert np.isinf(hops[0, 3]) and hops[0, 1] == 1
    with pytest.raises(ValueError, match="metric must be one of"):
        betti_numbers(ring, 1, metric="cosine")



def test_knn_sequence_sums_classes_like_naitzat() -> None:
    points, labels = blobs(3, 300)
    # class 0 split in two far apart halves at "layer 0", joined at "layer 1"
    split = points.copy()
    split[(labels == 0) & (np.arange(300) % 2 == 0)] += 40.0
    seq = betti_sequence([split, points], n_points=None, labels=labels, dims=(0,), metric="knn")
    assert seq.epsilon == 1.0
    assert [seq.per_class[c]["betti0"] for c in range(3)] == [[2, 1], [1, 1], [1, 1]]
    assert seq.betti0 == [4, 3]  # pooled: class 0's far half is a fourth component



def test_betti_curves_agree_with_betti_numbers() -> None:
    x = normalise(np.r_[circle(80, 1.0), circle(80, 2.5, centre=(6.0, 0.0))])
    epsilons = np.array([0.01, 0.05, 0.1, 0.3, 0.8, 2.0])
    curves = betti_curves(x, epsilons, dims=(0, 1))
    assert curves.shape == (2, len(epsilons))
    for j, eps in enumerate(epsilons):
        numbers = betti_numbers(x, eps, dims=(0, 1))
        assert (numbers[0], numbers[1]) == (curves[0, j], curves[1, j])
    assert curves[0, 0] == 160 and curves[0, -1] == 1  # all points -> one cloud



def test_betti_curves_match_gtda_betti_curve() -> None:
    from gtda.diagrams import BettiCurve
    from gtda.homology import VietorisRipsPersistence

    x = normalise(np.r_[circle(50, 1.0), circle(40, 2.0, centre=(5.0, 1.0))])
    diagrams = VietorisRipsPersistence(homology_dimensions=(0, 1)).fit_transform(x[None])
    curve = BettiCurve(n_bins=25).fit(diagrams)
    reference = curve.transform(diagrams)[0]
    # gtda drops the essential H0 bar and cuts at the last death: compare inside that range
    for row, dim in enumerate((0, 1)):
        grid = curve.samplings_[dim]
        ours = betti_curves(x, grid, dims=(dim,))[0]
        expected = reference[row] + (1 if dim == 0 else 0)
        inside = grid < grid[-1]
        np.testing.assert_array_equal(ours[inside], expected[inside])



def test_betti_sequence_treats_all_clouds_identically() -> None:
    points, _ = blobs(3, 900, dim=4, seed=1)
    similar = 7.0 * points @ random_rotation(4) + 3.0  # rotated, scaled, shifted copy
    seq = betti_sequence([points, similar], n_points=400, seed=5, dims=(0, 1))
    assert isinstance(seq, BettiSequence)
    assert seq.betti0 == [3, 3] and seq.betti1[0] == seq.betti1[1]
    np.testing.assert_array_equal(seq.indices, subsample_indices(900, 400, seed=5))
    # ε comes from the normalised, subsampled first cloud only ...
    expected_eps = epsilon_from_reference(normalise(points, rows=seq.indices))
    assert seq.epsilon == pytest.approx(expected_eps)
    collapsed = np.zeros_like(points)
    other = betti_sequence([points, collapsed], n_points=400, seed=5, dims=(0,))
    assert other.epsilon == pytest.approx(seq.epsilon)
    assert other.betti0 == [3, 1] and other.betti1 is None
    # ... so putting another cloud first changes it
    stretched = points * np.array([1.0, 1.0, 1.0, 50.0])
    assert betti_sequence([stretched, points], n_points=400, seed=5, dims=(0,)).epsilon != pytest.approx(
        seq.epsilon, rel=1e-3
    )



def test_betti_sequence_uses_same_subsample_for_every_cloud() -> None:
    # Even samples are scattered, odd samples all sit at one point: at a tiny ε the count
    # is (#even rows drawn) + 1, so it depends on exactly which rows were drawn.
    rng = np.random.default_rng(0)
    cloud = rng.normal(size=(600, 3))
    cloud[1::2] = 0.0
    seq = betti_sequence([cloud, 2.0 * cloud], epsilon=1e-6, n_points=100, seed=1, dims=(0,))
    n_even = int(np.sum(seq.indices % 2 == 0))
    assert 0 < n_even < 100
    assert seq.betti0 == [n_even + 1, n_even + 1]
    # per class: n_points rows drawn from each class, the same rows in every cloud
    labels = (np.arange(600) // 2) % 2
    seq = betti_sequence(
        [cloud, -cloud], epsilon=1e-6, n_points=50, seed=2, labels=labels, dims=(0,)
    )
    for cls in (0, 1):
        members = np.flatnonzero(labels == cls)
        drawn = members[subsample_indices(members.size, 50, seed=2)]
        n_even = int(np.sum(drawn % 2 == 0))
        assert 0 < n_even < 50
        assert seq.per_class[cls]["betti0"] == [n_even + 1, n_even + 1]



def test_betti_sequence_per_class_counts() -> None:
    # class 0: a circle (β0=1, β1=1); class 1: three separated blobs (β0=3, β1=0)
    rng = np.random.default_rng(0)
    ring = circle(150, 1.0)
    centres = np.array([[6.0, 0.0], [9.0, 3.0], [9.0, -3.0]])
    dots = centres[np.arange(150) % 3] + 0.05 * rng.normal(size=(150, 2))
    perm = rng.permutation(300)
    points = np.r_[ring, dots][perm]
    labels = torch.from_numpy(np.r_[np.zeros(150, dtype=int), np.ones(150, dtype=int)][perm])
    seq = betti_sequence([points, -points], n_points=None, labels=labels)
    assert seq.betti0 == [4, 4] and seq.betti1 == [1, 1]
    assert seq.per_class is not None and set(seq.per_class) == {0, 1}
    assert seq.per_class[0] == {"betti0": [1, 1], "betti1": [1, 1]}
    assert seq.per_class[1] == {"betti0": [3, 3], "betti1": [0, 0]}
    # per-class subsampling draws up to n_points rows of each class
    small = betti_sequence([points], n_points=120, labels=labels, dims=(0,))
    assert small.per_class[1]["betti0"] == [3]
    assert betti_sequence([points], n_points=None).per_class is None



def test_betti_sequence_rejects_mismatched_clouds() -> None:
    with pytest.raises(ValueError):
        betti_sequence([np.zeros((10, 2)), np.zeros((11, 2))])



def test_spearman() -> None:
    assert spearman([5, 4, 3, 1, 0]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 7]) > 0.9
    assert spearman([3, 3, 3]) == 0.0 and spearman([1]) == 0.0


