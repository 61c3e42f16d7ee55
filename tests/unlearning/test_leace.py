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


