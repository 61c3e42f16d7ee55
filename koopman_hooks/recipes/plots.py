"""PNG figures for recipe reports (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np

from koopman_hooks.analysis.spectrum import koopman_spectrum
from koopman_hooks.analysis.trajectories import Trajectories, collect_trajectories
from koopman_hooks.core import distributed
from koopman_hooks.fitting.fitted import FittedProbe

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    from koopman_hooks.recipes.sections.base import RunContext


def seed_plots(context: RunContext, model_loss: Sequence[float], test_loader: Iterable[Any]) -> dict[str, Path]:
    """Training curves, eigenvalues of K, and 3-D PCA of network layers vs surrogate steps."""
    out = context.out_dir
    fitted = context.probe.fetch_model()
    layers = context.recipe.report.pca_layers or fitted.layers
    traj = collect_trajectories(fitted, test_loader, layers, n_samples=2000)  # every rank takes part
    paths = {"training_curves": out / "training_curves.png", "eigenvalues": out / "eigenvalues.png", "pca": out / "pca_3d.png"}
    if distributed.is_main():
        training_curves(model_loss, fitted.history, paths["training_curves"])
        eigenvalue_plot(fitted, paths["eigenvalues"])
        pca_plot(traj, paths["pca"])
    return paths


def training_curves(model_loss: Sequence[float], history: Sequence[dict[str, Any]], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(range(1, len(model_loss) + 1), model_loss)
    axes[0].set(title="model training", xlabel="epoch", ylabel="cross-entropy", yscale="log")
    keys = [k for k in history[0] if k != "epoch"] if history else []
    for key in keys:
        axes[1].plot([h["epoch"] + 1 for h in history], [h[key] for h in history], label=key)
    axes[1].set(title="Koopman autoencoder fit", xlabel="epoch", ylabel="loss (relative)", yscale="log")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def eigenvalue_plot(probe: FittedProbe, path: Path) -> Path:
    k = probe.autoencoder.operator.matrix()
    eig = koopman_spectrum(k).eigenvalues.numpy()
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    theta = np.linspace(0, 2 * np.pi, 400)
    ax.plot(np.cos(theta), np.sin(theta), color="0.6", lw=1)
    ax.scatter(eig.real, eig.imag, s=18, color="C3", zorder=3)
    ax.set(title=f"eigenvalues of K ({probe.config.operator}, {k.shape[0]}-D)", xlabel="Re", ylabel="Im", aspect="equal")
    ax.axhline(0, color="0.85", lw=0.8)
    ax.axvline(0, color="0.85", lw=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pca3(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:3].T if vt.shape[0] >= 3 else np.pad(x @ vt.T, ((0, 0), (0, 3 - vt.shape[0])))


def pca_plot(traj: Trajectories, path: Path) -> Path:
    """Top row: the network's layers; bottom row: the surrogate's steps, each in 3-D PCA."""
    net = [cloud.numpy() for cloud in traj.network.values()]
    steps = [cloud.numpy() for cloud in traj.surrogate]
    labels = traj.labels.numpy() if traj.labels is not None else np.zeros(len(net[0]))
    step_ids = np.unique(np.linspace(0, len(steps) - 1, num=min(len(steps), 6)).round().astype(int))
    cols = max(len(net), len(step_ids))
    fig = plt.figure(figsize=(2.6 * cols, 5.4))
    for row, (clouds, titles) in enumerate(
        ((net, list(traj.network)), ([steps[i] for i in step_ids], [f"surrogate step {i}" for i in step_ids]))
    ):
        for col, (cloud, title) in enumerate(zip(clouds, titles)):
            ax = fig.add_subplot(2, cols, row * cols + col + 1, projection="3d")
            p = _pca3(cloud)
            ax.scatter(p[:, 0], p[:, 1], p[:, 2], c=labels, cmap="tab10", s=2, vmin=0, vmax=9)
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_zticks([])
    fig.suptitle("3-D PCA: network layers (top) and Koopman surrogate steps (bottom)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
