"""Tests of koopman_hooks/unlearning/metrics.py."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from koopman_hooks.data import YinYangDataset  # noqa: E402
from koopman_hooks.models import ResMLP  # noqa: E402
from koopman_hooks.training import predict, train_classifier  # noqa: E402
from koopman_hooks.unlearning import (  # noqa: E402
    forget_retain_accuracy,
    mia_efficacy,
    predict_with_features,
    probe_recall,
    split_by_class,
)

pytest.importorskip("sklearn")


FORGET = 2


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


def _logits(n: int, margin: float, noise: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits with the true class ``margin`` above Gaussian noise: a larger margin is more confident."""
    labels = torch.randint(0, 5, (n,), generator=gen)
    logits = noise * torch.randn(n, 5, generator=gen)
    logits[torch.arange(n), labels] += margin
    return logits, labels



def test_split_and_accuracy() -> None:
    labels = torch.tensor([0, 1, 2, 2, 1])
    forget, retain = split_by_class(labels, [2])
    assert forget.tolist() == [False, False, True, True, False]
    assert torch.equal(retain, ~forget)
    logits = torch.nn.functional.one_hot(torch.tensor([0, 0, 2, 1, 1]), 3).float()
    assert forget_retain_accuracy(logits, labels, 2) == (0.5, pytest.approx(2 / 3))



@pytest.mark.parametrize("seed", [0, 1, 2])
def test_probe_recall_chance_on_random_features(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (1500,), generator=gen)
    features = torch.randn(1500, 8, generator=gen)  # independent of the labels
    # A balanced-weight probe on noise sits near 0.5 recall (measured 0.33-0.49 over seeds).
    assert probe_recall(features, labels, FORGET, seed=seed) < 0.75



@pytest.mark.parametrize("seed", [0, 1])
def test_probe_recall_high_when_class_is_decodable(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (1500,), generator=gen)
    one_hot = torch.nn.functional.one_hot(labels, 5).float() * 2.0
    features = torch.cat([one_hot + 0.3 * torch.randn(1500, 5, generator=gen), torch.randn(1500, 3, generator=gen)], 1)
    assert probe_recall(features, labels, FORGET, seed=seed) > 0.95



@pytest.mark.parametrize("use_labels", [True, False])
def test_mia_efficacy_separates_member_like_from_test_like(use_labels: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    retain, retain_y = _logits(2000, 6.0, 1.0, gen)  # members: very confident
    test, test_y = _logits(1000, 2.0, 1.5, gen)  # non-members: much less confident
    test_like, test_like_y = _logits(500, 2.0, 1.5, gen)
    member_like, member_like_y = _logits(500, 6.0, 1.0, gen)

    def efficacy(forget: torch.Tensor, forget_y: torch.Tensor) -> float:
        if not use_labels:
            return mia_efficacy(retain, test, forget, seed=0)
        return mia_efficacy(retain, test, forget, 0, retain_labels=retain_y, test_labels=test_y, forget_labels=forget_y)

    # The two confidence distributions barely overlap (measured ~0.9 and ~0.04).
    assert efficacy(test_like, test_like_y) > 0.75
    assert efficacy(member_like, member_like_y) < 0.25



def test_mia_efficacy_rejects_partial_labels() -> None:
    logits = torch.randn(20, 3)
    with pytest.raises(ValueError):
        mia_efficacy(logits, logits, logits, retain_labels=torch.zeros(20, dtype=torch.long))



def test_collect_features_removes_hook_and_restores_mode(trained: ResMLP, yinyang: YinYangDataset) -> None:
    trained.train()
    try:
        feats, labels = collect_features(trained, "blocks.0", DataLoader(yinyang, batch_size=100))
    finally:
        trained.eval()
    assert feats.shape == (600, 10) and torch.equal(labels, yinyang.targets)
    assert not trained.blocks[0]._forward_hooks
    expected = trained.blocks[0](trained.input(yinyang.inputs))
    torch.testing.assert_close(feats, expected.detach())



def test_predict_with_features_is_predict_and_collect_in_one_pass(trained: ResMLP, yinyang: YinYangDataset) -> None:
    loader = DataLoader(yinyang, batch_size=100)
    trained.train()
    try:
        logits, labels, feats = predict_with_features(trained, "blocks.1", loader)
        assert trained.training  # mode restored
    finally:
        trained.eval()
    ref_logits, ref_labels = predict(trained, loader)
    ref_feats, _ = collect_features(trained, "blocks.1", loader)
    torch.testing.assert_close(logits, ref_logits)
    assert torch.equal(labels, ref_labels)
    torch.testing.assert_close(feats, ref_feats)
    assert not trained.blocks[1]._forward_hooks


