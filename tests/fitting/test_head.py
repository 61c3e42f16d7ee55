"""Tests of koopman_hooks/fitting/head.py: what a head reads of a token layer, and whether a
lossy reduction's ignored part reaches the output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from koopman_hooks.core.select import OutputSelector
from koopman_hooks.fitting.head import head_reduce, ignored_part_reaches_output
from koopman_hooks.koopman.adapters import LayerAdapter


class TokenNet(nn.Module):
    """Embeddings, a ``mix`` layer where every token sees the real tokens' mean, a per-token
    ``block`` (the probed layer) and a head reading the block's tokens as ``pool`` says."""

    def __init__(self, pool: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pool = pool
        self.embed = nn.Embedding(12, 6)
        self.mix = nn.Linear(12, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.after = nn.Linear(12, 6)  # "attend": every token sees the real tokens' mean again
        self.head = nn.Linear(6 * 7 if pool == "flatten" else 6, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = attention_mask[..., None].float()
        x = self.embed(input_ids)
        mean = (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)
        h = self.block(self.mix(torch.cat([x, mean.expand_as(x)], -1)))
        if self.pool == "inner":  # later layers read every token: nothing can be dropped at `block`
            hm = (h * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)
            h = torch.tanh(self.after(torch.cat([h, hm.expand_as(h)], -1)))
            return self.head(h[:, 0])
        if self.pool == "cls":
            return self.head(h[:, 0])
        if self.pool == "last":
            last = (torch.arange(h.shape[1]) * attention_mask).argmax(-1)
            return self.head(h[torch.arange(len(h)), last])
        if self.pool == "mean":
            return self.head((h * m).sum(1) / m.sum(1))
        if self.pool == "padded_mean":  # padding reaches the output
            return self.head(h.mean(1))
        return self.head(h.flatten(1))


def batch() -> dict[str, torch.Tensor]:
    lengths = torch.tensor([7, 4, 5, 2, 6, 3, 7, 5])
    mask = (torch.arange(7)[None] < lengths[:, None]).long()
    ids = torch.randint(1, 12, (8, 7), generator=torch.Generator().manual_seed(1)) * mask
    return {"input_ids": ids, "attention_mask": mask}


def block_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    seen = {}
    handle = model.block.register_forward_hook(lambda m, a, o: seen.setdefault("h", o))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen["h"]


@pytest.mark.parametrize("pool, expected", [("cls", "cls"), ("last", "last"), ("mean", "mean"), ("flatten", None),
                                            ("padded_mean", None), ("inner", None)])
def test_the_reduction_follows_what_the_head_reads(pool, expected):
    model = TokenNet(pool).eval()
    inputs = batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reading = head_reduce(model, "block", OutputSelector(None, "block"), inputs, block_output(model, inputs),
                          inputs["attention_mask"])
    assert reading.reduce == expected, reading.reason
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model.block._forward_hooks  # noqa: SLF001 - no hook is left behind


@pytest.mark.parametrize("pool", ["cls", "last"])
def test_rows_whose_first_token_is_their_last_cannot_tell_cls_from_last(pool):
    model = TokenNet(pool).eval()
    inputs = batch()
    inputs["attention_mask"] = torch.zeros_like(inputs["attention_mask"])
    inputs["attention_mask"][:, 0] = 1  # one-token rows
    inputs["input_ids"] = inputs["input_ids"] * inputs["attention_mask"]
    reading = head_reduce(model, "block", OutputSelector(None, "block"), inputs, block_output(model, inputs),
                          inputs["attention_mask"])
    assert reading.reduce is None and "cannot tell" in reading.reason  # the default (lossless) instead of a guess


def test_without_a_mask_last_means_the_last_position_and_misaligned_masks_allow_only_cls():
    model = TokenNet("last").eval()
    inputs = batch()
    full = {"input_ids": inputs["input_ids"].clamp_min(1), "attention_mask": torch.ones(8, 7, dtype=torch.long)}
    h = block_output(model, full)
    assert head_reduce(model, "block", OutputSelector(None, "block"), full, h, None).reduce == "last"
    cls = TokenNet("cls").eval()
    h = block_output(cls, inputs)
    assert head_reduce(cls, "block", OutputSelector(None, "block"), inputs, h, inputs["attention_mask"][:, :5]).reduce == "cls"
    assert head_reduce(cls, "block", OutputSelector(None, "block"), inputs, h[:, 0], None).reduce is None  # not tokens


def test_ignored_part_reaches_output_only_where_the_head_reads_more():
    inputs = batch()
    mask = inputs["attention_mask"]
    for pool, expected in (("cls", False), ("inner", True), ("mean", True)):
        model = TokenNet(pool).eval()
        h = block_output(model, inputs)
        template = h.mean(0)
        adapter = LayerAdapter((7, 6), "cls", torch.zeros(6), torch.eye(6), 1.0, template)
        assert ignored_part_reaches_output(model, "block", OutputSelector(None, "block"), adapter, inputs, mask) is expected
    exact = LayerAdapter((7, 6), "flatten", torch.zeros(42), torch.eye(42), 1.0)
    assert ignored_part_reaches_output(TokenNet("cls").eval(), "block", OutputSelector(None, "block"), exact, inputs,
                                       mask) is None


class MeanHeadNet(nn.Module):
    """Three token blocks (each token also sees the tokens' mean) and a head reading the last
    block's mean token."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():  # the same weights every time, the global RNG untouched
            torch.manual_seed(0)
            self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 4), nn.Tanh()) for _ in range(3))
            self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(torch.cat([x, x.mean(1, keepdim=True).expand_as(x)], -1))
        return self.head(x.mean(1))


@pytest.mark.parametrize("layers, reduce, expected", [
    (["blocks.0", "blocks.1", "blocks.2"], None, "flatten"),  # layers in between, every earlier one whole
    (["blocks.0", "blocks.1", "blocks.2"], [None, "mean", None], "mean"),  # one earlier layer reduced
    (["blocks.0", "blocks.2"], None, "mean"),  # no layer in between: K^s may pool
])
def test_a_mean_head_is_not_followed_where_every_earlier_layer_is_taken_whole(layers, reduce, expected):
    from koopman_hooks import KoopmanProbe
    from koopman_hooks.data import TensorLoader

    model = MeanHeadNet().eval()
    x = torch.randn(256, 5, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    probe = KoopmanProbe(model, layers, reduce=reduce, verbose=False).fit(TensorLoader(x, y, batch_size=64), epochs=1)
    fit = probe.fetch_model()
    assert fit.adapters["blocks.2"].reduce == expected
    assert "reads the mean of the real tokens of 'blocks.2'" in fit.sizes.notes["reduce"]
    assert ("taken whole like the layers before it" in fit.sizes.notes["reduce"]) == (expected == "flatten")
    # the user's choice wins over both
    chosen = KoopmanProbe(model, layers, reduce=[None] * (len(layers) - 1) + ["mean"], verbose=False)
    assert chosen.fit(TensorLoader(x, y, batch_size=64), epochs=1).fetch_model().adapters["blocks.2"].reduce == "mean"
