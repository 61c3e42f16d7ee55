"""Tests of koopman_hooks/core/distributed.py: a fit, an evaluation and unlearning statistics spread
over two gloo processes on 127.0.0.1 equal the single-process results on the union of the shards.

The ranks meet through a file store in the test's folder (no port to pick, no TCP store server);
each rank's stderr goes to a file there, shown when a rank dies."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from koopman_hooks import KoopmanProbe
from koopman_hooks.core.distributed import average_parameters
from koopman_hooks.data import TensorLoader, YinYangDataset
from koopman_hooks.models import ResMLP
from koopman_hooks.training import train_classifier
from koopman_hooks.unlearning.statistics import collect_statistics

LAYERS = ["blocks.0", "blocks.2"]
OPTIONS = dict(verbose=False, seed=3)


def _data() -> tuple[YinYangDataset, YinYangDataset]:
    return YinYangDataset(2400, seed=0), YinYangDataset(800, seed=1)


def _shard(dataset: YinYangDataset, rank: int, world: int, batch: int) -> TensorLoader:
    return TensorLoader(dataset.inputs[rank::world], dataset.targets[rank::world], batch_size=batch)


def _model(state: dict[str, torch.Tensor]) -> ResMLP:
    model = ResMLP(4, 3, width=10, depth=3)
    model.load_state_dict(state)
    return model.eval()


def _figures(metrics: dict) -> dict:
    return {"model_accuracy": metrics["model_accuracy"], "agreement": metrics["agreement"],
            "linear": metrics["linear_baseline"]["agreement"], "state_fvu": metrics["state_fvu"],
            "latent_fvu": metrics["latent_fvu"], "n": metrics["n_samples"]}


def _averaged_parameters(rank: int) -> list[torch.Tensor]:
    """Parameters of two dtypes, rank-dependent, averaged over ranks in one call."""
    params = [torch.nn.Parameter(_rank_value(rank, (3, 2), torch.float32, 0)),
              torch.nn.Parameter(_rank_value(rank, (4,), torch.float64, 1))]
    average_parameters(params)
    return [p.detach().clone() for p in params]


def _rank_value(rank: int, shape: tuple[int, ...], dtype: torch.dtype, i: int) -> torch.Tensor:
    return (rank + 1) * (i + 1) + rank * torch.arange(torch.Size(shape).numel(), dtype=dtype).reshape(shape)


def _worker(rank: int, world: int, store: str, folder: str) -> None:
    out = Path(folder)
    with open(out / f"stderr_{rank}.txt", "w") as log:  # a C++ abort's message lands here too
        os.dup2(log.fileno(), 2)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        train, test = _data()
        model = _model(torch.load(out / "model.pt"))
        probe = KoopmanProbe(model, LAYERS, **OPTIONS).fit(_shard(train, rank, world, 100), epochs=60)
        probe.save(out / f"fitted_{rank}.safetensors")  # only rank 0 writes
        # with every row a fit row, the closed-form statistics see exactly the union's rows
        exact = KoopmanProbe(model, LAYERS, val_fraction=0.0, **OPTIONS).fit(_shard(train, rank, world, 100), epochs=1)
        fitted = exact.fetch_model()
        # the single-process probe, loaded on every rank: statistics and figures over the shards
        single = KoopmanProbe.load(out / "single.safetensors", model, verbose=False)
        stats = collect_statistics(single.fetch_model(), _shard(train, rank, world, 100), [2], metric="euclidean")
        result = {
            "adapters": {n: (a.mean, a.basis, a.scale) for n, a in fitted.adapters.items()},
            "baselines": fitted.baselines,
            "fitted_figures": _figures(probe.evaluate(_shard(test, rank, world, 100))),
            "single_figures": _figures(single.evaluate(_shard(test, rank, world, 100))),
            "groups": {k: (m.n, m.mean_x, m.cov_xx) for k, m in stats.groups.items()},
            "starts": {k: (m.n, m.mean_x) for k, m in stats.start.items()},
            "operator": fitted.autoencoder.operator.matrix().detach(),
            "info": {k: probe.fetch_model().info[k] for k in ("epochs_run", "kept_epoch", "stopped_because")},
        }
        result["averaged"] = _averaged_parameters(rank)
        # rank 1's evaluation shard empty: the figures are rank 0's rows', on both ranks
        shard = _shard(test, rank, world, 100) if rank == 0 else TensorLoader(test.inputs[:0], test.targets[:0])
        result["one_shard"] = {"evaluate": _figures(single.evaluate(shard)),
                               "topology_points": single.topology(shard, n_points=200, dims=(0,))["n_points"]}
        result["refusals"] = {}
        for case, rows in (("empty", 0), ("one row", 1)):  # rank 1's shard: every rank must refuse alike
            shard = _shard(train, rank, world, 100) if rank == 0 else TensorLoader(
                train.inputs[:rows], train.targets[:rows], batch_size=100)
            try:
                KoopmanProbe(model, LAYERS, **OPTIONS).fit(shard, epochs=1)
                result["refusals"][case] = None
            except ValueError as err:  # EmptyLoaderError is one
                result["refusals"][case] = f"{type(err).__name__}: {err}"
        torch.save(result, out / f"result_{rank}.pt")
        dist.barrier()  # no rank tears its connections down while another still works
    finally:
        dist.destroy_process_group()


def _stderr(folder: Path) -> str:
    return "\n".join(f"--- rank {r} stderr (last 3000 characters):\n"
                     + (folder / f"stderr_{r}.txt").read_text(errors="replace")[-3000:]
                     for r in range(2) if (folder / f"stderr_{r}.txt").exists())


def _spawn(folder: Path) -> None:
    """Runs both ranks. A Python error in a worker fails at once; a rank killed by a signal (an
    abort in gloo's C++ transport, outside Python) gets one more try on a fresh store, and its
    stderr is shown either way."""
    for attempt in (1, 2):
        try:
            mp.spawn(_worker, args=(2, str(folder / f"store_{attempt}"), str(folder)), nprocs=2, join=True)
            return
        except mp.ProcessExitedException as err:
            if attempt == 2:
                raise AssertionError(f"{err}\n{_stderr(folder)}") from err
            warnings.warn(f"a distributed rank died, trying once more: {err}\n{_stderr(folder)}", stacklevel=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    train, test = _data()
    model = ResMLP(4, 3, width=10, depth=3)
    train_classifier(model, TensorLoader(train.inputs, train.targets, batch_size=64, shuffle=True), 12, lr=1e-2, verbose=False)
    model.eval()
    torch.save(model.state_dict(), folder / "model.pt")
    single = KoopmanProbe(model, LAYERS, **OPTIONS).fit(_shard(train, 0, 1, 100), epochs=60)
    single.save(folder / "single.safetensors")
    exact = KoopmanProbe(model, LAYERS, val_fraction=0.0, **OPTIONS).fit(_shard(train, 0, 1, 100), epochs=1)
    reference = {
        "fitted": exact.fetch_model(),
        "figures": _figures(single.evaluate(_shard(test, 0, 1, 100))),
        "info": {k: single.fetch_model().info[k] for k in ("epochs_run", "kept_epoch", "stopped_because")},
        "stats": collect_statistics(single.fetch_model(), _shard(train, 0, 1, 100), [2], metric="euclidean"),
    }
    _spawn(folder)
    ranks = [torch.load(folder / f"result_{r}.pt", weights_only=False) for r in range(2)]
    return {"folder": folder, "reference": reference, "ranks": ranks}


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    return bool((a.double() - b.double()).abs().max() <= rtol * max(float(b.double().abs().max()), 1e-12))


def test_streaming_statistics_equal_the_single_process_ones(runs):
    fitted = runs["reference"]["fitted"]
    for result in runs["ranks"]:  # every rank holds the same, exact statistics of the union
        for name, (mean, basis, scale) in result["adapters"].items():
            adapter = fitted.adapters[name]
            assert close(mean, adapter.mean) and close(scale, adapter.scale)
            assert close(basis, adapter.basis, rtol=1e-4)
        for name, (weight, bias) in result["baselines"].items():
            assert close(weight, fitted.baselines[name][0], rtol=1e-4)
            assert (bias - fitted.baselines[name][1]).abs().max() <= 1e-6  # zero up to float noise: centred states
    torch.testing.assert_close(runs["ranks"][0]["operator"], runs["ranks"][1]["operator"])  # one model on every rank


def test_fidelity_counts_and_group_statistics_equal_the_single_process_ones(runs):
    reference, stats = runs["reference"]["figures"], runs["reference"]["stats"]
    for result in runs["ranks"]:
        figures = result["single_figures"]
        assert figures["n"] == reference["n"]
        for key in ("model_accuracy", "agreement", "linear"):
            assert figures[key] == reference[key], key  # the same counts, summed over the shards
        for key in ("state_fvu", "latent_fvu"):
            assert abs(figures[key] - reference[key]) <= 1e-5 * abs(reference[key]), key
        assert set(result["groups"]) == set(stats.groups)
        for key, (n, mean, cov) in result["groups"].items():
            assert n == stats.groups[key].n
            assert close(mean, stats.groups[key].mean_x) and close(cov, stats.groups[key].cov_xx)
            assert result["starts"][key][0] == stats.start[key].n and close(result["starts"][key][1], stats.start[key].mean_x)


def test_the_distributed_fit_is_as_faithful_and_only_rank_0_writes(runs):
    reference = runs["reference"]["figures"]
    for result in runs["ranks"]:
        gap = abs(result["fitted_figures"]["agreement"] - reference["agreement"])
        assert gap <= 0.005 + 1e-9, (result["info"], runs["reference"]["info"])
    assert (runs["folder"] / "fitted_0.safetensors").exists()
    assert not (runs["folder"] / "fitted_1.safetensors").exists()


def test_parameters_are_averaged_over_ranks(runs):
    shapes = [((3, 2), torch.float32), ((4,), torch.float64)]
    for result in runs["ranks"]:
        for i, ((shape, dtype), value) in enumerate(zip(shapes, result["averaged"])):
            expected = (_rank_value(0, shape, dtype, i) + _rank_value(1, shape, dtype, i)) / 2
            assert value.dtype == dtype and torch.allclose(value, expected, rtol=0, atol=1e-6)


def test_a_shard_without_batches_or_rows_is_refused_on_every_rank(runs):
    refusals = [r["refusals"] for r in runs["ranks"]]
    assert refusals[0] == refusals[1]  # the same error on both ranks: none waits for the other
    assert refusals[0]["empty"].startswith("EmptyLoaderError: the loader of rank(s) [1] yielded no batches")
    assert refusals[0]["one row"].startswith("ValueError: rank(s) [1] hold fewer than two training rows")


def test_an_empty_evaluation_shard_leaves_the_other_ranks_figures(runs):
    one = [r["one_shard"] for r in runs["ranks"]]
    assert one[0] == one[1]  # every rank holds the same result, from rank 0's 400 rows
    assert one[0]["evaluate"]["n"] == 400 and one[0]["topology_points"] == 200
