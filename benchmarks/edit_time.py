"""The Koopman edit's time on a saved recipe run: every class, the recipe's own edit options.

Loads one seed of a ``koopman-hooks run`` output (``--run runs/mnist_resnet18/seed0``), streams
the recipe's unlearning statistics once (the first ``stats_samples`` training images, as the
recipe does), then edits the surrogate for every class and scores each edit on the test set:
the edit's seconds (what ``unlearn`` reports, the statistics excluded), the forgotten class's
test accuracy and the retained classes' test accuracy next to the original model's. Prints and
saves ``benchmarks/results/edit_time_<recipe>.json``. One thread.

    python benchmarks/edit_time.py mnist_resnet18 --run runs/mnist_resnet18/seed0 [--data-root PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from koopman_hooks.data import TensorLoader
from koopman_hooks.recipes import load_recipe, load_run
from koopman_hooks.recipes.builders import build_datasets

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def _predictions(module: torch.nn.Module, loader: TensorLoader) -> torch.Tensor:
    return torch.cat([module(x).argmax(-1) for x, _ in loader])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="the recipe the run was made with (a name or a file)")
    parser.add_argument("--run", required=True, help="one seed's folder of the run (model and probe saved there)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = load_recipe(args.recipe)
    if recipe.unlearning is None:
        raise SystemExit(f"recipe {recipe.name!r} has no [unlearning] section")
    cfg = recipe.unlearning
    model, probe = load_run(args.run)
    train, test, num_classes = build_datasets(recipe.data, 0, args.data_root)
    stats_loader = TensorLoader.from_dataset(train, 1000, limit=cfg.stats_samples)
    test_loader = TensorLoader.from_dataset(test, 1000)
    labels = torch.cat([y for _, y in test_loader])
    original = _predictions(model, test_loader)
    start = time.perf_counter()
    stats = probe.unlearning_statistics(stats_loader, **cfg.options)
    stats_seconds = time.perf_counter() - start
    rows = []
    for c in range(num_classes):
        edited = probe.unlearn(c, stats, **cfg.options)
        predicted = _predictions(probe.patch(edited), test_loader)
        kept = labels != c
        rows.append({"class": c, "edit_seconds": edited.info["edit_seconds"],
                     "test_forget_accuracy": float((predicted[~kept] == c).float().mean()),
                     "test_retain_accuracy": float((predicted[kept] == labels[kept]).float().mean()),
                     "original_retain_accuracy": float((original[kept] == labels[kept]).float().mean())})
        print(f"class {c}: edit {rows[-1]['edit_seconds']:.2f} s, forget {rows[-1]['test_forget_accuracy']:.4f}, "
              f"retain {rows[-1]['test_retain_accuracy']:.4f} (original {rows[-1]['original_retain_accuracy']:.4f})",
              flush=True)
    seconds = [r["edit_seconds"] for r in rows]
    result = {"recipe": recipe.name, "run": str(args.run), "options": dict(cfg.options), "stats_samples": cfg.stats_samples,
              "stats_seconds": stats_seconds, "latent_dim": probe.fetch_model().autoencoder.config.latent_dim,
              "threads": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__,
              "max_edit_seconds": max(seconds), "mean_edit_seconds": sum(seconds) / len(seconds),
              "max_test_forget_accuracy": max(r["test_forget_accuracy"] for r in rows),
              "max_retain_drop": max(r["original_retain_accuracy"] - r["test_retain_accuracy"] for r in rows),
              "classes": rows}
    print(f"edit: max {result['max_edit_seconds']:.2f} s, mean {result['mean_edit_seconds']:.2f} s; "
          f"worst forget {result['max_test_forget_accuracy']:.4f}, largest retain drop {result['max_retain_drop']:.4f}")
    out = Path(args.out) if args.out else RESULTS / f"edit_time_{recipe.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
