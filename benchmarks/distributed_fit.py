"""One process against two (torch.distributed, gloo, one thread each) on the MNIST recipe's fit.

Trains the MNIST recipe's model once (or loads ``--model``), then fits the recipe's probe with
defaults in one process, and in two processes that each stream half of the training set; both
are evaluated on the test set. Prints and saves wall times (the slowest rank's, from a common
barrier), agreement and the ratio to ``benchmarks/results/distributed_fit.json``.

    python benchmarks/distributed_fit.py [--train-size N] [--data-root PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
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


def _fit(model: torch.nn.Module, layers: list[str], loader: TensorLoader, test: TensorLoader) -> dict[str, float]:
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    probe = KoopmanProbe(model, layers, verbose=False).fit(loader)
    seconds = time.perf_counter() - start
    slowest = torch.tensor([seconds])
    if dist.is_initialized():
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    metrics = probe.evaluate(test)
    return {"fit_seconds": float(slowest), "agreement": metrics["agreement"], "epochs_run": probe.fetch_model().info["epochs_run"]}


def _worker(rank: int, world: int, port: int, folder: str, root: str | None, train_size: int | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        recipe = load_recipe("mnist")
        model = recipe.model.build(10)
        model.load_state_dict(torch.load(Path(folder) / "model.pt"))
        model.eval()
        train, test = _data(root, train_size)
        x, y = train.tensors
        tx, ty = test.tensors
        assert recipe.probe is not None
        result = _fit(model, list(recipe.probe.layers), TensorLoader(x[rank::world], y[rank::world], batch_size=512),
                      TensorLoader(tx[rank::world], ty[rank::world], batch_size=1000))
        if rank == 0:
            (Path(folder) / "two.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-size", type=int, default=None, help="first N training images (default: all 60,000)")
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
    one = _fit(model, list(recipe.probe.layers), TensorLoader.from_dataset(train, 512), TensorLoader.from_dataset(test, 1000))
    print(f"1 process : fit {one['fit_seconds']:.1f} s, agreement {one['agreement']:.4f}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        torch.save(model.state_dict(), Path(folder) / "model.pt")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_worker, args=(2, port, folder, args.data_root, args.train_size), nprocs=2, join=True)
        two = json.loads((Path(folder) / "two.json").read_text())
    print(f"2 processes: fit {two['fit_seconds']:.1f} s, agreement {two['agreement']:.4f}", flush=True)
    result = {"train_size": len(train), "one_process": one, "two_processes": two,
              "wall_ratio": two["fit_seconds"] / one["fit_seconds"],
              "agreement_gap_points": 100 * abs(two["agreement"] - one["agreement"]), "threads_per_process": 1}
    print(f"ratio {result['wall_ratio']:.2f}, agreement gap {result['agreement_gap_points']:.2f} points")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
