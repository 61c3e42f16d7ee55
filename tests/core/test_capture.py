"""Tests of koopman_hooks/core/capture.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from koopman_hooks import KoopmanProbe, LayerError
from koopman_hooks.data import TensorLoader
from koopman_hooks.models import ResMLP

TINY = dict(latent_dim=6, steps=1, hidden=(8,), width=4, verbose=False)


def resmlp(depth: int = 3, batch_norm: bool = False) -> ResMLP:
    torch.manual_seed(0)
    return ResMLP(4, 3, width=6, depth=depth, batch_norm=batch_norm)


def loader(n: int = 48, batch_size: int = 16, seed: int = 0) -> TensorLoader:
    g = torch.Generator().manual_seed(seed)
    return TensorLoader(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g), batch_size=batch_size)


class Branchy(nn.Module):
    def __init__(self, twice: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.shared = nn.Linear(5, 5)
        self.unused = nn.Linear(5, 5)
        self.b = nn.Linear(5, 3)
        self.twice = twice

    def forward(self, x):
        h = self.shared(self.a(x))
        if self.twice:
            h = self.shared(h)
        return self.b(h)



def test_output_without_tensor_fails_fit_naming_layer():
    class NoTensor(nn.Module):
        def forward(self, x):
            return ("nothing", 1)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = NoTensor()

        def forward(self, x):
            self.b(x)
            return self.a(x)

    m = M()
    probe = KoopmanProbe(m, ["a", "b"], **TINY)
    with pytest.raises(LayerError, match="'b'"):
        probe.fit(loader(), epochs=1)
    assert all(not mod._forward_hooks for mod in m.modules())



def test_reverse_order_is_error_mentioning_forward_order():
    m = resmlp()
    probe = KoopmanProbe(m, ["blocks.2", "blocks.1", "blocks.0"], **TINY)
    with pytest.raises(LayerError, match="forward order"):
        probe.fit(loader(), epochs=1)
    probe = KoopmanProbe(m, ["head", "input"], **TINY)
    with pytest.raises(LayerError, match="forward order"):
        probe.fit(loader(), epochs=1)



def test_unused_layer_never_executed():
    m = Branchy()
    probe = KoopmanProbe(m, ["a", "unused", "b"], **TINY)
    with pytest.raises(LayerError, match="never executed") as err:
        probe.fit(loader(), epochs=1)
    assert "unused" in str(err.value)



def test_layer_called_twice_is_error():
    m = Branchy(twice=True)
    probe = KoopmanProbe(m, ["a", "shared", "b"], **TINY)
    with pytest.raises(LayerError, match="more than once") as err:
        probe.fit(loader(), epochs=1)
    assert "'shared'" in str(err.value)
    assert all(not mod._forward_hooks for mod in m.modules())


