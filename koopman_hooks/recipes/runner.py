"""Run a recipe end to end: data, model, probe, then every enabled section; write the report."""

from __future__ import annotations

import difflib
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from koopman_hooks.core import distributed
from koopman_hooks.core.batches import BatchSpec
from koopman_hooks.core.layers import resolve_layers
from koopman_hooks.core.schema import to_mapping
from koopman_hooks.core.serialization import load_tensors, save_tensors
from koopman_hooks.data import TensorLoader
from koopman_hooks.errors import ConfigError, LayerError
from koopman_hooks.probe import KoopmanProbe
from koopman_hooks.recipes.builders import NUM_CLASSES, build_datasets, check_model_section, example_batch, model_factory
from koopman_hooks.recipes.config import Recipe
from koopman_hooks.recipes.report import build_report, write_report
from koopman_hooks.recipes.sections import SECTIONS, RunContext
from koopman_hooks.recipes.sections.fidelity import peak_rss_mb
from koopman_hooks.recipes.timing import Stopwatch
from koopman_hooks.training import train_classifier

FIT_LOADER_BATCH = 512  # rows per model pass while fitting (the probe's own batch size is separate)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch for a recipe run (the recipe owns its process)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_probe(recipe: Recipe, model: nn.Module, seed: int, verbose: bool) -> KoopmanProbe:
    """The recipe's probe on ``model``; option errors name the ``probe.`` key."""
    if recipe.probe is None:
        raise ConfigError("the recipe has no [probe] section")
    try:
        return KoopmanProbe(model, list(recipe.probe.layers), seed=seed, verbose=verbose, **recipe.probe.options)
    except ConfigError as err:
        raise ConfigError(f"probe.{err}") from None
    except TypeError as err:  # a KoopmanProbe option given a value it cannot take
        raise ConfigError(f"[probe]: {err}") from None


TYPO_CUTOFF = 0.85  # difflib's similarity above which a target unlike every figure is one's misspelling


def check_recipe(recipe: Recipe) -> None:
    """Everything that can be checked before training: the probe's options and layers, and the
    layers of ``[topology]`` and ``[report]``, on an untrained model of the recipe's kind; the
    classes of ``[unlearning]`` against the dataset's."""
    num_classes = NUM_CLASSES[recipe.data.dataset]
    model = recipe.model.build(num_classes)
    config = make_probe(recipe, model, 0, verbose=False).config
    try:  # the batch keys the probe reads (input_key, label_key, ignore_keys) against the data's batches
        BatchSpec(config.input_key, config.label_key, config.ignore_keys).split(example_batch(recipe.data))
    except ConfigError as err:
        raise ConfigError(f"[probe] on {recipe.data.dataset!r} batches: {err}") from None
    # a target one letter off a documented figure is a typo (other numbers of the results, e.g.
    # surrogate.fit.model_passes or spread.*, may be targets too: they are looked up after the run)
    figures = ["seconds", *(name for section in SECTIONS if section.enabled(recipe)
                            for name in section.target_names(recipe, config.layers))]
    for path in recipe.targets:
        near = difflib.get_close_matches(path, figures, n=1, cutoff=TYPO_CUTOFF)
        if path not in figures and near:
            raise ConfigError(f"target {path!r} names no figure of this recipe's report; did you mean {near[0]!r}?")
    for key, layers in (("topology.layers", recipe.topology and recipe.topology.layers),
                        ("report.pca_layers", recipe.report.pca_layers)):
        if layers:
            try:
                resolve_layers(model, list(layers), minimum=1)
            except LayerError as err:
                raise LayerError(f"{key}: {err}") from None
    if recipe.unlearning is not None:
        for key in ("classes", "baseline_classes"):
            value = getattr(recipe.unlearning, key)
            bad = [c for c in value if not 0 <= c < num_classes] if value != "all" else []
            if bad:
                raise ConfigError(f"unlearning.{key}: class {bad[0]} is out of range: {recipe.data.dataset} has "
                                  f"{num_classes} classes (0..{num_classes - 1})")


