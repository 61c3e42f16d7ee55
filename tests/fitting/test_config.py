"""Tests of koopman_hooks/fitting/config.py: validation once, and a save/load round trip of every field."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from koopman_hooks import ConfigError, KoopmanProbe, LossWeights, ProbeConfig
from koopman_hooks.data import YinYangDataset
from koopman_hooks.models import ResMLP

NON_DEFAULT = dict(
    latent_dim=6, steps=[2, 3], width=5, variance=0.9, max_width=7, reduce=["flatten", None, "flatten"],
    operator="lowrank", rank=3, operator_fit="gradient", hidden=(9,), output_temperature=2.5, lr=2e-3, weight_decay=1e-4, ridge=1e-5,
    batch_size=16, patience=3, val_fraction=0.25, cache_mb=0.001, replay_mb=64.0, amp="bf16", train_amp="bf16", input_key=None,
    label_key="y", ignore_keys=("meta",), mask_key="mask",
    seed=7, loss_weights={"reconstruction": 0.5, "state": 2.0, "latent": 0.3, "isometry": 0.1, "topological": 0.0,
                          "output": 0.0},
)


def test_every_setting_round_trips_through_save_and_load(tmp_path):
    model = ResMLP(4, 3, width=6, depth=2)
    probe = KoopmanProbe(model, ["input", "blocks.0", "blocks.1"], verbose=False, **NON_DEFAULT)
    defaults = ProbeConfig(layers=probe.config.layers)
    changed = [f.name for f in dataclasses.fields(ProbeConfig) if getattr(probe.config, f.name) != getattr(defaults, f.name)]
    # every option but the derived select fields and operator_fit ("ridge" needs a dense one-step K) differs
    assert set(changed) >= {f.name for f in dataclasses.fields(ProbeConfig)} - {"layers", "select", "callable_select", "operator_fit",
                                                                                  "input_key"}
    data = YinYangDataset(64, seed=0)
    batches = [{"x": data.inputs[a : a + 32], "y": data.targets[a : a + 32], "meta": torch.zeros(32)} for a in (0, 32)]

    class DictModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    wrapped = DictModel()
    probe = KoopmanProbe(wrapped, ["inner.input", "inner.blocks.0", "inner.blocks.1"], verbose=False, **NON_DEFAULT)
    probe.fit(batches, epochs=1)
    path = tmp_path / "probe.safetensors"
    probe.save(path)
    loaded = KoopmanProbe.load(path, wrapped)
    for field in dataclasses.fields(ProbeConfig):
        assert getattr(loaded.config, field.name) == getattr(probe.config, field.name), field.name
    assert loaded.config == probe.config


@pytest.mark.parametrize(
    "options, message",
    [
        ({"latent_dim": 0}, "latent_dim must be a positive int"),
        ({"latent_dim": -4}, "latent_dim must be a positive int"),
        ({"latent_dim": "8"}, r"latent_dim: expected int \| None, got '8' \(str\)"),
        ({"latent_dim": 8.0}, "latent_dim: expected int"),
        ({"latent_dim": 4, "width": 6}, "latent_dim .4. must be at least width .6."),
        ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
        ({"batch_size": 0}, "batch_size must be a positive int or None"),
        ({"steps": [1, 2]}, "steps needs 1 positive entries"),
        ({"steps": 0}, "steps needs 1 positive"),
        ({"variance": 1.5}, r"variance must be in \(0, 1\]"),
        ({"operator": "sparse"}, "operator: expected 'dense' | 'exp' | 'lowrank'"),
        ({"rank": 40, "latent_dim": 8, "operator": "lowrank"}, "rank must be in 1..latent_dim"),
        ({"hidden": (0,)}, "hidden widths must be positive"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"output_temperature": 0.0}, "output_temperature must be positive"),
        ({"reduce": "pool:axb"}, "pool size must be HxW"),
        ({"loss_weights": {"stat": 1.0}}, r"unknown key 'loss_weights.stat'; did you mean 'state'"),
        ({"loss_weights": {"state": -1.0}}, "loss_weights must be >= 0"),
        ({"operator_fit": "ridge"}, "operator_fit='ridge' needs operator='dense'"),
        ({"ignore_keys": "meta"}, "ignore_keys: expected list of str"),
        ({"lr": float("nan")}, r"options must be finite numbers, got \{'lr': nan\}"),
        ({"ridge": float("inf")}, "options must be finite numbers, got .'ridge': inf"),
        ({"replay_mb": float("nan")}, "options must be finite numbers, got .'replay_mb'"),
        ({"loss_weights": {"state": float("nan")}}, "options must be finite numbers, got .'loss_weights.state'"),
        ({"steps": [20_000]}, "at most 10000 in all"),
    ],
)
def test_bad_options_are_refused_naming_the_option(options, message):
    with pytest.raises(ConfigError, match=message):
        KoopmanProbe(ResMLP(4, 3, width=6, depth=2), ["blocks.0", "blocks.1"], **options)


def test_config_from_corrupt_data_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown key 'config.latent'"):
        ProbeConfig.from_dict({"layers": ["a", "b"], "latent": 3})
    with pytest.raises(ConfigError, match="config.latent_dim: expected int"):
        ProbeConfig.from_dict({"layers": ["a", "b"], "latent_dim": "8"})
    assert ProbeConfig.from_dict(ProbeConfig(layers=("a", "b")).to_dict()) == ProbeConfig(layers=("a", "b"))
    assert LossWeights(state=2) == LossWeights(state=2.0)
