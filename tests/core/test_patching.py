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




class Tokens(torch.nn.Module):
    """``forward(input_ids, attention_mask)``: a layer ``block`` of token states, a head on token 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 4)
        self.block = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(input_ids))[:, 0])


class MaskEcho(nn.Module):
    """A surrogate that records the mask it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[torch.Tensor | None] = []

    def forward(self, x: torch.Tensor, like: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        self.masks.append(mask)
        return x


@pytest.mark.parametrize("fast", [True, False])
def test_the_attention_mask_of_the_call_reaches_the_surrogate(fast):
    model, echo = Tokens(), MaskEcho()
    ids, mask = torch.randint(0, 10, (3, 5)), torch.tensor([[1, 1, 1, 0, 0]] * 3)
    patched = PatchedModel(model, echo, "embed", "block", fast=fast)
    reference = model(ids, mask)
    torch.testing.assert_close(patched(input_ids=ids, attention_mask=mask), model.head(model.embed(ids)[:, 0]))
    patched(ids, mask)  # positionally: bound to the model's signature
    assert len(echo.masks) >= 2 and all(m is not None and torch.equal(m, mask) for m in echo.masks)
    assert torch.equal(model(ids, mask), reference)
    # a surrogate without a mask argument is called without one
    class NoMask(nn.Module):
        def forward(self, x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
            return x

    plain = PatchedModel(model, NoMask(), "embed", "block", fast=fast)
    assert plain(input_ids=ids, attention_mask=mask).shape == (3, 2)


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
        assert all(p.grad is None for p in model.parameters())
