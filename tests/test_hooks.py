"""Tests for koopman_hooks.hooks: layer resolution, output selection, order checks, cleanup."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple

import pytest
import torch
from torch import nn

from koopman_hooks import KoopmanProbe, LayerError, PatchedModel
from koopman_hooks.data import TensorLoader
from koopman_hooks.hooks import (
    OutputSelector,
    check_order,
    get_module,
    make_selectors,
    record,
    resolve_layers,
    run_until_stop,
    unwrap_model,
)
from koopman_hooks.models import ResMLP

TINY = dict(latent_dim=3, steps=1, hidden=(8,), width=4, verbose=False)


def resmlp(depth: int = 3, batch_norm: bool = False) -> ResMLP:
    torch.manual_seed(0)
    return ResMLP(4, 3, width=6, depth=depth, batch_norm=batch_norm)


def loader(n: int = 48, batch_size: int = 16, seed: int = 0) -> TensorLoader:
    g = torch.Generator().manual_seed(seed)
    return TensorLoader(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g), batch_size=batch_size)


# ----------------------------------------------------------------------------- resolution


def test_exact_names_keep_given_order():
    m = resmlp()
    assert resolve_layers(m, ["input", "blocks.1", "head"]) == ["input", "blocks.1", "head"]
    # resolution follows the order given, not the forward order
    assert resolve_layers(m, ["head", "input"]) == ["head", "input"]


def test_glob_star_stays_within_one_name_part():
    m = resmlp(depth=4)
    assert resolve_layers(m, ["blocks.*"]) == [f"blocks.{i}" for i in range(4)]
    assert "blocks.0.linear" in dict(m.named_modules())  # the pattern really had deeper names to skip
    assert resolve_layers(m, ["blocks.?"]) == [f"blocks.{i}" for i in range(4)]


def test_glob_double_star_crosses_dots():
    m = resmlp(depth=3)
    assert resolve_layers(m, ["blocks.**.linear"]) == [f"blocks.{i}.linear" for i in range(3)]
    assert resolve_layers(m, ["**linear"]) == [f"blocks.{i}.linear" for i in range(3)]
    # a single star cannot cross the dot
    with pytest.raises(LayerError):
        resolve_layers(m, ["blocks*linear"])


def test_module_objects_and_duplicates():
    m = resmlp(depth=3)
    assert resolve_layers(m, [m.input, m.blocks[2], m.head]) == ["input", "blocks.2", "head"]
    got = resolve_layers(m, ["input", "blocks.1", "blocks.*", m.blocks[0], "head", "head"])
    assert got == ["input", "blocks.1", "blocks.0", "blocks.2", "head"]
    assert len(got) == len(set(got))


@pytest.mark.parametrize("typo", ["blocks.O", "blcks.0"])
def test_typo_suggests_close_match(typo):
    m = resmlp()
    with pytest.raises(LayerError) as err:
        resolve_layers(m, ["input", typo])
    assert "'blocks.0'" in str(err.value)
    assert typo in str(err.value)


def test_get_module_typo_suggests():
    m = resmlp()
    with pytest.raises(LayerError, match="'blocks.0'"):
        get_module(m, "blocks.O")
    assert get_module(m, "blocks.1") is m.blocks[1]


def test_glob_matching_nothing_is_error():
    with pytest.raises(LayerError, match="matches no layer"):
        resolve_layers(resmlp(), ["layers.*", "head"])


def test_fewer_than_two_layers_is_error():
    m = resmlp()
    with pytest.raises(LayerError, match="at least two"):
        resolve_layers(m, ["input"])
    with pytest.raises(LayerError, match="at least two"):
        resolve_layers(m, "head")
    with pytest.raises(LayerError, match="at least two"):
        resolve_layers(m, ["head", m.head])  # duplicates collapse to one


def test_foreign_module_is_error():
    m = resmlp()
    with pytest.raises(LayerError, match="not a submodule"):
        resolve_layers(m, ["input", nn.Linear(6, 6)])
    with pytest.raises(TypeError):
        resolve_layers(m, ["input", 3])


def test_data_parallel_is_unwrapped():
    m = resmlp()
    dp = nn.DataParallel(m)
    assert unwrap_model(dp) is m
    assert unwrap_model(nn.DataParallel(dp)) is m
    assert unwrap_model(m) is m
    probe = KoopmanProbe(dp, ["input", "blocks.*", "head"], **TINY)
    assert probe.layers == ["input", "blocks.0", "blocks.1", "blocks.2", "head"]
    assert get_module(dp, "blocks.1") is m.blocks[1]


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


# ----------------------------------------------------------------------------- output selection

Pair = namedtuple("Pair", ["hidden", "aux"])


@dataclasses.dataclass
class DataOut:
    aux: str
    hidden: torch.Tensor
    extra: torch.Tensor


def structures(t: torch.Tensor, other: torch.Tensor) -> dict[str, object]:
    return {
        "tuple": (t, "aux", other),
        "list": [t, other],
        "dict": {"aux": "meta", "hidden": t, "other": other},
        "ordereddict": OrderedDict(aux=None, hidden=t, other=other),
        "namedtuple": Pair(t, other),
        "dataclass": DataOut("meta", t, other),
        "nested": (("meta", t), other),
    }


@pytest.mark.parametrize("kind", list(structures(torch.zeros(1), torch.zeros(1))))
def test_default_select_is_first_tensor_and_replace_keeps_structure(kind):
    t, other = torch.randn(3, 2), torch.randn(3, 5)
    out = structures(t, other)[kind]
    sel = OutputSelector(None, "lay")
    assert sel.get(out) is t
    new = torch.randn(3, 2)
    replaced = sel.replace(out, new)
    assert type(replaced) is type(out)
    assert sel.get(replaced) is new
    # everything else is untouched, and the original is not modified
    assert sel.get(out) is t
    if kind == "nested":
        assert replaced[1] is other and replaced[0][0] == "meta"
    elif kind in ("dict", "ordereddict"):
        assert replaced["other"] is other and replaced["aux"] == out["aux"]
        assert list(replaced) == list(out)
    elif kind == "dataclass":
        assert replaced.extra is other and replaced.aux == "meta"
    else:
        assert replaced[-1] is other
        assert len(replaced) == len(out)


def test_tensor_output_replace_returns_new():
    t = torch.randn(2, 3)
    sel = OutputSelector(None, "lay")
    assert sel.get(t) is t
    new = torch.ones(2, 3)
    assert sel.replace(t, new) is new


def test_index_and_key_select():
    t, other = torch.randn(3, 2), torch.randn(3, 5)
    s = structures(t, other)
    assert OutputSelector(2, "l").get(s["tuple"]) is other
    assert OutputSelector("other", "l").get(s["dict"]) is other
    assert OutputSelector("aux", "l").get(s["namedtuple"]) is other
    assert OutputSelector(1, "l").get(s["namedtuple"]) is other
    assert OutputSelector("extra", "l").get(s["dataclass"]) is other
    new = torch.randn(3, 5)
    r = OutputSelector(2, "l").replace(s["tuple"], new)
    assert type(r) is tuple and r[0] is t and r[1] == "aux" and r[2] is new
    r = OutputSelector("other", "l").replace(s["dict"], new)
    assert r["hidden"] is t and r["other"] is new and s["dict"]["other"] is other
    r = OutputSelector("aux", "l").replace(s["namedtuple"], new)
    assert isinstance(r, Pair) and r.hidden is t and r.aux is new
    r = OutputSelector(1, "l").replace(s["namedtuple"], new)
    assert isinstance(r, Pair) and r.hidden is t and r.aux is new
    r = OutputSelector("extra", "l").replace(s["dataclass"], new)
    assert isinstance(r, DataOut) and r.hidden is t and r.extra is new and r.aux == "meta"


def test_select_errors_name_the_layer():
    t = torch.randn(2, 2)
    with pytest.raises(LayerError, match="'mylayer'"):
        OutputSelector(None, "mylayer").get(("text", 3, {"a": None}))
    with pytest.raises(LayerError, match="'mylayer'"):
        OutputSelector(None, "mylayer").replace(("text", 3), t)
    with pytest.raises(LayerError, match="'mylayer'"):
        OutputSelector("missing", "mylayer").get({"hidden": t})
    with pytest.raises(LayerError, match="'mylayer'"):
        OutputSelector(5, "mylayer").get((t,))
    with pytest.raises(LayerError, match="not a tensor"):
        OutputSelector(1, "mylayer").get((t, "aux"))
    with pytest.raises(TypeError):
        OutputSelector(1.5, "mylayer")


def test_callable_select_reads_but_is_not_writable():
    t, other = torch.randn(3, 2), torch.randn(3, 5)
    sel = OutputSelector(lambda o: o["other"] * 2, "lay")
    out = {"hidden": t, "other": other}
    torch.testing.assert_close(sel.get(out), other * 2)
    assert not sel.writable
    assert OutputSelector(0, "x").writable and OutputSelector(None, "x").writable
    with pytest.raises(LayerError, match="callable"):
        sel.replace(out, t)
    assert sel.describe() is None
    assert OutputSelector("other", "x").describe() == "other"


def test_patching_callable_select_raises():
    m = resmlp()
    with pytest.raises(LayerError, match="callable"):
        PatchedModel(m, nn.Identity(), "input", "head", OutputSelector(None, "input"), OutputSelector(lambda o: o, "head"))


def test_make_selectors():
    layers = ["a", "b", "c"]
    sels = make_selectors(layers, {"b": 1})
    assert [sels[n].select for n in layers] == [None, 1, None]
    assert [s.layer for s in sels.values()] == layers
    assert [s.select for s in make_selectors(layers, [0, "k", None]).values()] == [0, "k", None]
    with pytest.raises(LayerError, match="not probed"):
        make_selectors(layers, {"z": 0})
    with pytest.raises(ValueError):
        make_selectors(layers, [0, 1])


# ----------------------------------------------------------------------------- structured models


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


@pytest.mark.parametrize("kind", ["tuple", "dict", "namedtuple", "dataclass"])
def test_probe_on_structured_outputs_fits_and_patches(kind):
    torch.manual_seed(0)
    m = StructModel(kind)
    probe = KoopmanProbe(m, ["blocks.*"], **TINY).fit(loader(), epochs=1)
    assert probe.layers == ["blocks.0", "blocks.1", "blocks.2"]
    assert len(probe.history) == 1
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


# ----------------------------------------------------------------------------- order checks


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


# ----------------------------------------------------------------------------- cleanup after errors


class MaybeNaN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.make_nan = False

    def forward(self, x):
        return torch.sqrt(x) if self.make_nan else torch.relu(x)


class CleanupNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input = nn.Linear(4, 6)
        self.norm = nn.BatchNorm1d(6)
        self.mid = MaybeNaN()
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(self.drop(self.mid(self.norm(self.input(x)))))


class FailingLoader:
    """Yields batches from ``inner`` and raises RuntimeError after ``after`` batches in total."""

    def __init__(self, inner, after: int) -> None:
        self.inner, self.after, self.count = inner, after, 0

    def __iter__(self):
        for batch in self.inner:
            if self.count == self.after:
                raise RuntimeError("loader broke")
            self.count += 1
            yield batch


@pytest.mark.parametrize("failure", ["loader_adapters", "loader_training", "nan"])
def test_model_restored_after_exception_in_fit(failure):
    torch.manual_seed(0)
    m = CleanupNet()
    with torch.no_grad():
        m.norm.running_mean.uniform_(-1, 1)
    m.train()
    m.norm.eval()  # a mixed state
    calls = []
    user_handle = m.mid.register_forward_hook(lambda mod, args, out: calls.append(out.shape))
    modes = {name: mod.training for name, mod in m.named_modules()}
    hooks = {name: dict(mod._forward_hooks) for name, mod in m.named_modules()}
    pre_hooks = {name: dict(mod._forward_pre_hooks) for name, mod in m.named_modules()}
    state = {k: v.clone() for k, v in m.state_dict().items()}

    data = loader(n=48, batch_size=16)  # 3 batches per pass
    probe = KoopmanProbe(m, ["input", "mid", "out"], **TINY)
    if failure == "nan":
        m.mid.make_nan = True
        with pytest.raises(ValueError, match="'mid'") as err:
            probe.fit(data, epochs=2)
        assert "non-finite" in str(err.value)
        m.mid.make_nan = False
    else:
        after = 2 if failure == "loader_adapters" else 5
        with pytest.raises(RuntimeError, match="loader broke"):
            probe.fit(FailingLoader(data, after), epochs=2)
        if failure == "loader_training":
            assert probe.autoencoder is not None  # it failed mid-training, not before

    assert {name: dict(mod._forward_hooks) for name, mod in m.named_modules()} == hooks
    assert {name: dict(mod._forward_pre_hooks) for name, mod in m.named_modules()} == pre_hooks
    assert {name: mod.training for name, mod in m.named_modules()} == modes
    assert m.training and not m.norm.training and m.drop.training
    after_state = m.state_dict()
    assert after_state.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after_state[key], value), key
    assert all(p.grad is None for p in m.parameters())
    # the user's hook is still registered and still fires
    n = len(calls)
    m.eval()
    m(torch.randn(2, 4))
    assert len(calls) == n + 1 and calls[-1] == (2, 6)
    user_handle.remove()
    assert all(not mod._forward_hooks for mod in m.modules())


def test_successful_fit_also_restores_model():
    torch.manual_seed(0)
    m = resmlp(batch_norm=True)
    m.train()
    m.blocks[1].eval()
    modes = {name: mod.training for name, mod in m.named_modules()}
    state = {k: v.clone() for k, v in m.state_dict().items()}
    KoopmanProbe(m, ["input", "blocks.*"], **TINY).fit(loader(), epochs=1)
    assert {name: mod.training for name, mod in m.named_modules()} == modes
    assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
    assert all(p.grad is None for p in m.parameters())
    assert all(not mod._forward_hooks for mod in m.modules())
