"""The MNIST and ResNet-18 recipes' models trained and probed on a GPU (``benchmarks/gpu_check.sh``).

For each: model training seconds, probe fit seconds (defaults, ``device="cuda"``), agreement on the
test set, one Koopman edit's seconds, and the peak GPU memory, to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from koopman_hooks import KoopmanProbe
from koopman_hooks.data import TensorLoader
from koopman_hooks.recipes import load_recipe
from koopman_hooks.recipes.builders import build_datasets
from koopman_hooks.training import train_classifier


def run(name: str, train_size: int | None, amp: str | None) -> dict[str, object]:
    recipe = load_recipe(name, [f"data.train_size={train_size}"] if train_size else [])
    assert recipe.probe is not None
    train, test, classes = build_datasets(recipe.data, 0, None)
    torch.manual_seed(0)
    model = recipe.model.build(classes).cuda()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_classifier(model, TensorLoader.from_dataset(train, recipe.train.batch_size, shuffle=True), recipe.train.epochs,
                     lr=recipe.train.lr, weight_decay=recipe.train.weight_decay, device="cuda", verbose=False)
    torch.cuda.synchronize()
    train_seconds = time.perf_counter() - start
    model.eval()
    probe = KoopmanProbe(model, list(recipe.probe.layers), amp=amp, verbose=False)  # type: ignore[arg-type]
    start = time.perf_counter()
    probe.fit(TensorLoader.from_dataset(train, 1024))
    torch.cuda.synchronize()
    fit_seconds = time.perf_counter() - start
    metrics = probe.evaluate(TensorLoader.from_dataset(test, 1000))
    stats = probe.unlearning_statistics(TensorLoader.from_dataset(train, 1000, limit=20000))
    start = time.perf_counter()
    edited = probe.unlearn(0, stats)
    torch.cuda.synchronize()
    return {"recipe": name, "amp": amp, "train_seconds": train_seconds, "fit_seconds": fit_seconds,
            "agreement": metrics["agreement"], "linear_agreement": metrics["linear_baseline"]["agreement"],
            "model_accuracy": metrics["model_accuracy"], "edit_seconds": time.perf_counter() - start,
            "edit_info_seconds": edited.info["edit_seconds"], "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20,
            "epochs_run": probe.fetch_model().info["epochs_run"], "train_amp": probe.fetch_model().info["train_amp"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/gpu.json")
    args = parser.parse_args()
    device = torch.cuda.get_device_name(0)
    rows: list[dict[str, object]] = []
    for name, amp in (("mnist", None), ("mnist_resnet18", None), ("mnist", "bf16")):
        rows.append(run(name, None, amp))
        print(json.dumps(rows[-1]), flush=True)
        # written after every run, so a run cut short by the time limit keeps what finished
        Path(args.out).write_text(json.dumps({"device": device, "torch": torch.__version__,
                                              "python": platform.python_version(), "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
