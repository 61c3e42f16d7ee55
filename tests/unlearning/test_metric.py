"""Tests of koopman_hooks/unlearning/metric.py: the closed-form pull-back metric against autograd."""

from __future__ import annotations

import pytest
import torch

from koopman_hooks.koopman.autoencoder import SkipMLP
from koopman_hooks.unlearning.metric import PullbackMetric, decoder_jacobian


def decoder(dims: list[int], seed: int = 0) -> SkipMLP:
    torch.manual_seed(seed)
    module = SkipMLP(dims)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.4)  # well into GELU's curved part
    return module.double()


def rows(n: int, d: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 3, (n,), generator=g), torch.randint(0, 2, (n,), generator=g),
            torch.randn(n, d, generator=g, dtype=torch.float64) * 2)


def autograd_sum(module: SkipMLP, z: torch.Tensor) -> torch.Tensor:
    z = z.clone().requires_grad_(True)
    jac = torch.stack([torch.autograd.functional.jacobian(module, v) for v in z.detach()])
    return torch.einsum("boi,boj->ij", jac, jac)


@pytest.mark.parametrize("dims", [[6, 5, 4], [6, 9, 4], [6, 4]])  # hidden below, above (folded per batch), none
def test_the_exact_metric_of_every_group_equals_the_sum_of_autograd_jacobians(dims):
    module = decoder(dims)
    labels, keys, z = rows(120, dims[0])
    metric = PullbackMetric(module, sample_rows=1, generator=torch.Generator().manual_seed(0))
    assert metric.exact
    for chunk in (slice(0, 50), slice(50, 51), slice(51, 120)):  # streamed in uneven batches
        metric.update(labels[chunk], keys[chunk], z[chunk])
    assert all(s2.shape[0] <= dims[0] for _, _, s2 in metric.sums.values())  # never more than d² per group
    totals, counts = metric.totals()
    assert len(totals) == len({(int(c), int(s)) for c, s in zip(labels, keys)})
    for (c, s), total in totals.items():
        mask = (labels == c) & (keys == s)
        assert counts[(c, s)] == int(mask.sum())  # every row of the group, not a sample
        torch.testing.assert_close(total, autograd_sum(module, z[mask]), rtol=1e-10, atol=1e-10)


def test_other_decoders_sample_rows_and_sum_their_autograd_jacobians():
    module = decoder([6, 5, 3, 4]).float()  # two hidden layers: no closed form
    labels, keys, z = rows(200, 6)
    metric = PullbackMetric(module, sample_rows=16, generator=torch.Generator().manual_seed(0))
    assert not metric.exact
    metric.update(labels, keys, z)
    totals, counts = metric.totals()
    picked = torch.randperm(200, generator=torch.Generator().manual_seed(0))[:16].sort().values
    jac = decoder_jacobian(module, z[picked])
    assert sum(counts.values()) == 16
    for (c, s), total in totals.items():
        mask = (labels[picked] == c) & (keys[picked] == s)
        assert counts[(c, s)] == int(mask.sum())
        torch.testing.assert_close(total, torch.einsum("boi,boj->ij", jac[mask], jac[mask]))


def test_a_tanh_gelu_is_not_mistaken_for_the_exact_one():
    module = decoder([6, 5, 4])
    module.residual[1] = torch.nn.GELU(approximate="tanh")
    assert not PullbackMetric(module, 8, torch.Generator()).exact


def test_the_statistics_pass_takes_the_metric_of_every_row_with_the_default_decoder(setup: dict) -> None:
    from koopman_hooks import KoopmanProbe
    from koopman_hooks.data import TensorLoader, YinYangDataset
    from koopman_hooks.unlearning.statistics import collect_statistics

    loader = TensorLoader.from_dataset(YinYangDataset(600, seed=4), batch_size=100)
    probe = KoopmanProbe(setup["model"], ["blocks.0", "blocks.3"], hidden=(8,), verbose=False).fit(loader, epochs=1)
    stats = collect_statistics(probe.fetch_model(), loader, [2], metric="decoder", metric_rows=1)
    assert stats.metric is not None and stats.metric.keys() == stats.groups.keys()
    assert all(stats.metric_n[key] == moments.n for key, moments in stats.groups.items())
    # the fixture's decoder has two hidden layers: metric_rows rows of each batch
    sampled = collect_statistics(setup["probe"].fetch_model(), loader, [2], metric="decoder", metric_rows=3)
    assert sum(sampled.metric_n.values()) == 3 * len(loader)
