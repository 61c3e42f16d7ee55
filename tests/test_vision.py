"""Tests of koopman_hooks/vision.py."""

from __future__ import annotations

import torch
from torch import nn

from koopman_hooks import KoopmanProbe
from koopman_hooks.core.hooks import record
from koopman_hooks.core.select import make_selectors
from koopman_hooks.koopman.reduce import default_reduce, reduced_dim


def _shapes(model: nn.Module, layers: list[str], x: torch.Tensor, select=None) -> dict[str, tuple[int, ...]]:
    with torch.no_grad(), record(model, make_selectors(layers, select)) as rec:
        model(x)
    return {name: tuple(rec.activations[name].shape[1:]) for name in layers}



def test_mnist_builders_and_default_reductions():
    from koopman_hooks.recipes.builders import MODEL_KINDS, check_model_section, model_factory

    assert {"mnist_resnet18", "mnist_vit"} <= set(MODEL_KINDS)
    x = torch.randn(2, 1, 28, 28)
    resnet = model_factory(check_model_section({"kind": "mnist_resnet18"}), 10)().eval()
    assert resnet.conv1.in_channels == 1 and resnet(x).shape == (2, 10)
    layers = ["layer1", "layer2", "layer3", "layer4"]
    shapes = _shapes(resnet, layers, x)
    assert shapes == {"layer1": (64, 14, 14), "layer2": (128, 7, 7), "layer3": (256, 4, 4), "layer4": (512, 2, 2)}
    fast = model_factory(check_model_section({"kind": "mnist_resnet18", "stem_stride": 2, "channels_last": True}), 10)().eval()
    assert _shapes(fast, layers, x) == {"layer1": (64, 7, 7), "layer2": (128, 4, 4), "layer3": (256, 2, 2),
                                        "layer4": (512, 1, 1)}
    full = model_factory(check_model_section({"kind": "mnist_resnet18", "maxpool": False}), 10)().eval()
    shapes_full = _shapes(full, layers, x)
    assert shapes_full["layer1"] == (64, 28, 28)
    expected = {(64, 28, 28): "pool:8x8", (64, 14, 14): "pool:8x8", (128, 14, 14): "pool:5x5",
                (128, 7, 7): "pool:5x5", (256, 7, 7): "pool:4x4", (256, 4, 4): "flatten", (512, 2, 2): "flatten",
                (512, 4, 4): "pool:2x2"}
    for shape in {*shapes.values(), *shapes_full.values()}:
        spec = default_reduce(shape)
        assert spec == expected[shape]
        assert reduced_dim(shape, spec) <= 4096  # a CPU-sized covariance, never 64*28*28
    vit = model_factory(check_model_section({"kind": "mnist_vit", "depth": 3}), 10)().eval()
    assert vit(x).shape == (2, 10)
    probe = KoopmanProbe(vit, "blocks.*", verbose=False)
    assert probe.layers == ["blocks.0", "blocks.1", "blocks.2"]
    assert set(_shapes(vit, probe.layers, x).values()) == {(50, 64)}  # CLS + 7x7 patches
    assert default_reduce((50, 64)) == "flatten"


