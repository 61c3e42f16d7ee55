"""Tests of koopman_hooks/core/layers.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from koopman_hooks import KoopmanProbe, LayerError
from koopman_hooks.core.layers import get_module, resolve_layers, unwrap_model
from koopman_hooks.models import ResMLP

TINY = dict(latent_dim=6, steps=1, hidden=(8,), width=4, verbose=False)


def resmlp(depth: int = 3, batch_norm: bool = False) -> ResMLP:
    torch.manual_seed(0)
    return ResMLP(4, 3, width=6, depth=depth, batch_norm=batch_norm)



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
    # a layer named twice (directly, by a pattern, or as a module object) is a mistake, not merged
    for twice in (["input", "head", "head"], ["input", "blocks.1", "blocks.*"], ["blocks.0", m.blocks[0], "head"]):
        with pytest.raises(LayerError, match="more than once"):
            resolve_layers(m, twice)



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
    with pytest.raises(LayerError, match="more than once"):
        resolve_layers(m, ["head", m.head])  # a duplicate is refused, not collapsed



def test_foreign_module_is_error():
    m = resmlp()
    with pytest.raises(LayerError, match="not a submodule"):
        resolve_layers(m, ["input", nn.Linear(6, 6)])
    with pytest.raises(LayerError, match="got int"):
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


