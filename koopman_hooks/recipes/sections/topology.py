"""The ``[topology]`` section: Betti numbers of the network's layers next to the surrogate's steps."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from koopman_hooks.recipes.config import Recipe
from koopman_hooks.recipes.sections.base import RunContext

# ----------------------------------------------------------------------------- topology

_TOPOLOGY_LISTS = ("network_betti0", "network_betti1", "surrogate_betti0", "surrogate_betti1")
_TOPOLOGY_SCALARS = ("epsilon", "spearman_network", "spearman_surrogate", "start_betti0_relative_error",
                     "final_betti0_relative_error", "seconds")


def run_topology(context: RunContext) -> dict[str, Any]:
    cfg = context.recipe.topology
    assert cfg is not None
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("n_points", "layers")}
    return context.probe.topology(context.loader(context.test_set, 500, shard=True), cfg.n_points, cfg.layers, seed=context.seed,
                                  **options)


def aggregate_topology(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"network_layers": runs[0]["network_layers"], "surrogate_steps": runs[0]["surrogate_steps"]}
    for key in _TOPOLOGY_SCALARS:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
        if len(values) > 1:
            out[f"{key}_range"] = [float(min(values)), float(max(values))]
    for key in _TOPOLOGY_LISTS:
        rows = [r[key] for r in runs if r.get(key) is not None]
        if rows:
            arr = np.asarray(rows, dtype=float)
            out[key] = arr.mean(0).tolist()
            out[f"{key}_min"], out[f"{key}_max"] = arr.min(0).tolist(), arr.max(0).tolist()
    out["per_seed"] = list(runs)
    return out


def topology_markdown(topo: dict[str, Any]) -> list[str]:
    def row(values: list[float] | None) -> str:
        return " → ".join(f"{v:g}" for v in values) if values else "–"

    def figure(value: float | None) -> str:  # None: not counted (e.g. a probed layer left out of `layers`)
        return "–" if value is None else f"{value:.3f}"

    first = topo["per_seed"][0]
    if first.get("metric") == "knn":
        scale = (f"ε = {topo['epsilon']:.4g} hop on each cloud's own {first['epsilon_rule']['n_neighbors']}-nearest-"
                 "neighbour graph (Naitzat et al.; scale-free, so β0 counts the graph's components)")
    else:
        scale = f"ε = {topo['epsilon']:.4g} for every cloud (each centred and scaled to unit RMS)"
    if first.get("variance"):
        scale = (f"each cloud reduced to the principal components holding {100 * first['variance']:g}% of its "
                 f"variance, then {scale}")
    counted = "counted per class and summed over classes" if first.get("count") == "sum over classes" else "pooled"
    return [
        "## Topology (Betti numbers at one scale)",
        "",
        f"{scale}; {first['n_points']} samples, {counted}. Means over seeds.",
        "",
        "| sequence | β0 | β1 | Spearman(step, β0) |",
        "|---|---|---|---|",
        f"| network ({', '.join(topo['network_layers'])}) | {row(topo.get('network_betti0'))} | "
        f"{row(topo.get('network_betti1'))} | {figure(topo.get('spearman_network'))} |",
        f"| surrogate steps 0..{topo['surrogate_steps'][-1]} | {row(topo.get('surrogate_betti0'))} | "
        f"{row(topo.get('surrogate_betti1'))} | {figure(topo.get('spearman_surrogate'))} |",
        "",
        f"β0, surrogate vs network: relative difference {figure(topo.get('start_betti0_relative_error'))} at the start "
        f"(step 0 vs the first probed layer), {figure(topo.get('final_betti0_relative_error'))} at the end (step k vs "
        "the last).",
        "",
    ]


def topology_figure(topo: dict[str, Any], out: Path) -> Path:
    import matplotlib.pyplot as plt

    dims = [d for d in (0, 1) if topo.get(f"network_betti{d}")]
    fig, axes = plt.subplots(1, len(dims), figsize=(5.2 * len(dims), 3.8), squeeze=False)
    net_x = np.linspace(0, 1, len(topo["network_layers"]))
    sur_x = np.linspace(0, 1, len(topo["surrogate_steps"]))
    for ax, d in zip(axes[0], dims):
        for name, x, color in (("network", net_x, "C0"), ("surrogate", sur_x, "C3")):
            mean = topo[f"{name}_betti{d}"]
            ax.plot(x, mean, "o-", color=color, label=name, ms=4)
            if len(topo["per_seed"]) > 1:
                ax.fill_between(x, topo[f"{name}_betti{d}_min"], topo[f"{name}_betti{d}_max"], color=color, alpha=0.2)
        unit = " hop (kNN graph)" if topo["per_seed"][0].get("metric") == "knn" else ""
        ax.set(title=f"β{d} at ε = {topo['epsilon']:.3g}{unit}", xlabel="depth (first probed layer → last)", ylabel=f"β{d}")
        ax.set_xticks(net_x, topo["network_layers"], rotation=30, fontsize=7)
        ax.legend()
    fig.tight_layout()
    path = out / "topology.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class Topology:
    """``probe.topology`` on the test set, per seed; means and ranges over seeds."""

    name = "topology"

    def enabled(self, recipe: Recipe) -> bool:
        return recipe.topology is not None

    def run(self, context: RunContext) -> dict[str, Any]:
        return {"topology": run_topology(context)}

    def target_names(self, recipe: Recipe, layers: Sequence[str]) -> list[str]:
        return [f"topology.{key}" for key in _TOPOLOGY_SCALARS]

    def aggregate(self, runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {"topology": aggregate_topology([r["topology"] for r in runs])}

    def markdown(self, report: Mapping[str, Any]) -> list[str]:
        return topology_markdown(report["topology"])

    def figures(self, report: Mapping[str, Any], out: Path) -> dict[str, Path]:
        return {"topology": topology_figure(report["topology"], out)}
