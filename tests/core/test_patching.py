"""Tests of koopman_hooks/core/patching.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from koopman_hooks import LayerError, PatchedModel
from koopman_hooks.core.select import OutputSelector
from koopman_hooks.models import ResMLP


def resmlp(depth: int = 3, batch_norm: bool = False) -> ResMLP:
    torch.manual_seed(0)
    return ResMLP(4, 3, width=6, depth=depth, batch_norm=batch_norm)



def test_patching_callable_select_raises():
    m = resmlp()
    with pytest.raises(LayerError, match="callable"):
        PatchedModel(m, nn.Identity(), "input", "head", OutputSelector(None, "input"), OutputSelector(lambda o: o, "head"))




def test_first_forward_under_autograd_reaches_the_surrogate():
    """The first call calibrates without autograd; its result must still carry gradients when
    the caller asked for them (the unlearning refinement differentiates through it)."""
    from koopman_hooks.core.patching import PatchedModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    weight = nn.Parameter(torch.eye(4))

    class Surrogate(nn.Module):
        def forward(self, x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
            return x @ weight

    for fast in (True, False):
        patched = PatchedModel(model, Surrogate(), "1", "3", fast=fast)
        out = patched(torch.randn(5, 3))
        (grad,) = torch.autograd.grad(out.sum(), [weight])
        assert grad.abs().sum() > 0
        assert patched.path == ("fast" if fast else "full")
