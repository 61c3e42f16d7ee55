"""Reliability: every bad input is refused clearly, recipes are checked before any work, and a
failed fit leaves nothing half-made.

One test (or parametrized test) per case of the reliability issue, numbered as there, each
followed by its neighbours: the same mistake at the other entry points.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import koopman_hooks.fitting.epochs as epochs_module
import koopman_hooks.recipes.runner as runner_module
from koopman_hooks import (
    ConfigError,
    FittedProbe,
    IncompatibleFileError,
    KoopmanProbe,
    KoopmanSurrogate,
    LayerError,
    NotFittedError,
    ProbeConfig,
    ShapeError,
)
from koopman_hooks.cli import main
from koopman_hooks.data import TensorLoader
from koopman_hooks.errors import EmptyLoaderError
from koopman_hooks.models import ResMLP
from koopman_hooks.recipes import check_recipe, load_recipe

TINY: dict[str, Any] = dict(latent_dim=6, steps=1, hidden=(8,), width=4, verbose=False)


def resmlp(width: int = 6) -> ResMLP:
    torch.manual_seed(0)
    return ResMLP(4, 3, width=width, depth=3)


def vectors(n: int = 64, labels: bool = True, seed: int = 0, low: int = 0, high: int = 3) -> TensorLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    if not labels:
        return TensorLoader(x, batch_size=32)
    return TensorLoader(x, torch.randint(low, high, (n,), generator=g), batch_size=32)


class ConvNet(nn.Module):
    """1x8x8 images, three conv stages (4x8x8, 8x4x4, 8x4x4), then a head: flatten + linear,
    which fails on any other image size, or global average pooling, which takes any size."""

    def __init__(self, head: str = "flatten") -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        if head == "flatten":
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 4 * 4, 3))
        else:
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage2(self.stage1(self.stem(x))))


def images(size: int, n: int = 64, seed: int = 0) -> TensorLoader:
    g = torch.Generator().manual_seed(seed)
    return TensorLoader(torch.randn(n, 1, size, size, generator=g), torch.arange(n) % 3, batch_size=32)


class Boom(RuntimeError):
    pass


def fail_second_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second gradient step of the next fit raises: in epoch 1, after one step has already
    changed the autoencoder's weights."""
    original = epochs_module.koopman_losses
    calls = {"n": 0}

    def losses(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise Boom("failed in epoch 1")
        return original(*args, **kwargs)

    monkeypatch.setattr(epochs_module, "koopman_losses", losses)


def assert_cli_refuses(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The command exits with status 2 and one line ``koopman-hooks: ...`` containing ``message``."""
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("koopman-hooks: "), (argv, err)
    assert message in err[0], (message, err[0])


@pytest.fixture()
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training a recipe's model fails the test: mistakes must be reported before it."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was trained before the mistake was reported")

    monkeypatch.setattr(runner_module, "train_classifier", refuse)


@pytest.fixture(scope="module")
def fitted() -> KoopmanProbe:
    probe = KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], **TINY)
    return probe.fit(vectors(), epochs=2)


@pytest.fixture()
def fitted_copy() -> KoopmanProbe:
    probe = KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], **TINY)
    return probe.fit(vectors(), epochs=1)


@pytest.fixture(scope="module", params=["flatten", "pool"])
def conv_probe(request: pytest.FixtureRequest) -> KoopmanProbe:
    torch.manual_seed(0)
    probe = KoopmanProbe(ConvNet(request.param), ["stem", "stage2"], latent_dim=8, steps=1, hidden=(8,), width=4,
                         reduce=["flatten", "pool:2x2"], verbose=False)
    return probe.fit(images(8), epochs=1)


def surrogate_outputs(probe: KoopmanProbe) -> torch.Tensor:
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    return probe.surrogate()(x)


# ---------------------------------------------------------------------------------------------
# 1. a fit that raises leaves the probe exactly as it was


def test_01_failed_first_fit_leaves_the_probe_unfitted(monkeypatch, tmp_path):
    probe = KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], **TINY)
    fail_second_step(monkeypatch)
    with pytest.raises(Boom):
        probe.fit(vectors(), epochs=3)
    assert not probe.is_fitted and probe.history == [] and probe.fit_seconds is None
    for use in (probe.surrogate, probe.fetch_model, probe.patch, probe.linear_baseline,
                lambda: probe.save(tmp_path / "p.safetensors"), lambda: probe.evaluate(vectors()),
                lambda: probe.unlearn(0, vectors()), lambda: probe.unlearning_statistics(vectors()),
                lambda: probe.topology(vectors()), lambda: probe.autoencoder, lambda: probe.adapters):
        with pytest.raises(NotFittedError):
            use()
    assert not (tmp_path / "p.safetensors").exists()


@pytest.mark.parametrize("failure", ["epoch", "loader", "options"])
def test_01_failed_second_fit_keeps_the_first(fitted_copy, failure, monkeypatch, tmp_path):
    probe = fitted_copy
    first = probe.fetch_model()
    before = surrogate_outputs(probe)
    history = [dict(h) for h in probe.history]
    if failure == "epoch":
        fail_second_step(monkeypatch)
        with pytest.raises(Boom):
            probe.fit(vectors(seed=5), epochs=3)
    elif failure == "loader":
        def broken():
            yield next(iter(vectors(seed=5)))
            raise Boom("loader broke")

        with pytest.raises(Boom):
            probe.fit(broken(), epochs=3)
    else:
        with pytest.raises(ConfigError, match="epochs"):
            probe.fit(vectors(), epochs=0)
    assert probe.fetch_model() is first and probe.history == history
    assert torch.equal(surrogate_outputs(probe), before)
    probe.save(tmp_path / "p.safetensors")
    loaded = KoopmanProbe.load(tmp_path / "p.safetensors", probe.model, verbose=False)
    assert torch.allclose(surrogate_outputs(loaded), before)


# ---------------------------------------------------------------------------------------------
# 2. a layer named twice is refused, never silently de-duplicated


@pytest.mark.parametrize(
    "layers",
    [["blocks.0", "blocks.1", "blocks.0"], ["blocks.*", "blocks.1"], ["blocks.0", "blocks.**"], "module and name"],
)
def test_02_duplicate_layers_are_refused(layers):
    model = resmlp()
    if layers == "module and name":
        layers = [model.blocks[0], "blocks.0", "blocks.2"]
    with pytest.raises(LayerError, match=r"'blocks\.\d' is named more than once"):
        KoopmanProbe(model, layers, verbose=False)


def test_02_duplicate_layers_at_other_entry_points(fitted, capsys):
    with pytest.raises(ConfigError, match=r"\['blocks.0'\] more than once"):
        ProbeConfig(layers=("blocks.0", "blocks.1", "blocks.0"))
    with pytest.raises(ConfigError, match="more than once"):
        ProbeConfig.from_dict({"layers": ["blocks.0", "blocks.0"]})
    with pytest.raises(LayerError, match="more than once"):
        fitted.topology(vectors(), n_points=32, layers=["blocks.0", "blocks.0"])
    override = "probe.layers=['blocks.0','blocks.1','blocks.0']"
    with pytest.raises(LayerError, match="more than once"):
        check_recipe(load_recipe("yinyang", [override]))
    assert_cli_refuses(["validate", "yinyang", "--set", override], "more than once", capsys)


# ---------------------------------------------------------------------------------------------
# 3. inputs of another shape: a ShapeError naming the layer, the expected and the received shape

SHAPE_MESSAGE = r"'stem'.*\(4, 6, 6\).*\(4, 8, 8\)"


SMALL = images(6)  # 1x6x6 images: the stem gives (4, 6, 6) where the probe was fitted on (4, 8, 8)
X_SMALL = next(iter(SMALL))[0]
STEM_SMALL = torch.randn(2, 4, 6, 6)


def fast_path(probe: KoopmanProbe) -> None:
    patched = probe.patch()
    training = probe.model.training
    probe.model.eval()  # the fast path runs in eval mode only
    try:
        patched(next(iter(images(8)))[0])  # calibrated on good inputs: stage1 is skipped from now on
        assert patched.path == "fast" and patched.skipped_modules == ["stage1"], patched
        patched(X_SMALL)
    finally:
        probe.model.train(training)


ENTRY_POINTS: dict[str, Callable[[KoopmanProbe], Any]] = {
    "evaluate": lambda probe: probe.evaluate(SMALL),
    "surrogate": lambda probe: probe.surrogate()(STEM_SMALL),
    "surrogate.encode": lambda probe: probe.surrogate().encode(STEM_SMALL),
    "linear_baseline": lambda probe: probe.linear_baseline()(STEM_SMALL),
    "edited surrogate": lambda probe: probe.surrogate().edited(readout=torch.eye(9))(STEM_SMALL),
    "patch before calibration": lambda probe: probe.patch()(X_SMALL),
    "patch fast path": fast_path,
    "patch full path": lambda probe: probe.patch(fast=False)(X_SMALL),
    "patch mixed": lambda probe: probe.patch(strict=False)(X_SMALL),
    "unlearn": lambda probe: probe.unlearn(0, SMALL, refine=0),
    "unlearning_statistics": lambda probe: probe.unlearning_statistics(SMALL),
    "topology": lambda probe: probe.topology(SMALL, n_points=32),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_03_inputs_of_another_shape_name_the_layer(conv_probe, entry):
    with pytest.raises(ShapeError, match=SHAPE_MESSAGE), warnings.catch_warnings():
        # a mixed patch may warn that its figures are a diagnostic (tested elsewhere); not the point here
        warnings.filterwarnings("ignore", message=r"patch\(strict=False\)")
        ENTRY_POINTS[entry](conv_probe)


def test_03_right_shapes_still_work_and_dst_mismatch_is_named(conv_probe, tmp_path):
    surrogate = conv_probe.surrogate()
    x = torch.randn(3, 4, 8, 8)
    assert surrogate(x).shape == (3, 8, 4, 4)
    with pytest.raises(ShapeError, match=r"'stage2'.*\(8, 3, 3\).*\(8, 4, 4\)"):
        surrogate(x, like=torch.randn(3, 8, 3, 3))  # the real output handed to a lossy decoder
    surrogate.save(tmp_path / "s.safetensors")
    loaded = KoopmanSurrogate.load(tmp_path / "s.safetensors")
    with pytest.raises(ShapeError, match=SHAPE_MESSAGE):
        loaded(torch.randn(2, 4, 6, 6))
    metrics = conv_probe.evaluate(images(8, seed=3))  # the right shape passes every check
    assert metrics["n_samples"] == 64


class FixedPrediction(nn.Module):
    """A surrogate of one's own: always predicts stage2's fitted shape (8, 4, 4)."""

    def forward(self, x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros(len(x), 8, 4, 4)


def test_03_a_surrogate_of_ones_own_must_fit_the_layer_it_replaces(conv_probe):
    patched = conv_probe.patch(FixedPrediction(), src="stem", dst="stage2")
    assert patched(next(iter(images(8)))[0]).shape == (32, 3)
    # the prediction's shape first, then the layer's own (the message had them the other way round)
    with pytest.raises(ShapeError, match=r"prediction of layer 'stage2' has shape \(32, 8, 4, 4\), the layer's own "
                                         r"output \(32, 8, 3, 3\)"):
        conv_probe.patch(FixedPrediction(), src="stem", dst="stage2", fast=False)(next(iter(images(6)))[0])


# ---------------------------------------------------------------------------------------------
# 4. labels outside the model's classes


@pytest.mark.parametrize("label", [7, -1])
@pytest.mark.parametrize("entry", ["unlearn", "unlearning_statistics", "evaluate"])
def test_04_labels_outside_the_classes_are_refused(fitted, entry, label):
    loader = vectors(low=label, high=label + 1)
    calls = {
        "unlearn": lambda: fitted.unlearn(0, loader, refine=0),
        "unlearning_statistics": lambda: fitted.unlearning_statistics(loader),
        "evaluate": lambda: fitted.evaluate(loader),
    }
    with pytest.raises(ValueError, match=rf"label {label} is out of range.*3 classes"):
        calls[entry]()


def test_04_forget_classes_outside_the_classes_are_refused(fitted, capsys):
    with pytest.raises(ValueError, match="forget class 7 is out of range"):
        fitted.unlearn(7, vectors(), refine=0)
    with pytest.raises(ValueError, match="negative"):
        fitted.unlearn(-1, vectors(), refine=0)
    with pytest.raises(ValueError, match="forget class 7 is out of range"):
        fitted.unlearn(7, fitted.unlearning_statistics(vectors()), refine=0)
    for override in ("unlearning.classes=[0, 7]", "unlearning.baseline_classes=[-1]"):
        with pytest.raises(ConfigError, match=r"unlearning\.(baseline_)?classes.*3 classes"):
            check_recipe(load_recipe("yinyang", [override]))
        assert_cli_refuses(["validate", "yinyang", "--set", override], "3 classes", capsys)


# ---------------------------------------------------------------------------------------------
# 5. latent_dim (and every other size) checked when the probe is built, naming the option


@pytest.mark.parametrize(
    "options, message",
    [
        ({"latent_dim": 0}, r"latent_dim must be a positive int"),
        ({"latent_dim": -4}, r"latent_dim must be a positive int"),
        ({"latent_dim": "8"}, r"latent_dim: expected int \| None, got '8' \(str\)"),
        ({"latent_dim": 8.0}, r"latent_dim: expected int \| None, got 8.0 \(float\)"),
        ({"latent_dim": True}, r"latent_dim: expected int \| None, got True \(bool\)"),
        ({"latent_dim": 4, "width": 6}, r"latent_dim \(4\) must be at least width \(6\)"),
        ({"width": 0}, r"width must be a positive int"),
        ({"steps": 0}, r"steps needs 1 positive entries"),
        ({"steps": [1, 1]}, r"steps needs 1 positive entries"),
        ({"hidden": [8, 0]}, r"hidden widths must be positive"),
        ({"batch_size": -1}, r"batch_size must be a positive int"),
        ({"patience": 0}, r"patience must be a positive int"),
        ({"rank": 0, "operator": "lowrank"}, r"rank must be in 1..latent_dim"),
        ({"lr": 0.0}, r"lr must be positive"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
        ({"variance": 0.0}, r"variance must be in \(0, 1\]"),
        ({"operator": "sparse"}, r"operator: expected 'dense' \| 'exp' \| 'lowrank'"),
        ({"loss_weights": {"stat": 1.0}}, r"unknown key 'loss_weights.stat'; did you mean 'state'"),
        ({"reduce": "pool:0x2"}, r"pool sizes must be positive"),
    ],
)
def test_05_options_checked_when_the_probe_is_built(options, message):
    with pytest.raises(ConfigError, match=message):
        KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], verbose=False, **options)


def test_05_latent_dim_at_other_entry_points(fitted, capsys):
    with pytest.raises(ConfigError, match="latent_dim must be a positive int"):
        ProbeConfig(layers=("a", "b"), latent_dim=0)
    with pytest.raises(ConfigError, match="latent_dim must be a positive int"):
        ProbeConfig.from_dict({"layers": ["a", "b"], "latent_dim": -4})
    with pytest.raises(ConfigError, match="latent_dim must be a positive int"):
        fitted.config.replace(latent_dim=0)
    with pytest.raises(ConfigError, match="epochs must be a positive int"):
        KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], **TINY).fit(vectors(), epochs=-1)
    for value in ("0", "-4"):
        assert_cli_refuses(["validate", "yinyang", "--set", f"probe.latent_dim={value}"],
                           "probe.latent_dim must be a positive int", capsys)


# ---------------------------------------------------------------------------------------------
# 6. a probe file loaded onto a model of other widths


@pytest.mark.parametrize("load", [KoopmanProbe.load, FittedProbe.load])
def test_06_load_refuses_a_model_of_other_widths(fitted, tmp_path, load):
    path = tmp_path / "p.safetensors"
    fitted.save(path)
    with pytest.raises(IncompatibleFileError, match=r"'blocks\.0'.*'linear\.weight'.*\(6, 6\).*\(8, 8\)"):
        load(path, resmlp(width=8))
    reloaded = load(path, resmlp())  # same architecture: loads
    assert reloaded.layers == fitted.layers


class Parameterless(nn.Module):
    """Probed layers without parameters (activations): their width is set by the linear layers."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.first = nn.Linear(4, width)
        self.act1 = nn.Tanh()
        self.second = nn.Linear(width, width)
        self.act2 = nn.Tanh()
        self.out = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act2(self.second(self.act1(self.first(x)))))


def test_06_a_mismatch_load_cannot_see_is_named_at_the_first_forward(tmp_path):
    torch.manual_seed(0)
    probe = KoopmanProbe(Parameterless(6), ["act1", "act2"], **TINY).fit(vectors(), epochs=1)
    probe.save(tmp_path / "p.safetensors")
    with pytest.warns(UserWarning, match="fitted on other weights"):  # Parameterless(8)'s embedding differs too
        other = KoopmanProbe.load(tmp_path / "p.safetensors", Parameterless(8), verbose=False)
    with pytest.raises(ShapeError, match=r"'act1'.*\(8,\).*\(6,\)"):
        other.patch()(torch.randn(3, 4))
    with pytest.raises(ShapeError, match=r"'act1'.*\(8,\).*\(6,\)"):
        other.evaluate(vectors())


# ---------------------------------------------------------------------------------------------
# 7. corrupt or mistyped metadata: IncompatibleFileError, never a raw TypeError


def rewrite_header(path: Path, change: Any) -> None:
    """Rewrite a koopman_hooks file's JSON header with ``change(config)`` (in place)."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    header = json.loads(meta["koopman_hooks"])
    header["config"] = change(header["config"])
    save_file(tensors, str(path), metadata={"koopman_hooks": json.dumps(header)})


def _set(path: str, value: Any):
    def change(config: dict[str, Any]) -> dict[str, Any]:
        node = config
        parts = path.split(".")
        for part in parts[:-1]:
            node = node[part]
        if value is KeyError:
            del node[parts[-1]]
        else:
            node[parts[-1]] = value
        return config

    return change


PROBE_CORRUPTIONS = {
    "config is a list": _set("config", [1, 2]),
    "latent_dim is a string": _set("config.latent_dim", "8"),
    "config misses layers": _set("config.layers", KeyError),
    "config has an unknown key": _set("config.colour", "blue"),
    "shapes is a string": _set("shapes", "abc"),
    "shapes has too few entries": _set("shapes", [[6]]),
    "a shape is negative": _set("shapes", [[-6], [6]]),
    "reduce is unknown": _set("reduce", ["flatten", "squash"]),
    "autoencoder width is a string": _set("autoencoder.width", "4"),
    "autoencoder width is wrong": _set("autoencoder.width", 5),
    "autoencoder is missing": _set("autoencoder", KeyError),
    "info is a list": _set("info", [1]),
    "history is a dict": _set("history", {"a": 1}),
    "fit_seconds is a string": _set("fit_seconds", "fast"),
    "parameter shapes are a string": _set("parameter_shapes", "abc"),
    "the header is a list": lambda config: [config],
    "segment steps are zero": _set("autoencoder.segment_steps", [0]),
    "segment steps are empty": _set("autoencoder.segment_steps", []),
    "segment steps for another layer count": _set("autoencoder.segment_steps", [1, 1]),
    "segment steps too many to run": _set("autoencoder.segment_steps", [10**8]),
    "the learning rate is NaN": _set("config.lr", float("nan")),
}


@pytest.mark.parametrize("corruption", list(PROBE_CORRUPTIONS))
def test_07_mistyped_probe_metadata_is_an_incompatible_file(fitted, tmp_path, corruption):
    path = tmp_path / "p.safetensors"
    fitted.save(path)
    rewrite_header(path, PROBE_CORRUPTIONS[corruption])
    with pytest.raises(IncompatibleFileError, match="p.safetensors"):
        KoopmanProbe.load(path, fitted.model, verbose=False)


SURROGATE_CORRUPTIONS = {
    "steps is a string": _set("steps", "eight"),
    "steps is a float": _set("steps", 2.5),
    "src_layer is a list": _set("src_layer", ["blocks.0"]),
    "in_adapter is a list": _set("in_adapter", [1]),
    "in_adapter shape is a string": _set("in_adapter.shape", "6"),
    "in_adapter reduce is unknown": _set("in_adapter.reduce", "squash"),
    "encoder dims are strings": _set("encoder_dims", ["a", "b"]),
    "encoder dims are wrong": _set("encoder_dims", [4, 9, 6]),
    "info is a list": _set("info", [1]),
    "decoder dims are missing": _set("decoder_dims", KeyError),
    "an unknown key": _set("colour", "blue"),
}


@pytest.mark.parametrize("corruption", list(SURROGATE_CORRUPTIONS))
def test_07_mistyped_surrogate_metadata_is_an_incompatible_file(fitted, tmp_path, corruption):
    path = tmp_path / "s.safetensors"
    fitted.surrogate().save(path)
    rewrite_header(path, SURROGATE_CORRUPTIONS[corruption])
    with pytest.raises(IncompatibleFileError, match="s.safetensors"):
        KoopmanSurrogate.load(path)


def test_07_unreadable_files_and_files_of_another_kind(fitted, tmp_path):
    probe_file, surrogate_file = tmp_path / "p.safetensors", tmp_path / "s.safetensors"
    fitted.save(probe_file)
    fitted.surrogate().save(surrogate_file)
    with pytest.raises(IncompatibleFileError, match="holds a 'surrogate', not a 'probe'"):
        KoopmanProbe.load(surrogate_file, fitted.model)
    with pytest.raises(IncompatibleFileError, match="holds a 'probe', not a 'surrogate'"):
        KoopmanSurrogate.load(probe_file)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(probe_file.read_bytes()[:100])
    with pytest.raises(IncompatibleFileError):
        KoopmanProbe.load(truncated, fitted.model)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(IncompatibleFileError, match="not a koopman_hooks file"):
        KoopmanSurrogate.load(plain)
    with pytest.raises(FileNotFoundError):
        KoopmanProbe.load(tmp_path / "missing.safetensors", fitted.model)


# ---------------------------------------------------------------------------------------------
# CLI: one line "koopman-hooks: ...", status 2, and no model trained, for every user mistake


def test_08_cli_out_must_be_a_folder(tmp_path, capsys, no_training):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    assert_cli_refuses(["run", "yinyang", "--out", str(a_file), "--quiet"], "is a file", capsys)
    assert_cli_refuses(["run", "yinyang", "--out", str(a_file / "below"), "--quiet"], "is a file", capsys)
    assert a_file.read_text() == "x"
    assert_cli_refuses(["run", "yinyang", "--out", str(tmp_path / "new"), "--seeds", "0"], "--seeds", capsys)
    with pytest.raises(ConfigError, match="is a file"):
        runner_module.run_recipe(load_recipe("yinyang"), a_file)


def test_08_cli_creates_a_missing_out_folder_before_training(tmp_path, capsys, no_training):
    out = tmp_path / "a" / "b"
    with pytest.raises(AssertionError, match="a model was trained"):
        main(["run", "yinyang", "--out", str(out), "--quiet"])
    assert out.is_dir()


RECIPE_MISTAKES = [  # (case, override, what the one line must say)
    ("09", "probe.latent_dimm=8", "unknown key 'probe.latent_dimm'; did you mean 'latent_dim'"),
    ("09", "probe.epocs=3", "unknown key 'probe.epocs'; did you mean 'epochs'"),
    ("10", "train.epochss=1", "unknown key 'train.epochss'; did you mean 'epochs'"),
    ("10", "unlearning.options={'strenght': 2.0}", "unknown key 'unlearning.options.strenght'; did you mean 'strength'"),
    ("10", "model.widht=3", "unknown key 'model.widht'; did you mean 'width'"),
    ("11", "topolgy.n_points=5", "unknown section or key 'topolgy'; did you mean 'topology'"),
    ("11", "threds=2", "unknown section or key 'threds'; did you mean 'threads'"),
    ("12", "probe.latent_dim='eight'", "probe.latent_dim: expected int | None, got 'eight' (str)"),
    ("12", "train.epochs='ten'", "train.epochs: expected int, got 'ten' (str)"),
    ("12", "topology.n_points=1.5", "topology.n_points: expected int, got 1.5 (float)"),
    ("12", "probe.reduce='squash'", "unknown reduce 'squash'"),
    ("12", "threads=-1", "threads must be >= 1 (or 0: no limit)"),
    ("12", "model.in_features=7", "model.in_features (7) must be 4"),
    ("12", "train.batch_size=0", "train.batch_size must be >= 1"),
    ("12", "train.lr=-1.0", "train.lr must be a positive number"),
    ("12", "topology.quantile=5.0", "topology.quantile must be in (0, 1]"),
    ("12", "data.train_size=-5", "data.train_size must be >= 1"),
    ("12", "targets.surrogate.agreemnt=>= 0.5", "names no figure of this recipe's report; did you mean "
                                                 "'surrogate.agreement'"),
]


@pytest.mark.parametrize("case, override, message", RECIPE_MISTAKES)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_09_to_12_recipe_mistakes_are_one_line_before_any_training(case, override, message, command, tmp_path, capsys,
                                                                   no_training):
    argv = [command, "yinyang", "--set", override]
    if command == "run":
        argv += ["--out", str(tmp_path / "out"), "--quiet"]
    assert_cli_refuses(argv, message, capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "right, wrong, message",
    [
        ('layers = ["blocks.0", "blocks.4"]', 'layers = ["blocks.0", "blocks.4"]\nlatent_dimm = 8',
         "unknown key 'probe.latent_dimm'; did you mean 'latent_dim'"),
        ("[train]\nepochs = 30", "[train]\nepochss = 30", "unknown key 'train.epochss'; did you mean 'epochs'"),
        ("[topology]", "[topolgy]", "unknown section or key 'topolgy'; did you mean 'topology'"),
        ('layers = ["blocks.0", "blocks.4"]', 'layers = ["blocks.0", "blocks.4"]\nlatent_dim = "eight"',
         "probe.latent_dim: expected int | None, got 'eight' (str)"),
        ('classes = "all"', "classes = [0, 3]", "unlearning.classes: class 3 is out of range"),
        ('layers = ["blocks.*"]', 'layers = ["block.*"]', "topology.layers: pattern 'block.*' matches no layer"),
    ],
)
def test_09_to_12_mistakes_in_a_recipe_file(right, wrong, message, tmp_path, capsys, no_training):
    text = (Path(runner_module.__file__).parent / "library" / "yinyang.toml").read_text()
    assert right in text
    recipe = tmp_path / "r.toml"
    recipe.write_text(text.replace(right, wrong, 1))
    for command in (["validate", str(recipe)], ["run", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]):
        assert_cli_refuses(command, message, capsys)
    assert not (tmp_path / "out").exists()


def test_12_wrong_types_through_the_python_api_name_the_key():
    with pytest.raises(ConfigError, match=r"latent_dim: expected int \| None, got 'eight' \(str\)"):
        KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], latent_dim="eight")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"lr: expected float, got 'fast' \(str\)"):
        KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], lr="fast")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# 13. the fit leaves every global random stream as it was


def _global_draws() -> tuple[torch.Tensor, float, float]:
    return torch.rand(4), random.random(), float(np.random.rand())


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@pytest.mark.parametrize("fails", [False, True])
def test_13_fit_leaves_the_global_random_streams_alone(fails, monkeypatch):
    _seed_everything(123)
    expected = _global_draws()
    if fails:
        fail_second_step(monkeypatch)
    probe = KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], **TINY)
    _seed_everything(123)
    seeded: list[str] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append("cuda all"))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: seeded.append("cuda"))
    try:
        probe.fit(vectors(), epochs=2)
    except Boom:
        assert fails
    got = _global_draws()
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    assert not seeded  # a fit on the CPU seeds no GPU generator either (they would apply on first use)


def test_13_the_fit_depends_on_its_own_seed_only():
    outputs = []
    for user_seed in (1, 2):
        torch.manual_seed(user_seed)
        probe = KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], seed=5, **TINY).fit(vectors(), epochs=2)
        outputs.append(surrogate_outputs(probe))
    assert torch.equal(outputs[0], outputs[1])


def test_13_what_a_loader_draws_from_python_and_numpy_is_undone_after_the_fit():
    """A loader that augments with Python's and NumPy's global generators advances them during
    the fit; the caller's streams continue as without the fit (torch's already did)."""

    class Augmenting:
        def __iter__(self):
            for x, y in vectors():
                random.random()
                yield x + torch.from_numpy(np.random.normal(0.0, 0.01, x.shape)).float(), y

    _seed_everything(7)
    expected = _global_draws()
    probe = KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], **TINY)  # resmlp() seeds torch itself
    _seed_everything(7)
    probe.fit(Augmenting(), epochs=1)
    got = _global_draws()
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_per_step_edits_leave_numpy_alone_and_do_not_depend_on_its_seed(fitted):
    stats = fitted.unlearning_statistics(vectors())
    edited = []
    for seed in (3, 4):
        np.random.seed(seed)
        before = np.random.get_state()[2]
        edited.append(fitted.unlearn(1, stats, method="per_step").readout.clone())
        assert np.random.get_state()[2] == before
    torch.testing.assert_close(edited[0], edited[1], rtol=0, atol=0)


def test_a_one_shot_iterator_that_must_be_read_twice_is_named_as_such():
    probe = KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], **{**TINY, "replay_mb": 0})
    with pytest.raises(EmptyLoaderError, match="iterated a second time .replay_mb=0.*cannot be iterated twice"):
        probe.fit(iter(list(vectors())), epochs=1)
    assert not probe.is_fitted


@pytest.mark.parametrize("kind", ["probe", "surrogate"])
def test_07_a_file_with_non_finite_values_is_refused(fitted, tmp_path, kind):
    path = tmp_path / "p.safetensors"
    (fitted if kind == "probe" else fitted.surrogate()).save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    key = next(k for k in sorted(tensors) if tensors[k].is_floating_point() and tensors[k].numel())
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(IncompatibleFileError, match=f"not a valid {kind} file: non-finite values in .*{key}"):
        if kind == "probe":
            KoopmanProbe.load(path, fitted.model, verbose=False)
        else:
            KoopmanSurrogate.load(path)


# ---------------------------------------------------------------------------------------------
# labels of any integer type, every call inside torch.no_grad() / torch.inference_mode(), edit
# options that cannot give a finite edit, and the surrogate's cached E K^k

def test_uint8_labels_are_classes_not_a_mask(fitted):
    x, y = vectors(n=96).tensors
    as_uint8 = TensorLoader(x, y.to(torch.uint8), batch_size=32)
    as_int64 = TensorLoader(x, y, batch_size=32)
    for method in ("endpoint", "per_step"):
        torch.testing.assert_close(fitted.unlearn(1, as_uint8, method=method, refine=0).readout,
                                   fitted.unlearn(1, as_int64, method=method, refine=0).readout, rtol=0, atol=0)
    assert fitted.unlearning_statistics(as_uint8).counts() == fitted.unlearning_statistics(as_int64).counts()


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_every_call_works_inside_no_grad_and_inference_mode(mode):
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    plain = KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], **TINY).fit(vectors(), epochs=2)
    probe = KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], **TINY)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    activation = torch.randn(8, 6, generator=torch.Generator().manual_seed(4))  # of blocks.0
    with context():
        probe.fit(vectors(), epochs=2)
        patched = probe.patch()
        inside = patched(x)
        edited = probe.unlearn(1, vectors(), refine=2)
        stats = probe.unlearning_statistics(vectors())
        figures = probe.evaluate(vectors())
    # the same fit as outside the context, and artifacts that work with autograd afterwards
    torch.testing.assert_close(probe.surrogate()(activation), plain.surrogate()(activation), rtol=0, atol=0)
    assert figures["agreement"] == plain.evaluate(vectors())["agreement"]
    torch.testing.assert_close(inside, plain.patch()(x), rtol=0, atol=0)
    torch.testing.assert_close(edited.readout, plain.unlearn(1, vectors(), refine=2).readout)
    assert stats.counts() == plain.unlearning_statistics(vectors()).counts()
    for module, given in ((patched, x), (probe.patch(edited), x), (edited, activation)):
        source = given.clone().requires_grad_(True)
        module(source).sum().backward()
        assert source.grad is not None and torch.isfinite(source.grad).all()


@pytest.mark.parametrize("option, value", [("strength", float("nan")), ("ridge", float("inf")),
                                           ("metric_eps", float("nan")), ("proximal", float("inf")),
                                           ("contract", float("nan")), ("metric_rows", 0)])
def test_edit_options_that_cannot_give_a_finite_edit_are_refused(fitted, option, value):
    with pytest.raises(ConfigError, match=option):
        fitted.unlearn(1, vectors(), **{option: value})


def test_forget_classes_are_checked_by_unlearning_statistics_too(fitted):
    with pytest.raises(ValueError, match="forget class 7 is out of range"):
        fitted.unlearning_statistics(vectors(), forget_class=[1, 7])


def test_the_cached_endpoint_follows_replaced_and_modified_buffers(fitted):
    surrogate = fitted.surrogate()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))  # blocks.0's activations
    d = surrogate.latent_dim

    def scaled(factor: float) -> torch.Tensor:
        m = torch.eye(d + 1)
        m[:d, :d] *= factor
        return m

    def uncached() -> torch.Tensor:
        fresh = surrogate.edited()
        fresh.__dict__.pop("_endpoint", None)
        return fresh(x)

    for _ in range(20):  # a replaced buffer's id is reused by its successor, at the same version (0)
        surrogate.readout = scaled(0.5)
        surrogate(x)
        surrogate.readout = scaled(1.0)
        surrogate.readout = scaled(2.0)
        torch.testing.assert_close(surrogate(x), uncached(), rtol=0, atol=0)
    surrogate.operator.mul_(0.9)  # modified in place
    torch.testing.assert_close(surrogate(x), uncached(), rtol=0, atol=0)
    surrogate.operator.data[:-1, :-1].mul_(0.5)  # through .data: no version counter moves
    torch.testing.assert_close(surrogate(x), uncached(), rtol=0, atol=0)


@pytest.mark.parametrize("override, message", [("probe.label_key=label", "label_key 'label' is not a key of the batch"),
                                               ("probe.input_key=input_ids", "besides input_key='input_ids'")])
def test_batch_keys_of_a_recipe_are_checked_before_any_training(override, message, tmp_path, capsys, no_training):
    assert_cli_refuses(["run", "tokens_gpt2", "--set", override, "--out", str(tmp_path / "out"), "--quiet"], message,
                       capsys)


def test_set_reaches_targets_whose_names_hold_dots():
    recipe = load_recipe("yinyang", ["targets.surrogate.agreement=>= 0.5",
                                     "targets.surrogate.state_fvu_per_layer.blocks.4=<= 0.2"])
    assert recipe.targets["surrogate.agreement"] == ">= 0.5"
    assert recipe.targets["surrogate.state_fvu_per_layer.blocks.4"] == "<= 0.2"


def test_a_fit_on_batches_of_other_shapes_names_the_layer_and_the_batch():
    y = vectors(n=64).tensors[1]
    batches = [(torch.randn(16, 1, 8, 8), y[:16]), (torch.randn(16, 1, 10, 10), y[16:32])]
    for replay_mb in (2048.0, 0.0):
        probe = KoopmanProbe(ConvNet("pool"), ["stem", "stage2"], latent_dim=8, steps=1, hidden=(8,), width=4,
                             reduce=["flatten", "pool:2x2"], replay_mb=replay_mb, verbose=False)
        with pytest.raises(ShapeError, match=r"'stem'.*\(4, 10, 10\).*batch 1.*\(4, 8, 8\) in its first batch"):
            probe.fit(batches, epochs=1)
        assert not probe.is_fitted


def test_kept_rows_are_stale_after_any_change_of_a_value():
    probe = KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], **TINY).fit(vectors(), epochs=1, keep_cache=True)
    probe.unlearning_statistics()  # the kept rows, while the model is as fitted
    flat = probe.model.blocks[0].linear.weight.data.view(-1)
    swapped = [0, 7]  # two values seven places apart: no sum weighted by position % 7 sees the swap
    assert flat[0] != flat[7]
    flat[swapped] = flat[swapped[::-1]]
    with pytest.raises(ValueError, match="stale"):
        probe.unlearning_statistics()
    flat[swapped] = flat[swapped[::-1]]  # swapped back: the rows describe the model again
    probe.unlearning_statistics()


def test_load_warns_when_the_model_has_other_weights(fitted, tmp_path):
    path = tmp_path / "p.safetensors"
    fitted.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KoopmanProbe.load(path, fitted.model, verbose=False)  # the same weights: no warning
    other = resmlp()
    with torch.no_grad():
        other.blocks[1].linear.bias.add_(1e-3)
    with pytest.warns(UserWarning, match="fitted on other weights than this model's") as seen:
        KoopmanProbe.load(path, other, verbose=False)
    assert {w.filename for w in seen} == {__file__}


def test_the_fit_does_not_depend_on_the_callers_numpy_or_python_seed():
    x, y = vectors(n=96).tensors

    class Noisy(torch.utils.data.Dataset):  # augments with NumPy's and Python's global streams
        def __len__(self) -> int:
            return len(x)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            noise = torch.from_numpy(np.random.normal(0, 0.05, 4).astype("float32")) + random.gauss(0, 0.05)
            return x[i] + noise, y[i]

    outputs = []
    for seed in (1, 2):
        np.random.seed(seed)
        random.seed(seed)
        probe = KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], **TINY)
        probe.fit(torch.utils.data.DataLoader(Noisy(), batch_size=32), epochs=1)
        outputs.append(probe.patch()(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_tampered_tensors_are_an_incompatible_file(fitted, tmp_path):
    def rewritten(kind: str, change: Callable[[dict[str, torch.Tensor], dict[str, Any]], None]) -> Path:
        path = tmp_path / f"{kind}.safetensors"
        (fitted if kind == "probe" else fitted.surrogate()).save(path)
        with safe_open(str(path), framework="pt") as f:
            header = json.loads(dict(f.metadata())["koopman_hooks"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        change(tensors, header)
        save_file(tensors, str(path), metadata={"koopman_hooks": json.dumps(header)})
        return path

    def steps(value: int) -> Callable[[dict[str, torch.Tensor], dict[str, Any]], None]:
        return lambda tensors, header: header["config"].update(steps=value)

    for change, message in [(steps(0), "steps must be in 1"), (steps(-3), "steps must be in 1"),
                            (lambda t, h: t.update(operator=torch.eye(5)), "operator must be"),
                            (lambda t, h: t.update(readout=torch.eye(3)), "readout must be")]:
        with pytest.raises(IncompatibleFileError, match=message):
            KoopmanSurrogate.load(rewritten("surrogate", change))
    for change, message in [(lambda t, h: t.update({"adapter.0.scale": torch.tensor(0.0)}), "scale must be one positive"),
                            (lambda t, h: t.update({"baseline.1.weight": torch.zeros(3, 5)}), "linear baseline")]:
        with pytest.raises(IncompatibleFileError, match=message):
            KoopmanProbe.load(rewritten("probe", change), fitted.model, verbose=False)


def test_a_one_row_validation_set_still_ranks_the_states():
    x, y = vectors(n=256, seed=5).tensors
    probe = KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], **TINY)
    probe.fit(vectors(n=256, seed=5), epochs=6, val_loader=[(x[:1], y[:1])])
    info = probe.fetch_model().info
    assert "state FVU nan" in info["kept_score"]  # one row: no variance, no FVU
    assert info["kept_because"].startswith("best held-out score at epoch")  # but its error still ranks the states


@pytest.mark.parametrize("kind", ["sparse", "meta"])
def test_weights_the_hash_cannot_read_byte_by_byte_fit_save_and_load(kind, tmp_path):
    model = resmlp()
    extra = torch.eye(4).to_sparse() if kind == "sparse" else torch.empty(4, device="meta")
    model.register_buffer("extra", extra)
    probe = KoopmanProbe(model, ["blocks.0", "blocks.2"], **TINY).fit(vectors(), epochs=1, keep_cache=True)
    probe.unlearning_statistics()
    probe.save(tmp_path / "p.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KoopmanProbe.load(tmp_path / "p.safetensors", model, verbose=False)


def test_targets_beyond_the_listed_figures_are_kept_for_the_run():
    recipe = load_recipe("yinyang", ["targets.surrogate.fit.model_passes=<= 3", "targets.spread.surrogate.agreement.min=>= 0.9",
                                     "targets.topology.n_points=>= 100"])
    check_recipe(recipe)  # numbers of the results the sections do not list: not typos, looked up after the run


def test_metric_rows_is_read_by_the_decoder_metric_only(fitted):
    fitted.unlearn(1, vectors(), metric="euclidean", metric_rows=0, refine=0)
    with pytest.raises(ConfigError, match="metric_rows"):
        fitted.unlearn(1, vectors(), metric="decoder", metric_rows=0, refine=0)


def test_a_compiled_model_is_refused_naming_the_module_to_probe():
    compiled = torch.compile(resmlp(), backend="eager")
    with pytest.raises(LayerError, match=r"torch.compile'd.*model._orig_mod"):
        KoopmanProbe(compiled, ["blocks.0", "blocks.2"], **TINY)
    KoopmanProbe(compiled._orig_mod, ["blocks.0", "blocks.2"], **TINY).fit(vectors(), epochs=1)  # what it says works


class Blocks(nn.Module):
    """Residual tanh blocks (the API review's model)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4)])
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.inp(x))
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_ridge_fits_return_the_state_they_kept():
    model = Blocks().eval()
    x = torch.randn(800, 8, generator=torch.Generator().manual_seed(0))
    y = model(x).argmax(1).detach()
    probe = KoopmanProbe(model, ["blocks.0", "blocks.1", "blocks.3"], operator_fit="ridge", steps=1, latent_dim=40,
                         verbose=False)
    probe.fit(TensorLoader(x[:100], y[:100], batch_size=64), epochs=2, val_loader=TensorLoader(x[600:], y[600:], batch_size=64))
    fitted = probe.fetch_model()
    kept = next(h for h in fitted.history if h["epoch"] == fitted.info["kept_epoch"])
    with torch.no_grad():
        states = fitted.adapted(fitted.capture((x[600:], y[600:])).activations)
        predicted = fitted.autoencoder.decoder(fitted.autoencoder.trajectory(fitted.autoencoder.encoder(states[0]))[-1])
    fvu = float(((predicted - states[-1]) ** 2).sum() / ((states[-1] - states[-1].mean(0)) ** 2).sum())
    assert abs(fvu - kept["val_state_fvu_2"]) < 1e-4 * kept["val_state_fvu_2"]  # the K it was scored with


