"""Tests of koopman_hooks/architectures.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from koopman_hooks import KoopmanProbe
from koopman_hooks.core.hooks import record
from koopman_hooks.core.select import make_selectors
from koopman_hooks.data import TensorLoader
from koopman_hooks.koopman.reduce import reduce_activation
from koopman_hooks.training import train_classifier

# match outputs through the patched forward; a weak latent-consistency term (at the default
# weight 1 it can pull every latent onto one point when the layers are wide)
WEIGHTS = {"output": 1.0, "latent": 0.1}


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _shapes(model: nn.Module, layers: list[str], x: torch.Tensor, select=None) -> dict[str, tuple[int, ...]]:
    with torch.no_grad(), record(model, make_selectors(layers, select)) as rec:
        model(x)
    return {name: tuple(rec.activations[name].shape[1:]) for name in layers}


def blobs(n: int, seed: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, 1, size, size)`` noise with a bright 2x2 blob; the label is the blob's quadrant."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, 1, size, size, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    half = size // 2
    r = torch.randint(0, half - 1, (n,), generator=g) + (y // 2) * half
    c = torch.randint(0, half - 1, (n,), generator=g) + (y % 2) * half
    for i in range(n):
        x[i, 0, r[i] : r[i] + 2, c[i] : c[i] + 2] += 2.0
    return x, y


@pytest.fixture(scope="module")
def blob_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = blobs(1500, seed=0)
    x_test, y_test = blobs(500, seed=1)
    return x, y, x_test, y_test


class ConvNet(nn.Module):
    """Three conv stages of 4, 8 and 16 channels at 8x8, 4x4 and 2x2, then a linear head."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage2(self.stage1(self.stem(x))))


@pytest.fixture(scope="module")
def conv_fitted(blob_data):
    x, y, _, _ = blob_data
    torch.manual_seed(0)
    model = ConvNet()
    train_classifier(model, TensorLoader(x, y, batch_size=64, shuffle=True), epochs=4, lr=1e-2, verbose=False)
    layers = ["stem", "stage1", "stage2"]
    probe = KoopmanProbe(model, layers, latent_dim=64, steps=[2, 3], operator="dense", hidden=(128,), lr=5e-3,
                         loss_weights=WEIGHTS, verbose=False)
    probe.fit(TensorLoader(x, y, batch_size=64, shuffle=True), epochs=12)
    return probe, model


def tiny_vit(depth: int = 2, **kwargs) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=4, embed_dim=16, depth=depth,
                             num_heads=2, mlp_ratio=2.0, **kwargs)


@pytest.fixture(scope="module")
def vit_trained(blob_data):
    x, y, _, _ = blob_data
    torch.manual_seed(0)
    model = tiny_vit()
    train_classifier(model, TensorLoader(x, y, batch_size=64, shuffle=True), epochs=6, lr=5e-3, verbose=False)
    return model


class TupleBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.linear(x))
        return h, h.norm(dim=-1)  # (hidden, aux)


class DictBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = x + torch.tanh(self.linear(x))
        return {"gate": torch.sigmoid(h.sum(-1, keepdim=True)), "hidden": h}


