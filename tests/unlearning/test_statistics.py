"""Tests of koopman_hooks/unlearning/statistics.py."""

from __future__ import annotations

import pytest
import torch

from koopman_hooks.unlearning.statistics import LatentGroupStatistics, collect_statistics

DOT = 2


def test_streamed_statistics_match_the_direct_computation(setup: dict) -> None:
    probe = setup["probe"]
    surrogate = probe.surrogate()
    stats = collect_statistics(probe.fetch_model(), setup["loader"], [DOT], metric="euclidean")
    assert isinstance(stats, LatentGroupStatistics)
    assert stats.n_outputs == 3 and stats.classes == [0, 1, 2] and stats.metric is None
    assert sum(stats.counts().values()) == len(setup["train"])
    train = setup["train"]
    with torch.no_grad():
        acts = {}
        handle = probe.model.blocks[0].register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
        logits = probe.model(train.inputs)
        handle.remove()
        z = surrogate.advance(surrogate.encode(acts["a"])).double()
    mask = train.targets == DOT
    # forgotten samples are grouped by the best retained class
    runner_up = torch.tensor([0, 1])[logits[mask][:, [0, 1]].argmax(1)]
    for s in (0, 1):
        group = stats.groups[(DOT, s)]
        rows = z[mask][runner_up == s]
        assert group.n == len(rows)
        torch.testing.assert_close(group.mean_x, rows.mean(0), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(group.cov_xx, torch.cov(rows.T, correction=0), atol=1e-4, rtol=1e-3)
    moments = stats.class_moments([DOT])
    assert moments.n == int(mask.sum())
    torch.testing.assert_close(moments.mean_x, z[mask].mean(0), atol=1e-4, rtol=1e-4)
    # memory: a few d x d moments per group, whatever the dataset size
    d = surrogate.latent_dim
    assert all(m.cov_xx.shape == (d, d) for m in stats.groups.values())
    assert len(stats.groups) <= 3 * 3





def synthetic(n: int, seed: int, d: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    keys = (labels + 1 + torch.randint(0, 2, (n,), generator=g)) % 3
    z0 = torch.randn(n, d, generator=g, dtype=torch.float64) + labels[:, None]
    z = z0 @ torch.randn(d, d, generator=g, dtype=torch.float64) + 2 * labels[:, None]
    jac = torch.randn(n, 4, d, generator=g, dtype=torch.float64)
    return labels, keys, z0, z, jac


def test_group_statistics_stream_the_group_moments_and_merge_exactly():
    labels, keys, z0, z, jac = synthetic(300, seed=0)
    whole = LatentGroupStatistics(3, (2,), metric={})
    for a in range(0, 300, 45):
        assert whole.update(labels[a : a + 45], keys[a : a + 45], z0[a : a + 45], z[a : a + 45], jac[a : a + 45]) is whole
    for (c, s), moments in whole.groups.items():
        rows = (labels == c) & (keys == s)
        assert moments.n == int(rows.sum())
        torch.testing.assert_close(moments.mean_x, z[rows].mean(0))
        torch.testing.assert_close(moments.cov_xx, torch.cov(z[rows].T, correction=0))
        torch.testing.assert_close(whole.start[(c, s)].mean_x, z0[rows].mean(0))
        torch.testing.assert_close(whole.metric[(c, s)], torch.einsum("boi,boj->ij", jac[rows], jac[rows]))
    parts = []
    for a, b in ((0, 10), (10, 170), (170, 300)):
        part = LatentGroupStatistics(3, (2,), metric={})
        parts.append(part.update(labels[a:b], keys[a:b], z0[a:b], z[a:b], jac[a:b]))
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.groups.keys() == whole.groups.keys() and merged.counts() == whole.counts()
    for key in whole.groups:
        torch.testing.assert_close(merged.groups[key].cov_xx, whole.groups[key].cov_xx, rtol=0, atol=1e-10)
        torch.testing.assert_close(merged.start[key].mean_x, whole.start[key].mean_x, rtol=0, atol=1e-12)
        torch.testing.assert_close(merged.metric[key], whole.metric[key], rtol=0, atol=1e-10)
        assert merged.metric_n[key] == whole.metric_n[key]
    with pytest.raises(ValueError, match="other forget"):
        merged.merge(LatentGroupStatistics(3, (1,)))


def test_statistics_from_the_kept_fit_cache_equal_a_pass_over_the_same_rows_without_running_the_model():
    import gc
    import os

    from koopman_hooks import KoopmanProbe
    from koopman_hooks.data import TensorLoader, YinYangDataset
    from koopman_hooks.models import ResMLP
    from koopman_hooks.training import train_classifier

    torch.manual_seed(0)
    data = YinYangDataset(1000, seed=3)
    model = ResMLP(4, 3, width=10, depth=3)
    train_classifier(model, TensorLoader.from_dataset(data, 50, shuffle=True), epochs=3, lr=2e-2, verbose=False)
    loader = TensorLoader.from_dataset(data, batch_size=1000)  # one batch: the same rows, order and metric sample
    probe = KoopmanProbe(model, ["blocks.0", "blocks.2"], cache_mb=0.01, verbose=False)
    probe.fit(loader, epochs=2, keep_cache=True)
    fitted = probe.fetch_model()
    cache = fitted.fit_cache
    assert cache is not None and cache.n == len(data) and fitted.info["cache_kept"]
    folder = cache.folder
    assert folder is not None and os.path.isdir(folder)  # spilled past 0.01 MB: a temporary file

    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        kept = probe.unlearning_statistics(refine=10, refine_rows=64)
    finally:
        handle.remove()
    assert not calls  # the model did not run
    streamed = probe.unlearning_statistics(loader, refine=10, refine_rows=64)
    assert kept.n == streamed.n == len(data) and kept.n_outputs == streamed.n_outputs == 3
    assert kept.groups.keys() == streamed.groups.keys()
    for key, moments in streamed.groups.items():
        for mine, theirs in ((kept.groups[key], moments), (kept.start[key], streamed.start[key])):
            assert mine.n == theirs.n
            torch.testing.assert_close(mine.mean_x, theirs.mean_x, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(mine.m2_xx, theirs.m2_xx, rtol=1e-5, atol=1e-5)
        assert kept.metric is not None and streamed.metric is not None
        torch.testing.assert_close(kept.metric[key], streamed.metric[key], rtol=1e-5, atol=1e-6)
    assert kept.reservoir is not None and streamed.reservoir is not None
    torch.testing.assert_close(kept.reservoir.states, streamed.reservoir.states, rtol=1e-5, atol=1e-6)
    one = probe.unlearn(1, kept, refine=10, refine_rows=64)
    other = probe.unlearn(1, streamed, refine=10, refine_rows=64)
    torch.testing.assert_close(one.endpoint(), other.endpoint(), rtol=1e-4, atol=1e-5)

    probe.release_cache()
    assert fitted.fit_cache is None and not os.path.exists(folder)
    with pytest.raises(ValueError, match="keep_cache=True"):
        probe.unlearn(1)
    probe.fit(loader, epochs=1, keep_cache=True)  # a refit replaces the kept rows; dropping the probe frees them
    folder = probe.fetch_model().fit_cache.folder
    assert folder is not None and os.path.isdir(folder)
    del probe, fitted
    gc.collect()
    assert not os.path.exists(folder)
    plain = KoopmanProbe(model, ["blocks.0", "blocks.2"], verbose=False).fit(loader, epochs=1)
    assert plain.fetch_model().fit_cache is None and not plain.fetch_model().info["cache_kept"]


def test_the_kept_cache_reads_only_the_fit_loaders_rows_and_refuses_a_changed_model():
    from koopman_hooks import KoopmanProbe
    from koopman_hooks.data import TensorLoader, YinYangDataset
    from koopman_hooks.models import ResMLP

    torch.manual_seed(1)
    data, val = YinYangDataset(800, seed=4), YinYangDataset(300, seed=5)
    model = ResMLP(4, 3, width=10, depth=3).eval()
    loader = TensorLoader.from_dataset(data, batch_size=800)
    probe = KoopmanProbe(model, ["blocks.0", "blocks.2"], verbose=False)
    probe.fit(loader, epochs=1, val_loader=TensorLoader.from_dataset(val, 300), keep_cache=True)
    assert probe.fetch_model().fit_cache.n == 1100  # the validation rows are cached too, for the fit's scores ...
    for redirect in ("nearest", "runner_up"):  # ... but the statistics read the loader's 800 alone
        kept = probe.unlearning_statistics(redirect=redirect, refine=5, refine_rows=32)
        streamed = probe.unlearning_statistics(loader, redirect=redirect, refine=5, refine_rows=32)
        assert kept.n == streamed.n == 800 and kept.groups.keys() == streamed.groups.keys()
        for key, moments in streamed.groups.items():
            torch.testing.assert_close(kept.groups[key].mean_x, moments.mean_x, rtol=1e-5, atol=1e-6)
        assert kept.reservoir is not None and streamed.reservoir is not None
        torch.testing.assert_close(kept.reservoir.predictions, streamed.reservoir.predictions)
        if redirect == "nearest":  # no model ranking is read: the same on both paths
            assert bool((kept.reservoir.predictions == -1).all())
    collect_statistics(probe.fetch_model(), None, surrogate=probe.linear_baseline())  # same adapter: readable
    other = probe.surrogate()
    with torch.no_grad():
        other.in_adapter.mean.add_(1.0)  # e.g. a surrogate of another fit: the cached states are not its own
    with pytest.raises(ValueError, match="this surrogate"):
        collect_statistics(probe.fetch_model(), None, surrogate=other)
    for change in (lambda: model.head.weight.data.mul_(-1.0),  # through .data: no version counter sees it
                   lambda: setattr(model.head.weight, "data", model.head.weight.data * 2.0),  # new storage
                   lambda: model.head.weight.add_(0.1)):  # in place under no_grad
        original = model.head.weight.detach().clone()
        with torch.no_grad():
            change()  # the model changed after the fit: its cached scores are stale
        with pytest.raises(ValueError, match="stale"):
            probe.unlearn(0)
        with torch.no_grad():
            model.head.weight.copy_(original)