def test_layers_given_as_modules_and_patch_layers_that_contradict_the_surrogate():
    model = Blocks().eval()
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(1))
    probe = KoopmanProbe(model, [model.blocks[0], "blocks.1", "blocks.3"], verbose=False)
    probe.fit(TensorLoader(x, model(x).argmax(1).detach(), batch_size=64), epochs=1)
    assert probe.surrogate(model.blocks[0], model.blocks[1]).dst_layer == "blocks.1"
    with pytest.raises(LayerError, match="'a Linear module of another model' is not a probed layer"):
        probe.surrogate(nn.Linear(2, 2))
    first = probe.surrogate("blocks.0", "blocks.1")
    with pytest.raises(LayerError, match="surrogate's dst_layer is 'blocks.1'"):
        probe.patch(first, dst="blocks.3")
    probe.patch(first, src=model.blocks[0], dst="blocks.1")  # the surrogate's own layers: accepted


def test_rank_is_refused_for_operators_that_do_not_read_it():
    with pytest.raises(ConfigError, match="rank=3 is read by operator='lowrank' only"):
        KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], rank=3, verbose=False)


def test_an_exp_operator_that_misses_the_closed_form_start_is_warned_about():
    from koopman_hooks.koopman.autoencoder import AutoencoderConfig, KoopmanAutoencoder

    reflection = torch.diag(torch.tensor([-1.0, 1.0, 0.5]))  # a negative eigenvalue: no real logarithm
    with pytest.warns(UserWarning, match="operator='exp' cannot start at the closed-form K"):
        KoopmanAutoencoder.from_linear(AutoencoderConfig(3, 4, operator="exp"), reflection)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        KoopmanAutoencoder.from_linear(AutoencoderConfig(3, 4, operator="exp"), torch.diag(torch.tensor([0.9, 1.0, 0.5])))