class StructuredNet(nn.Module):
    """Blocks returning a tuple, a dict and a tuple; the forward unpacks them itself."""

    def __init__(self, d_in: int = 6, d: int = 12, num_classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.a = TupleBlock(d)
        self.b = DictBlock(d)
        self.c = TupleBlock(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.a(self.inp(x))
        out = self.b(h)
        h, aux = self.c(out["hidden"] * out["gate"])
        return self.head(h) + 0.0 * aux[:, None]



def test_conv_net_layers_of_different_widths(conv_fitted, blob_data):
    probe, model = conv_fitted
    _, _, x_test, y_test = blob_data
    assert {name: a.shape for name, a in probe.adapters.items()} == {
        "stem": (4, 8, 8), "stage1": (8, 4, 4), "stage2": (16, 2, 2)
    }
    assert {a.reduce for a in probe.adapters.values()} == {"flatten"}  # small maps: exact
    assert probe.autoencoder.offsets == [0, 2, 5]
    metrics = probe.evaluate(TensorLoader(x_test, y_test, batch_size=250))
    assert metrics["model_accuracy"] >= 0.95
    assert set(metrics["state_fvu_per_layer"]) == {"stage1", "stage2"}
    assert metrics["state_fvu"] == metrics["state_fvu_per_layer"]["stage2"]
    assert all(0.0 <= v <= 0.15 for v in metrics["state_fvu_per_layer"].values()), metrics["state_fvu_per_layer"]
    assert metrics["agreement"] >= 0.98



def test_conv_net_patch_at_inner_pair(conv_fitted, blob_data):
    probe, model = conv_fitted
    _, _, x_test, _ = blob_data
    x = x_test[:200]
    reference = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    patched = probe.patch(src="stage1", dst="stage2")
    assert (patched.src_layer, patched.dst_layer) == ("stage1", "stage2")
    assert patched.surrogate.steps == 3  # the one segment stage1 -> stage2
    out = patched(x)
    assert out.shape == reference.shape
    assert not torch.equal(out, reference)
    assert (out.argmax(1) == reference.argmax(1)).float().mean() >= 0.95
    assert torch.equal(model(x), reference)
    assert _hooks(model) == 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # an inner src with the last dst, and a dst that is not last, both run
    assert probe.patch(src="stem", dst="stage1")(x).shape == reference.shape
    assert probe.patch(src="stage1")(x).shape == reference.shape
    assert _hooks(model) == 0



def test_conv_net_unlearning_at_an_inner_pair(conv_fitted, blob_data):
    probe, model = conv_fitted
    x, y, x_test, y_test = blob_data
    edited = probe.unlearn(1, TensorLoader(x, y, batch_size=250), src="stage1", dst="stage2")
    assert (edited.src_layer, edited.dst_layer) == ("stage1", "stage2")
    patched = probe.patch(edited)
    assert (patched.src_layer, patched.dst_layer) == ("stage1", "stage2")
    with torch.no_grad():
        pred = patched(x_test).argmax(1)
        original = model(x_test).argmax(1)
    forget = y_test == 1
    assert (pred[forget] == 1).float().mean() <= 0.05
    assert (pred[~forget] == original[~forget]).float().mean() >= 0.9
    assert _hooks(model) == 0



def test_lossy_pool_at_an_inner_dst_is_exactly_right_inverse(blob_data):
    """``pool`` at a patched layer: the patched map pools to the surrogate's prediction, for
    sizes that do not divide the map too (3x3 of 8x8; 4x4 maps at 3x3)."""
    x, y, x_test, _ = blob_data
    torch.manual_seed(0)
    model = ConvNet()
    probe = KoopmanProbe(model, ["stem", "stage1", "stage2"], latent_dim=8, steps=1, hidden=(32,),
                         reduce={"stem": "pool:3x3", "stage1": "pool:3x3", "stage2": "flatten"}, verbose=False)
    probe.fit(TensorLoader(x[:256], batch_size=128), epochs=1)
    surrogate = probe.surrogate("stem", "stage1")
    captured = {}
    with torch.no_grad():
        with record(model, probe.selectors) as rec:
            model(x_test[:50])
        predicted = surrogate(rec.activations["stem"], like=rec.activations["stage1"])
        adapter = probe.adapters["stage1"]
        captured["decoded"] = adapter.decode_features(surrogate.decoder(surrogate.final_latent(rec.activations["stem"])))
    assert predicted.shape == rec.activations["stage1"].shape
    torch.testing.assert_close(reduce_activation(predicted, "pool:3x3"), captured["decoded"], rtol=0, atol=1e-4)



def test_timm_vit_blocks(vit_trained, blob_data):
    x, y, x_test, y_test = blob_data
    model = vit_trained
    probe = KoopmanProbe(model, "blocks.*", latent_dim=64, steps=2, operator="dense", hidden=(128,), lr=5e-3,
                         loss_weights=WEIGHTS, verbose=False)
    assert probe.layers == ["blocks.0", "blocks.1"]
    probe.fit(TensorLoader(x, y, batch_size=64, shuffle=True), epochs=10)
    assert probe.adapters["blocks.1"].shape == (5, 16)  # CLS + 4 patch tokens, width 16
    # the head reads token 0 of the last block only (found by perturbing a batch): the reduction follows it
    assert probe.adapters["blocks.1"].reduce == "cls"
    assert probe.adapters["blocks.0"].reduce == "flatten"  # (N, D) small enough: exact
    metrics = probe.evaluate(TensorLoader(x_test, y_test, batch_size=250))
    assert metrics["lossy_reduction_reaches_output"] is False and metrics["template_agreement"] == 1.0
    assert metrics["model_accuracy"] >= 0.9
    assert metrics["agreement"] >= 0.95
    assert set(metrics["state_fvu_per_layer"]) == {"blocks.1"}
    assert metrics["state_fvu"] <= 0.1
    reference = model(x_test[:64])
    assert probe.patch()(x_test[:64]).shape == reference.shape
    assert torch.equal(model(x_test[:64]), reference) and _hooks(model) == 0



def test_vit_cls_reduction_is_honest_only_at_the_last_block(vit_trained, blob_data):
    """``cls`` keeps the real patch tokens (``like=``). A CLS-token head never reads them
    after the last block, so patching there is honest; at an inner block the later blocks
    attend to them, so they would leak the real model's computation into the patched one."""
    model = vit_trained
    x = blob_data[2][:64]

    class ScrambleTokens(nn.Module):
        """Keeps token 0 of the real output and replaces every other token with noise."""

        def __init__(self, src: str, dst: str) -> None:
            super().__init__()
            self.src_layer, self.dst_layer = src, dst

        def forward(self, x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
            out = torch.randn_like(like) * like.std()
            out[:, 0] = like[:, 0]
            return out

    probe = KoopmanProbe(model, "blocks.*", verbose=False)
    reference = model(x)
    last = probe.patch(ScrambleTokens("blocks.0", "blocks.1"), strict=False)(x)
    torch.testing.assert_close(last, reference, rtol=1e-5, atol=1e-5)
    tiny = tiny_vit(depth=3)
    inner = probe.__class__(tiny, "blocks.*", verbose=False)
    assert not torch.allclose(inner.patch(ScrambleTokens("blocks.0", "blocks.1"), strict=False)(x), tiny(x), atol=1e-3)



def test_tuple_and_dict_outputs():
    torch.manual_seed(0)
    model = StructuredNet()
    x = torch.randn(1200, 6, generator=torch.Generator().manual_seed(0))
    select = {"b": "hidden"}  # a and c: None picks the first tensor of the tuple
    probe = KoopmanProbe(model, ["a", "b", "c"], latent_dim=32, steps=1, select=select, operator="dense",
                         hidden=(128,), lr=5e-3, loss_weights=WEIGHTS, verbose=False)
    assert _shapes(model, probe.layers, x[:4], [None, "hidden", None]) == {"a": (12,), "b": (12,), "c": (12,)}
    probe.fit(TensorLoader(x[:1000], batch_size=50, shuffle=True), epochs=15)
    metrics = probe.evaluate(TensorLoader(x[1000:], batch_size=100))  # no labels: agreement and FVU
    assert "model_accuracy" not in metrics
    assert set(metrics["state_fvu_per_layer"]) == {"b", "c"}
    # a and b are different maps, so one shared K cannot fit both segments exactly (the
    # surrogate trades b for c); both are still far better than predicting the mean
    assert max(metrics["state_fvu_per_layer"].values()) <= 0.3, metrics["state_fvu_per_layer"]
    assert metrics["agreement"] >= 0.9
    reference = model(x[1000:])
    for src, dst in [("a", "b"), ("b", "c"), ("a", "c")]:
        out = probe.patch(src=src, dst=dst)(x[1000:])  # writes into the dict / the tuple
        assert out.shape == reference.shape and not torch.equal(out, reference)
        assert (out.argmax(1) == reference.argmax(1)).float().mean() >= 0.7  # chance: about 1/3
    assert torch.equal(model(x[1000:]), reference) and _hooks(model) == 0
    # the wrong key fails clearly
    with pytest.raises(Exception, match="select"):
        KoopmanProbe(model, ["a", "b"], select={"b": "missing"}, verbose=False).fit(TensorLoader(x[:10]), epochs=1)


