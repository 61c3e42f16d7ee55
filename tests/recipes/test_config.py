"""Tests of koopman_hooks/recipes/config.py: one schema, checked before any work is done."""

from __future__ import annotations

import json

import pytest

from koopman_hooks.cli import main
from koopman_hooks.errors import ConfigError, LayerError
from koopman_hooks.recipes import check_recipe, load_recipe
from koopman_hooks.recipes.config import packaged_names, parse_recipe, read_recipe
from koopman_hooks.recipes.summary import get_path


def test_packaged_recipes_load_by_name_and_pass_every_check():
    assert {"yinyang", "mnist", "mnist_resnet18", "mnist_vit"} <= set(packaged_names())
    for name in packaged_names():
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.probe is not None
        check_recipe(recipe)  # layers and options checked on an untrained model of the recipe's kind


def test_overrides_apply_and_keep_their_types():
    recipe = load_recipe("yinyang", ["probe.epochs=3", "train.lr=0.5", "unlearning.classes=[2]", "probe.samples=500"])
    assert recipe.probe is not None and recipe.probe.epochs == 3 and recipe.probe.samples == 500
    assert "samples" not in recipe.probe.options  # the runner's, not a KoopmanProbe option
    assert recipe.train.lr == 0.5 and recipe.unlearning is not None and recipe.unlearning.classes == (2,)
    with pytest.raises(ConfigError, match="not of the form"):
        load_recipe("yinyang", ["probe.epochs"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("topolgy.n_points=5", r"unknown section or key 'topolgy'; did you mean 'topology'"),
        ("train.epochss=1", r"unknown key 'train.epochss'; did you mean 'epochs'"),
        ("probe.latent_dimm=8", r"unknown key 'probe.latent_dimm'; did you mean 'latent_dim'"),
        ("probe.epochs='three'", r"probe.epochs: expected int \| None, got 'three' \(str\)"),
        ("probe.samples=0", r"probe.samples must be >= 1"),
        ("train.lr='fast'", r"train.lr: expected float, got 'fast'"),
        ("data.dataset='cifar'", r"data.dataset: expected 'yinyang' \| 'mnist' \| 'tokens', got 'cifar'"),
        ("model.kind='resnet'", r"model.kind: unknown model kind 'resnet'"),
        ("model.widht=3", r"unknown key 'model.widht'; did you mean 'width'"),
        ("unlearning.methods=['endpoint','magic']", r"unlearning.methods\[1\]: expected"),
        ("unlearning.options={'strenght': 2.0}", r"unknown key 'unlearning.options.strenght'; did you mean 'strength'"),
        ("topology.metric='cosine'", r"topology.metric: expected 'euclidean' \| 'knn'"),
        ("targets={'surrogate.agreement': 'about 0.9'}", r"target 'surrogate.agreement'"),
        ("train.shift=-1", r"train.shift must be >= 0"),
        ("train.shift=2", r"train.shift translates images: it needs unflattened image data, not 'yinyang'"),
    ],
)
def test_mistakes_are_named_before_any_work(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("yinyang", [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("probe.latent_dim='eight'", r"probe.latent_dim: expected int \| None, got 'eight'"),
        ("probe.latent_dim=0", r"probe.latent_dim must be a positive int"),
        ("probe.layers=['blocks.0','blocks.9']", r"no layer named 'blocks.9'.*did you mean"),
        ("probe.operator='sparse'", r"probe.operator: expected 'dense' \| 'exp' \| 'lowrank'"),
        ("probe.loss_weights={'stat': 1.0}", r"unknown key 'loss_weights.stat'.*did you mean 'state'"),
    ],
)
def test_probe_options_are_checked_on_an_untrained_model(override, message):
    recipe = load_recipe("yinyang", [override])  # the schema is syntactic ...
    with pytest.raises((ConfigError, ValueError), match=message):
        check_recipe(recipe)  # ... the probe's own checks need the model's layers


def test_missing_sections_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match=r"no \[model\] section"):
        parse_recipe({"data": {"dataset": "yinyang"}})
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\ndataset = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_recipe(bad)
    with pytest.raises(FileNotFoundError, match="packaged recipes: .*yinyang"):
        read_recipe("no_such_recipe")


