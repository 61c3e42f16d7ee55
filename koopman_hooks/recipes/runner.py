"""Run a recipe end to end: data, model, probe, evaluation, optional sections, report."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from koopman_hooks.data import TensorLoader
from koopman_hooks.probe import KoopmanProbe
from koopman_hooks.recipes.builders import build_datasets, model_factory, seed_everything
from koopman_hooks.recipes.config import section
from koopman_hooks.serialization import load_tensors, save_tensors
from koopman_hooks.training import predict, train_classifier


@dataclass
class RunContext:
    """Everything a recipe section needs about one seed's run."""

    recipe: dict[str, Any]
    seed: int
    out_dir: Path
    train_set: Dataset
    test_set: Dataset
    num_classes: int
    new_model: Callable[[], nn.Module]
    model: nn.Module
    probe: KoopmanProbe
    verbose: bool
    results: dict[str, Any] = field(default_factory=dict)

    def loader(self, dataset: Dataset, batch_size: int = 512, shuffle: bool = False) -> TensorLoader:
        return TensorLoader.from_dataset(dataset, batch_size=batch_size, shuffle=shuffle, seed=self.seed)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _per_class_list(per_class: dict[int, float], num_classes: int) -> list[float | None]:
    return [per_class.get(c) for c in range(num_classes)]


def run_seed(recipe: dict[str, Any], seed: int, out_dir: Path, data_root: str | None = None, verbose: bool = True) -> dict[str, Any]:
    """Run one seed of ``recipe`` and return its results; artefacts go to ``out_dir``."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    data_cfg, model_cfg = section(recipe, "data"), section(recipe, "model")
    train_cfg, probe_cfg = section(recipe, "train"), section(recipe, "probe")
    train_set, test_set, num_classes = build_datasets(data_cfg, seed, data_root)
    new_model = model_factory(model_cfg, num_classes)
    model = new_model()
    train_loader = TensorLoader.from_dataset(train_set, train_cfg.get("batch_size", 64), shuffle=True, seed=seed)
    test_loader = TensorLoader.from_dataset(test_set, 1000)
    t0 = time.perf_counter()
    train_history = train_classifier(
        model, train_loader, train_cfg.get("epochs", 30), lr=train_cfg.get("lr", 1e-3),
        weight_decay=train_cfg.get("weight_decay", 0.0), verbose=verbose, desc=f"train model (seed {seed})",
    )
    train_seconds = time.perf_counter() - t0
    # the trained model, so the run's probe can be reloaded: KoopmanProbe.load(path, model)
    save_tensors(out_dir / "model.safetensors", model.state_dict(), "model",
                 {"recipe": recipe.get("name"), "model": model_cfg, "num_classes": num_classes, "seed": seed})

    fit_epochs = probe_cfg.pop("epochs", 30)
    fit_batch = probe_cfg.pop("batch_size", 256)
    probe = KoopmanProbe(model, probe_cfg.pop("layers"), verbose=verbose, seed=seed, **probe_cfg)
    probe.fit(TensorLoader.from_dataset(train_set, fit_batch, shuffle=True, seed=seed), epochs=fit_epochs)
    peak_rss = _peak_rss_mb()
    metrics = probe.evaluate(test_loader)
    probe.save(out_dir / "probe.safetensors")

    results: dict[str, Any] = {
        "seed": seed,
        "model": {
            "test_accuracy": metrics["model_accuracy"],
            "per_class_accuracy": _per_class_list(metrics["model_per_class_accuracy"], num_classes),
            "train_seconds": train_seconds,
            "train_loss": train_history,
        },
        "surrogate": {
            "test_accuracy": metrics["surrogate_accuracy"],
            "agreement": metrics["agreement"],
            "accuracy_drop": metrics["model_accuracy"] - metrics["surrogate_accuracy"],
            "per_class_accuracy": _per_class_list(metrics["surrogate_per_class_accuracy"], num_classes),
            "state_fvu": metrics["state_fvu"],
            "state_fvu_per_layer": metrics["state_fvu_per_layer"],
            "latent_fvu": metrics["latent_fvu"],
            "fit_seconds": probe.fit_seconds,
            "peak_rss_mb": peak_rss,
            "layers": probe.layers,
            "steps": probe.steps,
            "latent_dim": probe.latent_dim,
            "operator": probe.operator,
        },
        "linear_baseline": {
            "test_accuracy": metrics["linear_baseline"]["accuracy"],
            "agreement": metrics["linear_baseline"]["agreement"],
            "state_fvu": metrics["linear_baseline"]["state_fvu"],
        },
        "history": probe.history,
    }
    context = RunContext(recipe, seed, out_dir, train_set, test_set, num_classes, new_model, model, probe, verbose, results)
    from koopman_hooks.recipes import plots

    plots.seed_plots(context, test_loader)
    for name, run_section in _sections().items():
        if name in recipe:
            results[name] = run_section(context)
    results["seconds"] = time.perf_counter() - start
    return results


def _sections() -> dict[str, Callable[[RunContext], Any]]:
    """Optional recipe sections, each a function of the run context."""
    from koopman_hooks.recipes import sections

    return sections.SECTIONS


def run_recipe(
    recipe: dict[str, Any], out_dir: str | Path, seeds: Sequence[int] = (0,), data_root: str | None = None, verbose: bool = True
) -> dict[str, Any]:
    """Run every seed, then write ``report.json``, ``report.md`` and plots to ``out_dir``."""
    from koopman_hooks.recipes.report import build_report, write_report

    if recipe.get("threads"):
        torch.set_num_threads(int(recipe["threads"]))
    out = Path(out_dir)
    runs = [run_seed(recipe, seed, out / f"seed{seed}", data_root, verbose) for seed in seeds]
    report = build_report(recipe, runs)
    write_report(report, runs, out)
    return report


def load_run(seed_dir: str | Path, verbose: bool = False) -> tuple[nn.Module, KoopmanProbe]:
    """The trained model (in eval mode) and fitted probe of one seed's run directory,
    e.g. ``load_run("runs/mnist/seed0")``, to analyse or edit without re-running the recipe."""
    seed_dir = Path(seed_dir)
    weights, config = load_tensors(seed_dir / "model.safetensors", "model")
    model = model_factory(dict(config["model"]), config["num_classes"])()
    model.load_state_dict(weights)
    model.eval()
    return model, KoopmanProbe.load(seed_dir / "probe.safetensors", model, verbose=verbose)