def prepare_out(out: Path) -> None:
    """Create the output folder ``out`` (and its parents), or a :class:`ConfigError` saying why not."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                raise ConfigError(f"out folder {str(out)!r}: {str(path)!r} is a file; give a folder (it is created "
                                  "if missing)")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the out folder {str(out)!r}: {err.strerror or err}") from None


def run_seed(recipe: Recipe, seed: int, out_dir: Path, data_root: str | None = None, verbose: bool = True) -> dict[str, Any]:
    """Run one seed of ``recipe`` and return its results; artefacts go to ``out_dir``.

    ``wall_time`` and ``cpu_time`` (this process's CPU seconds) split the run into setup, model
    training, probe fit and each enabled section (with the parts a section reports itself)."""
    start, start_cpu = time.perf_counter(), time.process_time()
    clock = Stopwatch()
    main = distributed.is_main()
    with clock.part("setup"):
        if main:
            out_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(seed)
        train_set, test_set, num_classes = build_datasets(recipe.data, seed, data_root)
        new_model = model_factory(recipe.model, num_classes)
        model = new_model()
    train = recipe.train
    t0 = time.perf_counter()
    train_loss: list[float] = []
    with clock.part("model_training"):
        if main:  # one model for every rank: trained once, then shared
            train_loss = train_classifier(
                model, TensorLoader.from_dataset(train_set, train.batch_size, shuffle=True, seed=seed), train.epochs,
                lr=train.lr, weight_decay=train.weight_decay, verbose=verbose, desc=f"train model (seed {seed})",
                augment=train.augment(seed),
            )
        train_seconds = time.perf_counter() - t0
    with clock.part("setup"):
        state, train_loss, train_seconds = distributed.gathered((model.state_dict(), train_loss, train_seconds))[0]
        model.load_state_dict(state)
        model.eval()
        if main:  # the trained model, so the run's probe can be reloaded: load_run(out_dir)
            save_tensors(out_dir / "model.safetensors", model.state_dict(), "model",
                         {"recipe": recipe.name, "model": to_mapping(recipe.model), "num_classes": num_classes,
                          "seed": seed})
    assert recipe.probe is not None
    probe = make_probe(recipe, model, seed, verbose and main)
    context = RunContext(recipe, seed, out_dir, train_set, test_set, num_classes, new_model, model, probe,
                         train_seconds, train_loss, verbose and main, {"seed": seed})
    with clock.part("probe_fit"):
        fit_loader = context.loader(train_set, FIT_LOADER_BATCH, limit=recipe.probe.samples, shard=True)
        keep = recipe.unlearning is not None and recipe.unlearning.statistics_from == "fit_cache"
        probe.fit(fit_loader, epochs=recipe.probe.epochs, keep_cache=keep)
        probe.save(out_dir / "probe.safetensors")
    context.results["peak_rss_mb"] = peak_rss_mb()
    wall: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    for section in SECTIONS:
        if section.enabled(recipe):
            with clock.part(section.name):
                output = section.run(context)
            parts = output.pop("time_parts", None)  # where the section's own time went
            if parts is not None:
                wall[f"{section.name}_parts"], cpu[f"{section.name}_parts"] = dict(parts.wall), dict(parts.cpu)
            context.results.update(output)
    context.results["seconds"] = time.perf_counter() - start
    context.results["wall_time"] = {**clock.wall, **wall, "total": context.results["seconds"]}
    context.results["cpu_time"] = {**clock.cpu, **cpu, "total": time.process_time() - start_cpu}
    return context.results


@contextmanager
def limited_threads(threads: int | None) -> Iterator[None]:
    """At most ``threads`` threads for the block (nothing changes with ``None``): torch's, and
    the BLAS and OpenMP pools that numpy, scipy and scikit-learn compute in (through
    threadpoolctl, where installed); every setting is restored afterwards, also after an error."""
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - installed with scikit-learn (the recipes' extras)
        pools: AbstractContextManager[Any] = nullcontext()
    else:
        pools = threadpool_limits(limits=threads)
    torch.set_num_threads(threads)
    try:
        with pools:
            yield
    finally:
        torch.set_num_threads(before)


def run_recipe(recipe: Recipe, out_dir: str | Path, seeds: Sequence[int] = (0,), data_root: str | None = None,
               verbose: bool = True) -> dict[str, Any]:
    """Check the recipe and create ``out_dir``, run every seed, then write ``report.json``, ``report.md``
    and plots to ``out_dir``."""
    check_recipe(recipe)
    out = Path(out_dir)
    prepare_out(out)
    with limited_threads(recipe.threads):
        runs = [run_seed(recipe, seed, out / f"seed{seed}", data_root, verbose) for seed in seeds]
        if not distributed.is_main():
            return {}
        report = build_report(recipe, runs)  # inside: its environment records the threads the runs had
    write_report(recipe, report, runs, out)
    return report


def load_run(seed_dir: str | Path, verbose: bool = False) -> tuple[nn.Module, KoopmanProbe]:
    """The trained model (in eval mode) and fitted probe of one seed's run directory,
    e.g. ``load_run("runs/mnist/seed0")``, to analyse or edit without re-running the recipe."""
    seed_dir = Path(seed_dir)
    weights, config = load_tensors(seed_dir / "model.safetensors", "model")
    model = model_factory(check_model_section(config["model"]), config["num_classes"])()
    model.load_state_dict(weights)
    model.eval()
    return model, KoopmanProbe.load(seed_dir / "probe.safetensors", model, verbose=verbose)
