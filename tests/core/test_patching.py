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