def test_dict_batches_for_a_model_of_one_tensor_name_input_key_and_label_key():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = vectors().tensors
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'x'.*pass input_key=<its key>"):
        KoopmanProbe(model, ["1", "3"], **TINY).fit([{"x": x, "y": y}], epochs=1)
    with pytest.raises(ConfigError, match=r"keys \['cls'\] besides input_key='image', and no label key.*label_key='cls'"):
        KoopmanProbe(model, ["1", "3"], input_key="image", **TINY).fit([{"image": x, "cls": y}], epochs=1)
    KoopmanProbe(model, ["1", "3"], input_key="image", label_key="cls", **TINY).fit([{"image": x, "cls": y}], epochs=1)


class WideTokens(nn.Module):
    """65 tokens of 64 features (4,160 > 4,096) through two per-token blocks, then their mean."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, 64)
        self.block0 = nn.Sequential(nn.Linear(64, 64), nn.Tanh())
        self.block1 = nn.Sequential(nn.Linear(64, 64), nn.Tanh())
        self.head = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block1(self.block0(self.embed(x))).mean(1))


def test_a_first_layer_the_default_reads_only_in_part_is_warned_about():
    x = torch.randn(64, 65, 3, generator=torch.Generator().manual_seed(0))
    loader = TensorLoader(x, torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(1)), batch_size=32)
    with pytest.warns(UserWarning, match=r"first probed layer 'block0' \(65 x 64 = 4,160 features\) read through 'mean'") as seen:
        probe = KoopmanProbe(WideTokens(), ["block0", "block1"], **TINY).fit(loader, epochs=1)
    assert {w.filename for w in seen} == {__file__}  # the warning points at the caller's line
    assert "reduce_source" in probe.fetch_model().sizes.notes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # chosen by the user: no warning
        KoopmanProbe(WideTokens(), ["block0", "block1"], reduce={"block0": "mean"}, **TINY).fit(loader, epochs=1)


# ---------------------------------------------------------------------------------------------
# review of precision, cache, files and analysis arguments


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_model_run_in_amp_keeps_the_output_loss(amp):
    probe = KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], amp=amp, **TINY).fit(vectors(), epochs=1)
    info = probe.fetch_model().info
    assert info["output_loss"] is True and info["tail_inputs"] is not None, info


def test_val_loader_labels_of_another_dtype_or_none_fit():
    base = vectors(128)
    x, y = base.tensors
    ragged = [(x[:32], y[:32]), (x[32:64], y[32:64].to(torch.int32)), (x[64:], y[64:].to(torch.uint8))]
    for loader, val in ((ragged, vectors(64, seed=1)), (base, TensorLoader(x[:40], y[:40].to(torch.uint8))),
                        (base, vectors(64, labels=False, seed=2)), (vectors(64, labels=False), vectors(64, seed=3))):
        probe = KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], **TINY).fit(loader, epochs=1, val_loader=val)
        assert probe.fetch_model().info["held_out_samples"] == len(val.tensors[0])


def test_a_cache_on_disk_fits_bit_identically_to_one_in_ram():
    states = []
    for cache_mb in (16.0, 0.001):
        probe = KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], cache_mb=cache_mb, **TINY).fit(vectors(256), epochs=2)
        assert probe.fetch_model().info["cache_on_disk"] is (cache_mb < 1)
        states.append(probe.fetch_model().autoencoder.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_scipys_eigensolver_keeps_torchs_thread_count():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from koopman_hooks.maths.linalg import _blas_threads

    with _blas_threads(1):
        assert all(pool["num_threads"] == 1 for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_loading_onto_a_missing_device_names_the_device_not_the_file(fitted, tmp_path):
    fitted.save(tmp_path / "p.safetensors")
    with pytest.raises(RuntimeError) as caught:
        KoopmanProbe.load(tmp_path / "p.safetensors", fitted.model, device="cuda")
    assert not isinstance(caught.value, IncompatibleFileError) and "not a valid probe file" not in str(caught.value)


@pytest.mark.parametrize("options, message", [({"n_points": 0}, "n_points must be a positive int"),
                                              ({"n_points": "100"}, "n_points must be a positive int"),
                                              ({"n_points": 10.5}, "n_points must be a positive int"),
                                              ({"k": 0}, "k must be a positive int"),
                                              ({"metric": "knn", "n_neighbors": 0}, "n_neighbors must be"),
                                              ({"epsilon": -1.0}, "epsilon must be a positive finite number")])
def test_topology_arguments_are_checked(fitted, options, message):
    with pytest.raises(ConfigError, match=message):
        fitted.topology(vectors(), **options)


def test_patch_with_a_layer_name_for_the_surrogate_says_what_to_pass(fitted):
    with pytest.raises(TypeError, match=r"surrogate must be an nn.Module.*patch\(dst='blocks.2'\)"):
        fitted.patch("blocks.2")


def test_a_rank_above_the_chosen_latent_dim_is_a_config_error():
    probe = KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], operator="lowrank", rank=1000, verbose=False)
    with pytest.raises(ConfigError, match=r"rank=1000 is above the latent_dim chosen from the data"):
        probe.fit(vectors(), epochs=1)


def test_exact_reductions_report_every_diagnostic_key(fitted):
    metrics = fitted.evaluate(vectors())
    assert metrics["mixed_agreement"] == metrics["template_agreement"] == metrics["agreement"]
    assert metrics["lossy_reduction_reaches_output"] is None


def test_verbose_and_device_are_checked_when_the_probe_is_built():
    with pytest.raises(ConfigError, match="verbose must be a bool"):
        KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], verbose="yes")
    with pytest.raises(ConfigError, match="device must be"):
        KoopmanProbe(resmlp(), ["blocks.0", "blocks.2"], device="nonsense", verbose=False)


def test_unlearning_statistics_over_a_dataloader_leave_the_global_streams(fitted):
    import random

    import numpy as np
    from torch.utils.data import DataLoader, TensorDataset

    x, y = vectors(96).tensors
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    fitted.unlearning_statistics(loader)
    assert torch.equal(states[0], torch.get_rng_state())
    assert np.array_equal(states[1], np.random.get_state()[1]) and states[2] == random.getstate()


def test_evaluate_scores_a_per_token_head_per_token():
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))  # (batch, tokens, classes)

    torch.manual_seed(0)
    x = torch.randn(64, 5, 4)
    model = Tokens()
    probe = KoopmanProbe(model, ["a", "b"], **TINY).fit(TensorLoader(x, batch_size=32), epochs=1)
    labels = model(x).argmax(-1)
    labels[::3, 1:3] = -100  # HuggingFace's "no label" on some tokens
    labels[1::7, 0] = (labels[1::7, 0] + 1) % 3  # and some wrong ones
    metrics = probe.evaluate(TensorLoader(x, labels, batch_size=32))
    with torch.no_grad():  # the oracle: every token, counted directly
        ours, theirs = model(x).argmax(-1), probe.patch()(x).argmax(-1)
    scored = labels != -100
    assert metrics["per_token"] and metrics["n_samples"] == 64 and metrics["n_tokens"] == 64 * 5
    assert metrics["agreement"] == pytest.approx(float((ours == theirs).double().mean()), abs=1e-12)
    assert metrics["model_accuracy"] == pytest.approx(float((ours == labels)[scored].double().mean()), abs=1e-12)
    assert metrics["surrogate_accuracy"] == pytest.approx(float((theirs == labels)[scored].double().mean()), abs=1e-12)
    assert metrics["model_accuracy"] < 1.0  # the wrong labels count, the unlabelled tokens do not
    with pytest.raises(ValueError, match=r"need integer labels of shape \(32, 5\)"):
        probe.evaluate(TensorLoader(x, labels[:, 0], batch_size=32))  # one label per row for per-token scores
    with pytest.raises(ValueError, match="label 3 is out of range"):
        probe.evaluate(TensorLoader(x, labels.clamp_min(0) + 1, batch_size=32))


def test_a_fit_on_too_few_rows_to_hold_any_out_says_so():
    torch.manual_seed(0)
    model = ResMLP(4, 3, width=6, depth=3).eval()
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(2))
    batches = [(x, model(x).argmax(1))]
    with pytest.warns(UserWarning, match=r"the fit saw 12 rows: too few to hold any out") as seen:
        probe = KoopmanProbe(model, ["blocks.0", "blocks.2"], verbose=False).fit(batches, epochs=1)
    assert {w.filename for w in seen} == {__file__}
    assert probe.fetch_model().info["kept_because"].startswith("no held-out rows (val_fraction=0.1, 12 rows")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the user asked for no held-out rows: nothing to warn about
        KoopmanProbe(model, ["blocks.0", "blocks.2"], val_fraction=0.0, verbose=False).fit(batches, epochs=1)


def test_warn_names_the_first_line_outside_the_package_and_torch():
    """:func:`koopman_hooks.errors.warn` skips the package's frames and torch's, so a warning
    raised deep inside (here: by package code run as a forward hook, inside torch's module
    call) names the user's line."""
    import koopman_hooks
    from koopman_hooks.errors import warn

    with pytest.warns(UserWarning, match="direct") as seen:
        warn("direct")
    assert seen[0].filename == __file__ and seen[0].lineno == inspect.currentframe().f_lineno - 1
    namespace: dict[str, Any] = {"warn": warn}
    fake = os.path.join(os.path.dirname(koopman_hooks.__file__), "not_a_module.py")  # a frame "inside the package"
    exec(compile("def hook(module, args, output):\n    warn('deep')\n", fake, "exec"), namespace)
    layer = nn.Linear(2, 2)
    handle = layer.register_forward_hook(namespace["hook"])
    try:
        with pytest.warns(UserWarning, match="deep") as seen:
            layer(torch.zeros(1, 2))
        line = inspect.currentframe().f_lineno - 1
    finally:
        handle.remove()
    assert seen[0].filename == __file__ and seen[0].lineno == line


def test_a_model_of_two_inputs_fed_tuple_batches_is_told_about_dict_batches():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(2, 4), nn.Linear(4, 3)

        def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.a(x1) + self.b(x2)))

    torch.manual_seed(0)
    model = TwoInputs().eval()
    x1, x2 = torch.randn(64, 3), torch.randn(64, 2)
    y = model(x1, x2).argmax(1)
    with pytest.raises(TypeError, match=r"missing 1 required positional argument.*called as model\(x\) with one tensor"
                                        r".*dict batches keyed by its argument names"):
        KoopmanProbe(model, ["a", "head"], verbose=False).fit([(x1, x2, y)], epochs=1)
    probe = KoopmanProbe(model, ["a", "head"], verbose=False).fit([{"x1": x1, "x2": x2, "labels": y}], epochs=1)
    assert probe.evaluate([{"x1": x1, "x2": x2, "labels": y}])["n_samples"] == 64
