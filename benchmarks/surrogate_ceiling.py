"""How well can any regressor fitted on the probe's data map a zoo model's first probed layer to its last?

The zoo's ViT entry (``benchmarks/zoo.py``) misses the 0.97 agreement target with defaults. This
asks whether the Koopman surrogate or the data is the limit: on the same model and the same fit
rows, scikit-learn regressors map the *whole* first probed layer (every token, no PCA) to the last
probed layer's reduced state (the CLS token the head reads), and each prediction is put back into
the model (a forward hook on the last probed layer replaces that token) to score agreement with the
model on the zoo's test images, as the probe's agreement is scored. Next to them: the probe with
defaults on the same rows (the zoo's figure) and on more inputs of the same distribution (MNIST
training images the model never trained on). One thread.

    python benchmarks/surrogate_ceiling.py [--data-root PATH] [--out benchmarks/results/surrogate_ceiling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from zoo import _mnist, vit

from koopman_hooks import KoopmanProbe
from koopman_hooks.core.hooks import hooked
from koopman_hooks.data import TensorLoader

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0


def _layer_states(model: nn.Module, loader: Iterable[Any], src: str, dst: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``src``'s whole output (flattened), ``dst``'s CLS token and the model's predictions, row by row."""
    found: dict[str, list[torch.Tensor]] = {src: [], dst: []}
    hooks = {src: lambda m, a, out: found[src].append(out.detach().flatten(1)),
             dst: lambda m, a, out: found[dst].append(out.detach()[:, 0])}
    predictions = []
    with hooked(model, hooks), torch.no_grad():
        for inputs, _ in loader:
            predictions.append(model(inputs).argmax(1))
    return torch.cat(found[src]).numpy(), torch.cat(found[dst]).numpy(), torch.cat(predictions).numpy()


def _agreement_with_cls(model: nn.Module, images: torch.Tensor, dst: str, cls: np.ndarray, predictions: np.ndarray) -> float:
    """Agreement with the model when ``dst``'s CLS token is replaced by ``cls`` (row for row)."""
    replacement = torch.as_tensor(cls, dtype=torch.float32)

    def replace(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, 0] = replacement
        return out

    with hooked(model, {dst: replace}), torch.no_grad():
        patched = model(images).argmax(1).numpy()
    return float(np.mean(patched == predictions))


def _fvu(predicted: np.ndarray, target: np.ndarray) -> float:
    return float(np.sum((predicted - target) ** 2) / np.sum((target - target.mean(0)) ** 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None, help="MNIST in torchvision's layout (default: $KOOPMAN_HOOKS_DATA)")
    parser.add_argument("--more", type=int, default=40000, help="MNIST training images for the probe fitted on more inputs")
    parser.add_argument("--out", default=str(RESULTS / "surrogate_ceiling.json"))
    args = parser.parse_args()
    if args.data_root:
        os.environ["KOOPMAN_HOOKS_DATA"] = args.data_root
    torch.set_num_threads(1)
    model, layers, fit_loader, test_loader, extra = vit(False)
    model.eval()
    src, dst = layers[0], layers[-1]
    x_fit, y_fit, _ = _layer_states(model, TensorLoader(*fit_loader.tensors, batch_size=500), src, dst)
    test_images = test_loader.tensors[0]
    x_test, y_test, p_test = _layer_states(model, test_loader, src, dst)
    rows: list[dict[str, Any]] = []

    def record(name: str, predicted: np.ndarray, seconds: float) -> None:
        rows.append({"surrogate": name, "test_agreement": _agreement_with_cls(model, test_images, dst, predicted, p_test),
                     "test_state_fvu": _fvu(predicted, y_test), "fit_seconds": seconds})
        print(f"{name:>44}: test agreement {rows[-1]['test_agreement']:.4f}, state FVU {rows[-1]['test_state_fvu']:.3f} "
              f"({seconds:.1f} s)", flush=True)

    regressors: dict[str, Any] = {
        "ridge, 256 principal components": make_pipeline(StandardScaler(), PCA(256, random_state=SEED), Ridge(1.0)),
        f"ridge, all {x_fit.shape[1]} features": make_pipeline(StandardScaler(), Ridge(1.0)),
        f"MLP (512 hidden), all {x_fit.shape[1]} features": make_pipeline(
            StandardScaler(), MLPRegressor((512,), alpha=1e-4, early_stopping=True, max_iter=200, random_state=SEED)),
    }
    for name, regressor in regressors.items():
        start = time.perf_counter()
        regressor.fit(x_fit, y_fit)
        record(name, regressor.predict(x_test), time.perf_counter() - start)
    probes = {f"Koopman probe, defaults, the zoo's {len(x_fit)} rows": fit_loader}
    images, labels, _, _ = _mnist(args.more, 10, flatten=False)
    probes[f"Koopman probe, defaults, {args.more} MNIST training images"] = TensorLoader(images, labels, batch_size=128, shuffle=True)
    for name, loader in probes.items():
        probe = KoopmanProbe(model, layers, verbose=False, seed=SEED)
        start = time.perf_counter()
        probe.fit(loader)
        seconds = time.perf_counter() - start
        metrics = probe.evaluate(test_loader)
        rows.append({"surrogate": name, "test_agreement": metrics["agreement"], "test_state_fvu": metrics["state_fvu_per_layer"][dst],
                     "fit_seconds": seconds, "fit_samples": probe.fetch_model().info["fit_samples"]})
        print(f"{name:>44}: test agreement {rows[-1]['test_agreement']:.4f}, state FVU {rows[-1]['test_state_fvu']:.3f} "
              f"({seconds:.1f} s, {rows[-1]['fit_samples']} rows)", flush=True)
    result = {"model": "zoo vit", "layers": [src, dst], "fit_rows": len(x_fit), "test_rows": len(x_test),
              "model_accuracy_test": float(np.mean(p_test == test_loader.tensors[1].numpy())),
              "threads": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__, "seed": SEED,
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
