"""Optional recipe sections (``[topology]``, ``[unlearning]``): run, aggregate, render, plot.

Each section registers a function that runs it for one seed from the
:class:`~koopman_hooks.recipes.runner.RunContext`, one that aggregates the per-seed results
for ``report.json``, one that renders Markdown lines, and one that draws its figure.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from koopman_hooks.recipes.config import section

SECTIONS: dict[str, Callable[[Any], Any]] = {}
AGGREGATORS: dict[str, Callable[[list[Any]], Any]] = {}
MARKDOWN: dict[str, Callable[[Any], list[str]]] = {}
FIGURES: dict[str, Callable[[Any, Path], Path]] = {}


def _register(name: str, run: Callable, aggregate: Callable, markdown: Callable, figure: Callable) -> None:
    SECTIONS[name], AGGREGATORS[name], MARKDOWN[name], FIGURES[name] = run, aggregate, markdown, figure


# ----------------------------------------------------------------------------- topology

_TOPOLOGY_LISTS = ("network_betti0", "network_betti1", "surrogate_betti0", "surrogate_betti1")
_TOPOLOGY_SCALARS = ("epsilon", "spearman_network", "spearman_surrogate", "final_betti0_relative_error", "seconds")


def run_topology(context: Any) -> dict[str, Any]:
    cfg = section(context.recipe, "topology")
    return context.probe.topology(
        context.loader(context.test_set, 500),
        n_points=cfg.get("n_points", 2000),
        layers=cfg.get("layers"),
        quantile=cfg.get("quantile", 0.99),
        k=cfg.get("k", 1),
        dims=tuple(cfg.get("dims", (0, 1))),
        per_class=cfg.get("per_class", False),
        seed=context.seed,
        metric=cfg.get("metric", "euclidean"),
        n_neighbors=cfg.get("n_neighbors", 10),
        variance=cfg.get("variance"),
    )


def aggregate_topology(runs: list[dict[str, Any]]) -> dict[str, Any]:
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
    out["per_seed"] = runs
    return out


def topology_markdown(topo: dict[str, Any]) -> list[str]:
    def row(values: list[float] | None) -> str:
        return " → ".join(f"{v:g}" for v in values) if values else "–"

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
        f"{row(topo.get('network_betti1'))} | {topo['spearman_network']:.3f} |",
        f"| surrogate steps 0..{topo['surrogate_steps'][-1]} | {row(topo.get('surrogate_betti0'))} | "
        f"{row(topo.get('surrogate_betti1'))} | {topo['spearman_surrogate']:.3f} |",
        "",
        f"Final β0, surrogate vs network's last layer: relative difference {topo['final_betti0_relative_error']:.3f}.",
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


_register("topology", run_topology, aggregate_topology, topology_markdown, topology_figure)


# ----------------------------------------------------------------------------- unlearning


def _unlearning() -> None:
    from koopman_hooks.recipes import unlearning_section as u

    _register("unlearning", u.run_unlearning, u.aggregate_unlearning, u.unlearning_markdown, u.unlearning_figure)


_unlearning()