def test_cli_errors_are_one_line_with_status_2(tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    cases = [
        ["run", "no_such_recipe", "--quiet"],
        ["run", "yinyang", "--set", "train.epochss=1", "--quiet"],
        ["run", "yinyang", "--set", "topolgy.n_points=3", "--quiet"],
        ["run", "yinyang", "--set", "probe.latent_dim='eight'", "--quiet"],
        ["run", "yinyang", "--set", "probe.layers=['blocks.0','nope']", "--quiet"],
        ["run", "yinyang", "--out", str(a_file), "--quiet"],
        ["validate", "yinyang", "--set", "probe.latent_dimm=8"],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("koopman-hooks: "), (argv, err)
    assert a_file.read_text() == "x"  # nothing was written


def test_cli_validate_prints_the_resolved_recipe(capsys):
    assert main(["validate", "yinyang", "--set", "probe.epochs=7"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["probe"]["epochs"] == 7 and resolved["model"]["kind"] == "resmlp"
    assert resolved["train"]["weight_decay"] == 0.0  # defaults filled in


def test_target_paths_reach_keys_that_contain_dots():
    report = {"surrogate": {"state_fvu_per_layer": {"blocks.1": 0.25, "blocks.10": 0.5}, "agreement": 0.9}}
    assert get_path(report, "surrogate.state_fvu_per_layer.blocks.1") == 0.25
    assert get_path(report, "surrogate.state_fvu_per_layer.blocks.10") == 0.5
    assert get_path(report, "surrogate.agreement") == 0.9
    assert get_path(report, "surrogate.missing") is None


def test_token_recipes_pair_text_models_with_the_token_task():
    pytest.importorskip("transformers")
    assert {"tokens_bert", "tokens_gpt2"} <= set(packaged_names())
    recipe = load_recipe("tokens_gpt2")
    assert recipe.data.dataset == "tokens" and recipe.model.kind == "hf_gpt2"
    assert recipe.probe is not None and recipe.probe.options == {"label_key": "labels"}  # defaults only
    with pytest.raises(ConfigError, match="cannot read data.dataset 'yinyang'"):
        load_recipe("tokens_bert", ["data.dataset='yinyang'"])
    with pytest.raises(ConfigError, match="cannot read data.dataset 'tokens'"):
        load_recipe("yinyang", ["data.dataset='tokens'"])
    with pytest.raises(ConfigError, match=r"model.vocab_size \(8\) is smaller"):
        load_recipe("tokens_bert", ["model.vocab_size=8"])
    with pytest.raises(ConfigError, match="max_positions"):
        load_recipe("tokens_bert", ["data.max_length=80"])
    with pytest.raises(LayerError, match="report.pca_layers: no layer named 'transformer.h.9'"):
        check_recipe(load_recipe("tokens_gpt2", ["report.pca_layers=['transformer.h.9']"]))


@pytest.mark.parametrize("name, accuracy", [("mnist_resnet18", 0.99), ("mnist_vit", 0.985)])
def test_vision_recipes_are_as_complete_as_mnist(name, accuracy):
    """Issue 15: the whole MNIST training and test sets, every baseline, the Koopman edit on every
    class, MNIST's unlearning targets, and per-layer FVU and topology targets, with the probe's
    default loss settings."""
    from koopman_hooks.core.layers import resolve_layers
    from koopman_hooks.recipes.builders import model_factory

    recipe, mnist = load_recipe(name), load_recipe("mnist")
    assert recipe.data.train_size is None and recipe.data.test_size == 10000
    assert recipe.unlearning is not None and mnist.unlearning is not None and recipe.unlearning.classes == "all"
    assert set(recipe.unlearning.baselines) == set(mnist.unlearning.baselines)
    assert recipe.probe is not None and not any("weight" in key for key in recipe.probe.options)
    unlearning = {k: v for k, v in mnist.targets.items() if k.startswith("unlearning.")}
    assert unlearning.items() <= recipe.targets.items()
    layers = resolve_layers(model_factory(recipe.model, 10)(), list(recipe.probe.layers), minimum=2)
    for layer in layers[1:]:  # FVU is measured where the surrogate predicts: every layer but the first
        for figure in ("state_fvu_per_layer", "latent_fvu_per_layer"):
            assert recipe.targets[f"surrogate.{figure}.{layer}"] == "<= 0.1"
    assert recipe.targets["model.test_accuracy"] == f">= {accuracy}" and recipe.targets["seconds"] == "<= 2400"
    for key in ("spearman_network", "spearman_surrogate"):
        assert recipe.targets[f"topology.{key}"] == "<= -0.9"
    for key in ("start_betti0_relative_error", "final_betti0_relative_error"):
        assert recipe.targets[f"topology.{key}"] == "<= 0.1"
