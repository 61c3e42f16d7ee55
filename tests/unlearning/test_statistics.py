"""Tests of koopman_hooks/unlearning/statistics.py."""

from __future__ import annotations

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



