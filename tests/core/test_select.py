"""Tests of koopman_hooks/core/select.py."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple

import pytest
import torch

from koopman_hooks import LayerError
from koopman_hooks.core.select import OutputSelector, make_selectors

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
    with pytest.raises(LayerError, match="must be None, an int"):
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


