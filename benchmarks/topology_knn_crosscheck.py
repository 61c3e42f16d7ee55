"""Cross-check a recipe run's topology with the scale-free kNN-graph count of Naitzat et al.

Reloads each seed's trained model and probe (``koopman_hooks.recipes.load_run``) and counts
β0 per class on each cloud's own k-nearest-neighbour graph (ε = 1 hop), for the network's
layers and the surrogate's steps, on the recipe's held-out data.

    python benchmarks/topology_knn_crosscheck.py recipes/yinyang.toml runs/yinyang --data-root ../shared/data

Prints one line per seed and writes ``benchmarks/results/topology_knn_<recipe>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from koopman_hooks.data import TensorLoader
from koopman_hooks.recipes import load_recipe, load_run
from koopman_hooks.recipes.builders import build_datasets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("run_dir", help="the recipe's --out folder (holds seed0/, seed1/, ...)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--n-neighbors", type=int, default=10)
    parser.add_argument("--n-points", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = load_recipe(args.recipe)
    layers = recipe.topology.layers if recipe.topology is not None else None
    results = []
    for seed_dir in sorted(Path(args.run_dir).glob("seed*")):
        seed = int(seed_dir.name.removeprefix("seed"))
        _, probe = load_run(seed_dir)
        _, test_set, _ = build_datasets(recipe.data, seed, args.data_root)
        topo = probe.topology(TensorLoader.from_dataset(test_set, 500), n_points=args.n_points, layers=layers,
                              dims=(0,), per_class=True, metric="knn", n_neighbors=args.n_neighbors, seed=seed)
        row = {key: topo[key] for key in ("network_layers", "network_betti0", "surrogate_betti0", "spearman_network",
                                          "spearman_surrogate", "final_betti0_relative_error", "seconds")}
        row["seed"] = seed
        results.append(row)
        print(f"seed {seed}: network {row['network_betti0']}  surrogate {row['surrogate_betti0']}  "
              f"final relative difference {row['final_betti0_relative_error']:.3f}  ({row['seconds']:.1f} s)")
    out = Path(__file__).parent / "results" / f"topology_knn_{recipe.name}.json"
    out.write_text(json.dumps({"recipe": recipe.name, "n_neighbors": args.n_neighbors, "runs": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
