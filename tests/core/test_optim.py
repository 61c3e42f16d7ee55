"""Tests of koopman_hooks/core/optim.py: every training loop's AdamW, fused where it can run."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from koopman_hooks import KoopmanProbe
from koopman_hooks.core import optim
from koopman_hooks.data import TensorLoader
from koopman_hooks.models import ResMLP
from koopman_hooks.training import train_classifier
from koopman_hooks.unlearning.baselines import neggrad_plus


def test_fused_only_for_floating_tensors_on_one_supported_device() -> None:
    cpu = [torch.zeros(2, requires_grad=True), torch.zeros(3, dtype=torch.float64, requires_grad=True)]
    assert optim.fusable(cpu)
    assert not optim.fusable([torch.zeros(2, device="meta")])  # a device without the kernel
    assert not optim.fusable([torch.zeros(2), torch.zeros(2, device="meta")])  # a model split over devices
    assert not optim.fusable([torch.zeros(2, dtype=torch.complex64)])
    assert not optim.fusable([])
    made = optim.adamw(cpu, 1e-3, 0.1)
    assert made.defaults["fused"] and not made.defaults["foreach"] and made.defaults["weight_decay"] == 0.1
    groups = optim.adamw([{"params": cpu[:1], "lr": 1e-2}, {"params": cpu[1:]}], 1e-3)
    assert [g["lr"] for g in groups.param_groups] == [1e-2, 1e-3] and groups.defaults["fused"]


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    made: list[bool] = []
    adamw = torch.optim.AdamW

    def recording(*args: Any, **kwargs: Any) -> torch.optim.AdamW:
        made.append(bool(kwargs.get("fused")))
        return adamw(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", recording)
    return made


def _fused_and_looped(monkeypatch: pytest.MonkeyPatch, train: Callable[[], dict[str, torch.Tensor]]) -> None:
    """``train`` run with the fused kernel and with the ``foreach`` fallback: the same state to
    float rounding, and the fused kernel really used on the CPU."""
    made = _recording(monkeypatch)
    states = []
    for devices in (("cpu", "cuda"), ()):
        monkeypatch.setattr(optim, "FUSED_ADAM_DEVICES", devices)
        states.append(train())
    assert made and made[0] and not made[-1]
    fused, looped = states
    assert fused.keys() == looped.keys()
    for name in fused:
        assert torch.allclose(fused[name], looped[name], rtol=1e-4, atol=1e-5), name


def test_fused_adamw_trains_the_same_autoencoder_as_the_foreach_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = ResMLP(4, 3, width=8, depth=3).eval()
    loader = TensorLoader(torch.randn(600, 4), torch.zeros(600, dtype=torch.long), batch_size=100)

    def fit() -> dict[str, torch.Tensor]:
        probe = KoopmanProbe(model, ["blocks.0", "blocks.2"], verbose=False)
        probe.fit(loader, epochs=3)
        return probe.fetch_model().autoencoder.state_dict()

    _fused_and_looped(monkeypatch, fit)


@pytest.mark.parametrize("loop", ["train_classifier", "neggrad_plus"])
def test_fused_adamw_trains_the_same_model_as_the_foreach_loop(monkeypatch: pytest.MonkeyPatch, loop: str) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(256, 6), torch.randint(0, 3, (256,))
    start = ResMLP(6, 3, width=16, depth=2)  # no batch norm: a bias before it has only rounding noise as gradient,
    # which Adam scales up to full steps

    def train() -> dict[str, torch.Tensor]:
        model: nn.Module = ResMLP(6, 3, width=16, depth=2)
        model.load_state_dict(start.state_dict())
        if loop == "train_classifier":
            train_classifier(model, TensorLoader(x, y, batch_size=32), 2, lr=1e-2, weight_decay=1e-3, verbose=False)
        else:
            model, _ = neggrad_plus(model, TensorLoader(x[y > 0], y[y > 0], batch_size=32),
                                    TensorLoader(x[y == 0], y[y == 0], batch_size=32), 1, lr=1e-2)
        return model.state_dict()

    _fused_and_looped(monkeypatch, train)
