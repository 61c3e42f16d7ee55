"""Tests of koopman_hooks/structured_outputs.py."""

from __future__ import annotations

import dataclasses
import warnings
from collections import namedtuple

import pytest
import torch
from torch import nn

from koopman_hooks import KoopmanProbe, LayerError, ShapeError
from koopman_hooks.data import TensorLoader
from koopman_hooks.models import ResMLP

TINY = dict(latent_dim=6, steps=1, hidden=(8,), width=4, verbose=False)


def resmlp(depth: int = 3, batch_norm: bool = False) -> ResMLP:
    torch.manual_seed(0)
    return ResMLP(4, 3, width=6, depth=depth, batch_norm=batch_norm)


def loader(n: int = 48, batch_size: int = 16, seed: int = 0) -> TensorLoader:
    g = torch.Generator().manual_seed(seed)
    return TensorLoader(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g), batch_size=batch_size)


Pair = namedtuple("Pair", ["hidden", "aux"])


@dataclasses.dataclass
class DataOut:
    aux: str
    hidden: torch.Tensor
    extra: torch.Tensor


class StructBlock(nn.Module):
    def __init__(self, d: int, kind: str) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.kind = kind

    def forward(self, x: torch.Tensor):
        h = x + torch.tanh(self.lin(x))
        aux = h.norm(dim=1)
        if self.kind == "tuple":
            return h, aux
        if self.kind == "dict":
            return {"hidden": h, "aux": aux}
        if self.kind == "namedtuple":
            return Pair(h, aux)
        return DataOut("meta", h, aux)


def hidden_of(out):
    if isinstance(out, dict):
        return out["hidden"]
    if isinstance(out, DataOut):
        return out.hidden
    return out[0]


class StructModel(nn.Module):
    def __init__(self, kind: str, d: int = 6, depth: int = 3) -> None:
        super().__init__()
        self.kind = kind
        self.inp = nn.Linear(4, d)
        self.blocks = nn.ModuleList(StructBlock(d, kind) for _ in range(depth))
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor):
        h = self.inp(x)
        for block in self.blocks:
            h = hidden_of(block(h))
        logits = self.head(h)
        if self.kind == "dict":
            return {"logits": logits, "hidden": h}
        return logits, h



def test_data_parallel_probe_fits_and_patches():
    m = resmlp()
    dp = nn.DataParallel(m)
    probe = KoopmanProbe(dp, ["input", "blocks.*"], **TINY).fit(loader(), epochs=1)
    x = torch.randn(8, 4)
    patched = probe.patch()
    sur = probe.surrogate()
    with torch.no_grad():
        expected = m.head(sur(m.input(x)))
        out = patched(x)
    torch.testing.assert_close(out, expected)
    assert all(not mod._forward_hooks for mod in m.modules())



@pytest.mark.parametrize("kind", ["tuple", "dict", "namedtuple", "dataclass"])
def test_probe_on_structured_outputs_fits_and_patches(kind):
    torch.manual_seed(0)
    m = StructModel(kind)
    probe = KoopmanProbe(m, ["blocks.*"], **TINY).fit(loader(), epochs=1)
    assert probe.layers == ["blocks.0", "blocks.1", "blocks.2"]
    assert [h["epoch"] for h in probe.history] == [-1, 0]  # the start, then one epoch
    patched = probe.patch()
    x = torch.randn(8, 4)
    with torch.no_grad():
        real = m(x)
        out = patched(x)
        src = hidden_of(m.blocks[0](m.inp(x)))
        pred = probe.surrogate()(src, like=hidden_of(m.blocks[2](hidden_of(m.blocks[1](src)))))
    assert type(out) is type(real)
    logits = out["logits"] if kind == "dict" else out[0]
    hidden = out["hidden"] if kind == "dict" else out[1]
    # only the selected tensor of blocks.2's output was replaced by the surrogate's prediction
    torch.testing.assert_close(hidden, pred)
    torch.testing.assert_close(logits, m.head(pred))
    # the model itself is unchanged afterwards
    with torch.no_grad():
        again = m(x)
    torch.testing.assert_close(again["logits"] if kind == "dict" else again[0],
                               real["logits"] if kind == "dict" else real[0])



def test_probe_with_key_select_on_dict_model():
    torch.manual_seed(0)
    m = StructModel("dict")
    probe = KoopmanProbe(m, ["blocks.0", "blocks.1"], select="hidden", **TINY).fit(loader(), epochs=1)
    x = torch.randn(5, 4)
    out = probe.patch()(x)
    assert set(out) == {"logits", "hidden"} and out["logits"].shape == (5, 3)



