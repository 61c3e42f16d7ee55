"""One process against two (torch.distributed, gloo, one thread each) on the MNIST recipe's fit.

Trains the MNIST recipe's model once (or loads ``--model``), then fits the recipe's probe with
defaults in one process, and in two processes that each stream half of the training set; both
are evaluated on the test set, for each of ``--seeds`` (the fit's own seed: where a fit stops is
a discrete decision, so one pair alone is noisy). Prints and saves wall times (the slowest
rank's, from a common barrier), agreement, epochs, each pair's ratio and the ratio of the summed
times to ``benchmarks/results/distributed_fit.json``.

    python benchmarks/distributed_fit.py [--train-size N] [--seeds 0 1 2] [--data-root PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from koopman_hooks import KoopmanProbe
from koopman_hooks.data import TensorLoader, load_mnist
from koopman_hooks.recipes import load_recipe
from koopman_hooks.training import train_classifier

RESULTS = Path(__file__).resolve().parent / "results"


def _data(root: str | None, train_size: int | None) -> tuple[Any, Any]:
    return load_mnist(True, root, limit=train_size, flatten=True), load_mnist(False, root, flatten=True)


def _fit(model: torch.nn.Module, layers: list[str], loader: TensorLoader, test: TensorLoader, seed: int) -> dict[str, float]:
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    probe = KoopmanProbe(model, layers, seed=seed, verbose=False).fit(loader)
    seconds = time.perf_counter() - start
    slowest = torch.tensor([seconds])
    if dist.is_initialized():
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    metrics = probe.evaluate(test)
    return {"fit_seconds": float(slowest), "agreement": metrics["agreement"], "epochs_run": probe.fetch_model().info["epochs_run"]}


def _worker(rank: int, world: int, folder: str, root: str | None, train_size: int | None, seeds: list[int]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{Path(folder) / 'store'}", rank=rank, world_size=world)
    try:
        recipe = load_recipe("mnist")
        model = recipe.model.build(10)
        model.load_state_dict(torch.load(Path(folder) / "model.pt"))
        model.eval()
        train, test = _data(root, train_size)
        x, y = train.tensors
        tx, ty = test.tensors
        assert recipe.probe is not None
        results = [_fit(model, list(recipe.probe.layers), TensorLoader(x[rank::world], y[rank::world], batch_size=512),
                        TensorLoader(tx[rank::world], ty[rank::world], batch_size=1000), seed) for seed in seeds]
        if rank == 0:
            (Path(folder) / "two.json").write_text(json.dumps(results))
        dist.barrier()  # no rank tears its connections down while another still works
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-size", type=int, default=None, help="first N training images (default: all 60,000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the fits' seeds (one pair each)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default=str(RESULTS / "distributed_fit.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = load_recipe("mnist")
    assert recipe.probe is not None
    train, test = _data(args.data_root, args.train_size)
    torch.manual_seed(0)
    model = recipe.model.build(10)
    train_classifier(model, TensorLoader.from_dataset(train, recipe.train.batch_size, shuffle=True), recipe.train.epochs,
                     lr=recipe.train.lr, weight_decay=recipe.train.weight_decay, verbose=False)
    model.eval()
    ones = []
    for seed in args.seeds:
        ones.append(_fit(model, list(recipe.probe.layers), TensorLoader.from_dataset(train, 512),
                         TensorLoader.from_dataset(test, 1000), seed))
        print(f"1 process,   seed {seed}: fit {ones[-1]['fit_seconds']:.1f} s, agreement {ones[-1]['agreement']:.4f}, "
              f"{ones[-1]['epochs_run']} epochs", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        torch.save(model.state_dict(), Path(folder) / "model.pt")
        mp.spawn(_worker, args=(2, folder, args.data_root, args.train_size, args.seeds), nprocs=2, join=True)
        twos = json.loads((Path(folder) / "two.json").read_text())
    pairs = []
    for seed, one, two in zip(args.seeds, ones, twos):
        pairs.append({"seed": seed, "one_process": one, "two_processes": two,
                      "wall_ratio": two["fit_seconds"] / one["fit_seconds"],
                      "agreement_gap_points": 100 * abs(two["agreement"] - one["agreement"])})
        print(f"2 processes, seed {seed}: fit {two['fit_seconds']:.1f} s, agreement {two['agreement']:.4f}, "
              f"{two['epochs_run']} epochs; ratio {pairs[-1]['wall_ratio']:.2f}", flush=True)
    result = {"train_size": len(train), "threads_per_process": 1, "pairs": pairs,
              "wall_ratio": sum(p["two_processes"]["fit_seconds"] for p in pairs)
              / sum(p["one_process"]["fit_seconds"] for p in pairs),
              "max_agreement_gap_points": max(p["agreement_gap_points"] for p in pairs)}
    print(f"ratio of the summed fit times {result['wall_ratio']:.2f}, "
          f"largest agreement gap {result['max_agreement_gap_points']:.2f} points")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
