"""The GPU path (marked ``cuda``; skipped without a GPU): model and probe on the device, autocast."""

from __future__ import annotations

import pytest
import torch

from koopman_hooks import KoopmanProbe
from koopman_hooks.data import TensorLoader, YinYangDataset
from koopman_hooks.models import ResMLP
from koopman_hooks.training import train_classifier

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def on_gpu():
    torch.manual_seed(0)
    train, test = YinYangDataset(3000, seed=0), YinYangDataset(1000, seed=1)
    model = ResMLP(4, 3, width=16, depth=4)
    train_classifier(model, TensorLoader.from_dataset(train, 64, shuffle=True), 15, lr=1e-2, device="cuda", verbose=False)
    return model.cuda().eval(), train, test


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_fit_evaluate_patch_and_unlearn_on_the_gpu(on_gpu, amp):
    model, train, test = on_gpu
    probe = KoopmanProbe(model, ["blocks.0", "blocks.3"], amp=amp, verbose=False)
    probe.fit(TensorLoader.from_dataset(train, 256, shuffle=True), epochs=20)
    fitted = probe.fetch_model()
    assert fitted.device.type == "cuda"
    assert next(fitted.autoencoder.parameters()).is_cuda and fitted.adapters["blocks.0"].basis.is_cuda
    metrics = probe.evaluate(TensorLoader.from_dataset(test, 500))
    assert metrics["agreement"] >= metrics["linear_baseline"]["agreement"] - 0.01
    x = test.inputs[:64].cuda()
    with torch.no_grad():
        out = probe.patch()(x)
    assert out.is_cuda and out.shape == (64, 3)
    edited = probe.unlearn(2, TensorLoader.from_dataset(train, 500))
    with torch.no_grad():
        assert probe.patch(edited)(x).is_cuda