def test_probe_with_callable_select_cannot_patch():
    torch.manual_seed(0)
    m = StructModel("tuple")
    probe = KoopmanProbe(m, ["blocks.0", "blocks.1"], select=lambda o: o[0], **TINY).fit(loader(), epochs=1)
    with pytest.raises(LayerError, match="callable"):
        probe.patch()




def test_load_keeps_the_saved_selects_of_the_layers_select_leaves_out(tmp_path):
    from koopman_hooks import ConfigError

    torch.manual_seed(0)
    m = StructModel("dict")
    path = tmp_path / "p.safetensors"
    # blocks.0 read by a callable (not saved), blocks.1 by a key (saved)
    KoopmanProbe(m, ["blocks.0", "blocks.1"], select={"blocks.0": lambda o: o["hidden"], "blocks.1": "hidden"},
                 **TINY).fit(loader(), epochs=1).save(path)
    loaded = KoopmanProbe.load(path, m, select={"blocks.0": lambda o: o["hidden"]})
    assert loaded.selectors["blocks.1"].select == "hidden"  # not reset to the default (first tensor)
    with pytest.raises(ConfigError, match=r"'blocks.0'.*callable.*select=\{'blocks.0': fn\}"):
        KoopmanProbe.load(path, m)
    with pytest.raises(ConfigError, match="contradicts the select it was probed with"):
        KoopmanProbe.load(path, m, select={"blocks.0": lambda o: o["hidden"], "blocks.1": "aux"})


class AuxFirst(nn.Module):
    """Blocks return ``(aux, hidden)``; the model reads ``hidden`` only."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.blocks = nn.ModuleList(SwappedBlock(d, "tuple") for _ in range(2))
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            _, h = block(h)
        return self.head(h)


class SwappedBlock(StructBlock):
    def forward(self, x: torch.Tensor):
        h, aux = super().forward(x)
        return aux, h


class GRUClassifier(nn.Module):
    """The head reads the GRU's final hidden state ``h_n``, not its output sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h_n = self.gru(torch.tanh(self.proj(x)))
        return self.head(h_n[-1])


def test_a_probed_tensor_the_output_does_not_read_is_warned_about():
    """Where the model's output does not read the probed tensor, a patched model gives the
    model's own outputs and edits change nothing: the fit says so, naming the layer."""
    torch.manual_seed(0)
    m = AuxFirst()
    with pytest.warns(UserWarning, match=r"output does not change when 'blocks.1''s probed tensor \(the first tensor") as seen:
        probe = KoopmanProbe(m, ["blocks.0", "blocks.1"], **TINY).fit(loader(), epochs=1)
    assert {w.filename for w in seen} == {__file__}  # the warning points at the caller's line
    fitted = probe.fetch_model()
    assert fitted.info["output_reads_last_layer"] is False
    assert "output_reads_last" in fitted.sizes.notes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the tensor the output reads: no warning
        probe = KoopmanProbe(m, ["blocks.0", "blocks.1"], select=1, **TINY).fit(loader(), epochs=1)
    assert probe.fetch_model().info["output_reads_last_layer"] is True
    g = torch.Generator().manual_seed(0)
    sequences = TensorLoader(torch.randn(48, 5, 4, generator=g), torch.randint(0, 3, (48,), generator=g), batch_size=16)
    with pytest.warns(UserWarning, match=r"'gru''s probed tensor \(the first tensor of its output\)"):
        probe = KoopmanProbe(GRUClassifier(), ["proj", "gru"], **TINY).fit(sequences, epochs=1)
    # a GRU's multiply-adds are not counted: repr says so rather than "replaced None"
    assert "(the replaced modules' are not counted" in repr(probe) and "None" not in repr(probe)


def test_a_probed_tensor_that_is_not_batch_first_is_refused_naming_the_layer():
    g = torch.Generator().manual_seed(0)
    sequences = TensorLoader(torch.randn(48, 5, 4, generator=g), torch.randint(0, 3, (48,), generator=g), batch_size=16)
    # h_n is (num_layers, batch, features)
    with pytest.raises(ShapeError, match=r"layer 'gru' gave a tensor of shape \(1, 16, 8\) \(select=1\), whose first "
                                         r"dimension is not the batch's 16 samples"):
        KoopmanProbe(GRUClassifier(), ["proj", "gru"], select=[None, 1], **TINY).fit(sequences, epochs=1)

    class TimeMajor(GRUClassifier):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.gru.batch_first = False
            out, _ = self.gru(torch.tanh(self.proj(x)).transpose(0, 1))
            return self.head(out[-1])

    with pytest.raises(ShapeError, match=r"layer 'gru' gave a tensor of shape \(5, 16, 8\) \(the first tensor of its "
                                         r"output\).*batch_first=True"):
        KoopmanProbe(TimeMajor(), ["proj", "gru"], **TINY).fit(sequences, epochs=1)
