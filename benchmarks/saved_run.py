"""Measurements on saved recipe runs, with the recipe's own settings and this release's code.

Loads seed folders of a ``koopman-hooks run`` output (model and probe saved there), so that a
change to the edit or to the topology analysis is measured on the models and probes a report
was made with, without training them again. One thread.

- ``edit``: streams the recipe's unlearning statistics once (its first ``stats_samples``
  training images and its edit options), makes the endpoint edit (the one the recipes'
  edit-time target names) for every class and scores each edit on the test set: the edit's
  seconds (what ``unlearn`` reports, the statistics excluded), the forgotten class's test
  accuracy and the retained classes' accuracy next to the original
  model's. Saves ``benchmarks/results/edit_time_<recipe>.json``. ``--compare`` takes variants
  (name -> options over the recipe's) and edits every class with each in turn, class by class,
  so that their times are measured side by side.
- ``topology``: ``probe.topology`` exactly as the recipe's ``[topology]`` section calls it (its
  test images, points, layers, scale, lens and seed): β0 sequences, start and final errors,
  Spearman. Saves ``benchmarks/results/topology_<recipe>.json``.

    python benchmarks/saved_run.py edit mnist_resnet18 --run runs/mnist_resnet18/seed0 [--data-root PATH]
    python benchmarks/saved_run.py edit mnist_vit --run runs/mnist_vit/seed0 --compare '{"a": {}, "b": {"refine_rows": 2048}}'
    python benchmarks/saved_run.py topology mnist --run runs/mnist/seed0 runs/mnist/seed1 runs/mnist/seed2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
from pathlib import Path
from typing import Any

import torch

from koopman_hooks.data import TensorLoader
from koopman_hooks.recipes import load_recipe, load_run
from koopman_hooks.recipes.builders import build_datasets
from koopman_hooks.recipes.config import Recipe
from koopman_hooks.training import predict
from koopman_hooks.unlearning import EditOptions, forget_retain_accuracy

RESULTS = Path(__file__).resolve().parent / "results"


def _seed(folder: str) -> int:
    name = Path(folder).name
    return int(name.removeprefix("seed")) if name.startswith("seed") and name[4:].isdigit() else 0


def edit_times(recipe: Recipe, folder: str, data_root: str | None, compare: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The recipe's endpoint edit of every class, scored on the test set. With ``compare`` (name ->
    options over the recipe's), each variant edits every class in turn, class by class, so that
    their edit times are measured side by side under the same conditions."""
    if recipe.unlearning is None:
        raise SystemExit(f"recipe {recipe.name!r} has no [unlearning] section")
    cfg = recipe.unlearning
    model, probe = load_run(folder)  # the seed is read from the folder's name (seed<N>), as the runner writes it
    train, test, num_classes = build_datasets(recipe.data, _seed(folder), data_root)
    test_loader = TensorLoader.from_dataset(test, 1000)
    original, labels = predict(model, test_loader)
    variants = {name: {**cfg.options, **options} for name, options in (compare or {"recipe": {}}).items()}
    stats = {}  # one statistics pass per refinement sample size, as each variant alone would stream them
    variant_stats = {}
    for name, options in variants.items():
        rows_needed = EditOptions(**options).sample_rows
        if rows_needed not in stats:
            stats[rows_needed] = probe.unlearning_statistics(TensorLoader.from_dataset(train, 1000, limit=cfg.stats_samples), **options)
        variant_stats[name] = stats[rows_needed]
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for c in range(num_classes):
        for name, options in variants.items():
            edited = probe.unlearn(c, variant_stats[name], **options)
            forget, retain = forget_retain_accuracy(predict(probe.patch(edited), test_loader)[0], labels, c)
            row = {"class": c, "edit_seconds": edited.info["edit_seconds"], "test_forget_accuracy": forget,
                   "test_retain_accuracy": retain, "original_retain_accuracy": forget_retain_accuracy(original, labels, c)[1]}
            rows[name].append(row)
            print(f"{name}: class {c}: edit {row['edit_seconds']:.2f} s, forget {row['test_forget_accuracy']:.4f}, "
                  f"retain {row['test_retain_accuracy']:.4f} (original {row['original_retain_accuracy']:.4f})", flush=True)
    summaries = {}
    for name, options in variants.items():
        seconds = [r["edit_seconds"] for r in rows[name]]
        summaries[name] = {"options": dict(options), "max_edit_seconds": max(seconds), "mean_edit_seconds": sum(seconds) / len(seconds),
                           "max_test_forget_accuracy": max(r["test_forget_accuracy"] for r in rows[name]),
                           "max_retain_drop": max(r["original_retain_accuracy"] - r["test_retain_accuracy"] for r in rows[name]),
                           "classes": rows[name]}
        print(f"{name}: edit max {summaries[name]['max_edit_seconds']:.2f} s, mean {summaries[name]['mean_edit_seconds']:.2f} s; "
              f"worst forget {summaries[name]['max_test_forget_accuracy']:.4f}, "
              f"largest retain drop {summaries[name]['max_retain_drop']:.4f}")
    result = {"run": folder, "method": "endpoint", "stats_samples": cfg.stats_samples,
              "stats_seconds": max(statistics.seconds for statistics in stats.values()),
              "latent_dim": probe.fetch_model().autoencoder.config.latent_dim}
    if compare is None:
        return {**result, **summaries["recipe"]}
    return {**result, "variants": summaries}


