"""Tests of koopman_hooks/unlearning/leace.py."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from koopman_hooks.data import YinYangDataset  # noqa: E402
from koopman_hooks.models import ResMLP  # noqa: E402
from koopman_hooks.training import predict, train_classifier  # noqa: E402
from koopman_hooks.unlearning import (  # noqa: E402
    layer_batches,
    leace_erasure,
    predict_with_features,
    probe_recall,
)

pytest.importorskip("sklearn")


FORGET = 2


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def collect_features(model, layer, loader, hook_on=None):
    _, labels, feats = predict_with_features(model, layer, loader, hook_on=hook_on)
    return feats, labels


@pytest.fixture(scope="module")
def yinyang() -> YinYangDataset:
    return YinYangDataset(size=600, seed=0)


@pytest.fixture(scope="module")
def trained(yinyang: YinYangDataset) -> ResMLP:
    torch.manual_seed(0)
    model = ResMLP(4, 3, width=10, depth=2)
    train_classifier(model, DataLoader(yinyang, batch_size=32, shuffle=True), epochs=15, lr=1e-2, verbose=False)
    return model



def test_leace_erases_class_at_layer(trained: ResMLP, yinyang: YinYangDataset) -> None:
    loader = DataLoader(yinyang, batch_size=64)
    before = _state(trained)
    logits_before, _ = predict(trained, loader)
    erased, seconds = leace_erasure(trained, "blocks.1", ((f, y) for f, y, _ in layer_batches(trained, "blocks.1", loader)), [FORGET])
    assert seconds >= 0

    feats, labels = collect_features(erased, "blocks.1", loader, hook_on=trained)
    raw, _ = collect_features(trained, "blocks.1", loader)
    forget = labels == FORGET
    scale = raw.std(0).max()
    # LEACE makes the class-conditional mean equal the overall mean (it was far off before).
    assert (raw[forget].mean(0) - raw.mean(0)).abs().max() > 0.1 * scale
    torch.testing.assert_close(feats[forget].mean(0), feats.mean(0), atol=1e-4 * scale, rtol=0)
    assert probe_recall(feats, labels, FORGET) < probe_recall(raw, labels, FORGET)

    # The original model is untouched: same weights, same outputs, no leftover hooks.
    assert _same_state(trained, before)
    assert torch.equal(predict(trained, loader)[0], logits_before)
    assert not trained.blocks[1]._forward_hooks
    assert not any(m._forward_hooks for m in trained.modules())
    assert not torch.equal(predict(erased, loader)[0], logits_before)
    assert not trained.blocks[1]._forward_hooks




def _concept_data(n: int = 900, d: int = 6, k: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k + 1, (n,), generator=g)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    x = x + 2.0 * torch.nn.functional.one_hot(labels, d).double()
    from koopman_hooks.unlearning.leace import indicators

    return x, labels, indicators(labels, list(range(k)))


def test_leace_fitter_merges_exactly_and_matches_the_whole_batch_fit():
    import concept_erasure

    from koopman_hooks.unlearning.leace import LeaceFitter

    x, _, z = _concept_data()
    whole = LeaceFitter.fit(x, z)
    parts = [LeaceFitter(6, 2, dtype=torch.float64).update(x[a:b], z[a:b]) for a, b in ((0, 5), (5, 400), (400, 900))]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert int(merged.n) == 900
    torch.testing.assert_close(merged.sigma_xx_, whole.sigma_xx_, rtol=0, atol=1e-8)
    torch.testing.assert_close(merged.sigma_xz_, whole.sigma_xz_, rtol=0, atol=1e-8)
    torch.testing.assert_close(merged.mean_z, whole.mean_z, rtol=0, atol=1e-12)
    oracle = concept_erasure.LeaceEraser.fit(x, z)  # the library's own whole-batch fit
    torch.testing.assert_close(merged.eraser.P, oracle.P, rtol=1e-6, atol=1e-8)


def test_leace_eraser_properties():
    """As concept-erasure tests it: no linear trace of the concept, idempotent, rank <= k."""
    from koopman_hooks.unlearning.leace import LeaceFitter

    x, labels, z = _concept_data()
    eraser = LeaceFitter.fit(x, z, shrinkage=False, constrain_cov_trace=False, svd_tol=1e-8).eraser
    erased = eraser(x)
    cross = (erased - erased.mean(0)).T @ (z - z.mean(0)) / len(x)
    assert float(cross.abs().max()) < 1e-9  # uncorrelated with every concept column
    for c in (0, 1):  # hence every erased class mean equals the overall mean
        torch.testing.assert_close(erased[labels == c].mean(0), erased.mean(0), rtol=0, atol=1e-9)
    torch.testing.assert_close(eraser(erased), erased, rtol=0, atol=1e-9)  # idempotent
    assert torch.linalg.matrix_rank(torch.eye(6, dtype=torch.float64) - eraser.P) <= 2


def test_latent_leace_map_from_moments_is_leace_of_the_samples():
    from koopman_hooks.unlearning.leace import LeaceFitter, latent_leace_map
    from koopman_hooks.unlearning.statistics import LatentGroupStatistics

    x, labels, _ = _concept_data(d=4, k=1)
    stats = LatentGroupStatistics(4, (0,), metric=None).update(labels, torch.zeros_like(labels), x, x, None)
    edit = torch.eye(5, dtype=torch.float64)
    edit[:4, :4] += 0.1 * torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mapped = latent_leace_map(stats, [1, 2], edit)
    moved = x @ edit[:4, :4].T + edit[:4, 4]
    eraser = LeaceFitter.fit(moved, (labels == 0).double()[:, None], shrinkage=False, constrain_cov_trace=False,
                             svd_tol=1e-8).eraser
    retained_mean = moved[labels != 0].mean(0)
    expected = moved - (moved - retained_mean) @ (eraser.proj_left @ eraser.proj_right).T  # anchored at the retained mean
    got = x @ mapped[:4, :4].T + mapped[:4, 4]
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)
