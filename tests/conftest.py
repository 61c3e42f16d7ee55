"""Shared fixtures: small trained models on small data, so the suite stays fast."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from koopman_hooks.data import TensorLoader, YinYangDataset
from koopman_hooks.models import ResMLP
from koopman_hooks.training import train_classifier

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("KOOPMAN_HOOKS_DATA", str(SHARED_DATA))
    torch.set_num_threads(1)  # tiny models: one thread is fastest and immune to oversubscription


@pytest.fixture(scope="session")
def yinyang_small() -> tuple[YinYangDataset, YinYangDataset]:
    return YinYangDataset(3000, seed=0), YinYangDataset(1000, seed=1)


@pytest.fixture(scope="session")
def trained_resmlp(yinyang_small: tuple[YinYangDataset, YinYangDataset]) -> ResMLP:
    """A width-10, 3-block ResMLP trained briefly on 3,000 Yin-Yang samples (~95% accuracy)."""
    torch.manual_seed(0)
    train, _ = yinyang_small
    model = ResMLP(4, 3, width=10, depth=3)
    train_classifier(model, TensorLoader.from_dataset(train, 64, shuffle=True), epochs=20, lr=1e-2, verbose=False)
    return model


@pytest.fixture()
def model_copy(trained_resmlp: ResMLP) -> ResMLP:
    import copy

    return copy.deepcopy(trained_resmlp)