def topology(recipe: Recipe, folder: str, data_root: str | None) -> dict[str, Any]:
    if recipe.topology is None:
        raise SystemExit(f"recipe {recipe.name!r} has no [topology] section")
    cfg = recipe.topology
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("n_points", "layers")}
    _, probe = load_run(folder)
    _, test, _ = build_datasets(recipe.data, _seed(folder), data_root)
    topo = probe.topology(TensorLoader.from_dataset(test, 500), cfg.n_points, cfg.layers, seed=_seed(folder), **options)
    shown = ("network_betti0", "surrogate_betti0", "start_betti0_relative_error", "final_betti0_relative_error",
             "spearman_network", "spearman_surrogate", "lens_dims")
    print(f"{folder}: " + ", ".join(f"{key} {topo.get(key)}" for key in shown), flush=True)
    return {"run": folder, **topo}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("measure", choices=["edit", "topology"])
    parser.add_argument("recipe", help="the recipe the runs were made with (a name or a file)")
    parser.add_argument("--run", required=True, nargs="+", help="seed folders of the run")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--compare", default=None,
                        help='edit: JSON of variants, name -> options over the recipe\'s, e.g. \'{"a": {}, "b": {"refine_rows": 1024}}\'')
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = load_recipe(args.recipe)
    if args.compare is not None and args.measure != "edit":
        raise SystemExit("--compare applies to the edit measure only")
    compare = None if args.compare is None else json.loads(args.compare)
    if args.measure == "edit":
        runs = [edit_times(recipe, folder, args.data_root, compare) for folder in args.run]
    else:
        runs = [topology(recipe, folder, args.data_root) for folder in args.run]
    keys = (("max_edit_seconds", "mean_edit_seconds", "max_test_forget_accuracy", "max_retain_drop") if args.measure == "edit"
            else ("start_betti0_relative_error", "final_betti0_relative_error", "spearman_network", "spearman_surrogate"))
    summaries = {"": runs} if compare is None else {name: [r["variants"][name] for r in runs] for name in compare}
    means = {name: {key: sum(values) / len(values) for key in keys if (values := [r[key] for r in rs if r.get(key) is not None])}
             for name, rs in summaries.items()}
    for name, mean in means.items():
        print(f"mean over runs{' (' + name + ')' if name else ''}:", {k: round(v, 3) for k, v in mean.items()})
    mean = means[""] if compare is None else means
    out = Path(args.out) if args.out else RESULTS / f"{'edit_time' if args.measure == 'edit' else 'topology'}_{recipe.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"recipe": recipe.name, "threads": torch.get_num_threads(), "machine": platform.machine(),
                               "torch": torch.__version__, "mean": mean, "runs": runs}, indent=2, default=float))


if __name__ == "__main__":
    main()
