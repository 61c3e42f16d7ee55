"""Shared fixtures of the unlearning tests: one small trained model and its fitted probe."""

from __future__ import annotations

import pytest
import torch

from koopman_hooks import KoopmanProbe
from koopman_hooks.data import TensorLoader, YinYangDataset
from koopman_hooks.models import ResMLP
from koopman_hooks.training import train_classifier


@pytest.fixture(scope="session")
def setup() -> dict:
    """A 4-block ResMLP on Yin-Yang and a probe from blocks.0 to blocks.3 (trained once per session)."""
    torch.manual_seed(0)
    train = YinYangDataset(3000, seed=0)
    test = YinYangDataset(1500, seed=1)
    model = ResMLP(4, 3, width=10, depth=4)
    train_classifier(model, TensorLoader.from_dataset(train, 32, shuffle=True), epochs=30, lr=2e-2, verbose=False)
    loader = TensorLoader.from_dataset(train, batch_size=128, shuffle=True)
    # float32 steps whatever the machine and whatever "auto"'s threshold (this fit's steps are
    # below it today): the solvers' agreement and the edits' figures are checked on this surrogate
    probe = KoopmanProbe(model, ["blocks.0", "blocks.3"], latent_dim=16, steps=6, hidden=(64, 64), train_amp=None,
                         verbose=False)
    probe.fit(loader, epochs=30)
    test_loader = TensorLoader.from_dataset(test, 500)
    return {"model": model, "probe": probe, "loader": loader, "test": test_loader, "train": train}
