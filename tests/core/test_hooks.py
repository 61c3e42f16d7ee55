"""Tests of koopman_hooks/core/hooks.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from koopman_hooks import LayerError
from koopman_hooks.core.hooks import check_order, record, run_until_stop
from koopman_hooks.core.select import make_selectors
from koopman_hooks.models import ResMLP


def resmlp(depth: int = 3, batch_norm: bool = False) -> ResMLP:
    torch.manual_seed(0)
    return ResMLP(4, 3, width=6, depth=depth, batch_norm=batch_norm)



def test_record_stop_and_check_order_directly():
    m = resmlp()
    layers = ["input", "blocks.1"]
    sels = make_selectors(layers, None)
    x = torch.randn(3, 4)
    with record(m, sels, stop_after="blocks.1") as rec:
        assert run_until_stop(lambda: m(x)) is None  # stopped early
    check_order(layers, rec)
    assert rec.order == layers
    torch.testing.assert_close(rec.activations["input"], m.input(x).detach())
    assert all(not mod._forward_hooks for mod in m.modules())
    with record(m, sels) as rec:
        out = m(x)
    assert out.shape == (3, 3)
    with pytest.raises(LayerError, match="forward order"):
        check_order(["blocks.1", "input"], rec)
    with pytest.raises(LayerError, match="never executed"):
        check_order(["input", "blocks.1", "head"], rec)




def test_record_keeps_the_output_as_the_layer_returned_it():
    """An in-place op after the layer (ReLU(inplace=True)) must not change the recording."""
    from koopman_hooks.core.select import OutputSelector

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(inplace=True), torch.nn.Linear(6, 2))
    x = torch.randn(8, 4)
    with torch.no_grad():
        expected = model[0](x)
    with torch.no_grad(), record(model, {"0": OutputSelector(None, "0")}) as rec:
        model(x)
    assert bool((expected < 0).any())  # the ReLU had something to change
    torch.testing.assert_close(rec.activations["0"], expected)


def test_muted_forward_hooks_are_restored_even_when_the_body_raises():
    from koopman_hooks.core.hooks import muted_forward_hooks

    layer = nn.Linear(2, 2)
    calls: list[int] = []
    handle = layer.register_forward_hook(lambda m, a, o: calls.append(1))
    hooks_before = layer._forward_hooks
    with pytest.raises(RuntimeError, match="boom"), muted_forward_hooks([layer]):
        layer(torch.zeros(1, 2))
        assert calls == []
        raise RuntimeError("boom")
    assert layer._forward_hooks is hooks_before
    layer(torch.zeros(1, 2))
    assert calls == [1]
    handle.remove()
    assert not layer._forward_hooks
