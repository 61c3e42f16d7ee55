"""What a probe costs next to what it replaces, for every recipe model, in one process and run.

For each recipe (Yin-Yang, MNIST ResMLP, ResNet-18, ViT; the recipe's data, model and training
settings): the model's training seconds, retraining without class 0, the probe's fit seconds
(the recipe's probe: defaults on its first ``samples`` training images) and model passes, one
class's Koopman edit with the recipe's edit options and statistics, the latency of the
original and the patched (fast path) model on batches of 256, and the multiply-adds per sample
of the surrogate and of the modules it replaces. Then the fit's peak RSS on 10,000, 30,000 and
60,000 MNIST samples, each in a fresh process, three times (the median; Linux: the peak is reset
once the data is loaded; the state cache fills up to 16,384 + 5,000 rows, so it grows up to
~21,000 samples and is flat beyond). Everything runs on one thread; ratios are side by side.

    python benchmarks/fit_cost.py [--only yinyang mnist ...] [--data-root PATH] [--skip-rss]
    python benchmarks/fit_cost.py --latency-only --out benchmarks/results/latency.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from koopman_hooks import KoopmanProbe
from koopman_hooks.data import TensorLoader
from koopman_hooks.recipes import load_recipe
from koopman_hooks.recipes.builders import build_datasets
from koopman_hooks.training import train_classifier
from koopman_hooks.unlearning import class_subsets

RESULTS = Path(__file__).resolve().parent / "results"
RECIPES = ["yinyang", "mnist", "mnist_resnet18", "mnist_vit"]


def _latency(module: torch.nn.Module, x: torch.Tensor, repeats: int = 15, block_seconds: float = 0.2) -> float:
    """Seconds per call: the fastest of ``repeats`` blocks of calls, each at least
    ``block_seconds`` long (the minimum is the least disturbed by other jobs on the machine)."""
    with torch.no_grad():
        module(x)  # warm-up (and the patched model's one-time calibration)
        start = time.perf_counter()
        module(x)
        calls = max(1, int(block_seconds / max(time.perf_counter() - start, 1e-6)))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                module(x)
            times.append((time.perf_counter() - start) / calls)
    return min(times)


def _latency_figures(model: torch.nn.Module, probe: KoopmanProbe, test_set: Any) -> dict[str, Any]:
    """Original against patched (fast path) latency on a batch of 256 test inputs, and the sizes."""
    x = TensorLoader.from_dataset(test_set, 256).tensors[0][:256]
    patched = probe.patch()
    original_latency, patched_latency = _latency(model, x), _latency(patched, x)
    sizes = probe.fetch_model().sizes
    assert sizes is not None
    return {
        "original_latency_ms": 1000 * original_latency, "patched_latency_ms": 1000 * patched_latency,
        "patched_over_original": patched_latency / original_latency, "patched_path": patched.path,
        "skipped_modules": patched.skipped_modules,
        "surrogate_macs": sizes.surrogate_macs, "replaced_macs": sizes.replaced_macs,
    }


def latency_only(name: str, data_root: str | None, samples: int = 2000) -> dict[str, Any]:
    """Patched against original latency without training: the model as built (latency depends on
    the architecture, not the weights) and a one-epoch probe on ``samples`` training images. The
    fast path is still checked against the full one on a real batch before it is used."""
    recipe = load_recipe(name)
    assert recipe.probe is not None
    train_set, test_set, classes = build_datasets(recipe.data, 0, data_root)
    torch.manual_seed(0)
    model = recipe.model.build(classes).eval()
    probe = KoopmanProbe(model, list(recipe.probe.layers), verbose=False)
    probe.fit(TensorLoader.from_dataset(train_set, 256, limit=samples), epochs=1)
    return {"recipe": name, "weights": "untrained (as built)", **_latency_figures(model, probe, test_set)}


def run(name: str, data_root: str | None) -> dict[str, Any]:
    recipe = load_recipe(name)
    assert recipe.probe is not None
    train_set, test_set, classes = build_datasets(recipe.data, 0, data_root)
    settings = recipe.train

    def trained(dataset: Any) -> tuple[torch.nn.Module, float]:
        torch.manual_seed(0)
        model = recipe.model.build(classes)
        start = time.perf_counter()
        train_classifier(model, TensorLoader.from_dataset(dataset, settings.batch_size, shuffle=True), settings.epochs,
                         lr=settings.lr, weight_decay=settings.weight_decay, verbose=False, augment=settings.augment(0))
        return model.eval(), time.perf_counter() - start

    model, train_seconds = trained(train_set)
    _, retrain_seconds = trained(class_subsets(train_set, 0)[0])
    # the recipe's probe: its options and its first `samples` training images (all when it sets none)
    probe = KoopmanProbe(model, list(recipe.probe.layers), verbose=False, **recipe.probe.options)
    start = time.perf_counter()
    keep = recipe.unlearning is not None and recipe.unlearning.statistics_from == "fit_cache"
    probe.fit(TensorLoader.from_dataset(train_set, 512, limit=recipe.probe.samples), epochs=recipe.probe.epochs, keep_cache=keep)
    fit_seconds = time.perf_counter() - start
    fitted = probe.fetch_model()
    metrics = probe.evaluate(TensorLoader.from_dataset(test_set, 1000))
    # the recipe's edit options (the default edit where it has none); the statistics from the fit's
    # cached rows where the recipe reads them there, else streamed from its first 20,000 training images
    edit_options = recipe.unlearning.options if recipe.unlearning is not None else {}
    stats_loader = None if keep else TensorLoader.from_dataset(train_set, 1000, limit=20000)
    stats = probe.unlearning_statistics(stats_loader, **edit_options)
    edited = probe.unlearn(0, stats, **edit_options)
    sizes = fitted.sizes
    assert sizes is not None
    return {
        "recipe": name, "model_train_seconds": train_seconds, "retrain_without_class_seconds": retrain_seconds,
        "fit_seconds": fit_seconds, "fit_over_training": fit_seconds / train_seconds,
        "fit_samples": recipe.probe.samples, "edit_options": dict(edit_options), "statistics_from": "fit_cache" if keep else "data",
        "model_passes": fitted.info["model_passes"], "epochs_run": fitted.info["epochs_run"],
        "agreement": metrics["agreement"], "linear_agreement": metrics["linear_baseline"]["agreement"],
        "edit_seconds": edited.info["edit_seconds"], "stats_seconds": stats.seconds,
        "fit_plus_edit_over_retrain": (fit_seconds + edited.info["edit_seconds"] + stats.seconds) / retrain_seconds,
        **_latency_figures(model, probe, test_set),
        "sizes": {"width": sizes.width, "latent_dim": sizes.latent_dim, "hidden": list(sizes.hidden), "steps": list(sizes.steps)},
    }


RSS_SAMPLES = (10_000, 30_000, 60_000)
RSS_CHILD = r"""
import gc, json, sys, torch
torch.set_num_threads(1)
from koopman_hooks import KoopmanProbe
from koopman_hooks.data import TensorLoader, load_mnist
from koopman_hooks.recipes import load_recipe

def status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)

n, root = int(sys.argv[1]), (sys.argv[2] or None)
recipe = load_recipe("mnist")
torch.manual_seed(0)
model = recipe.model.build(10).eval()
data = load_mnist(True, root, limit=n, flatten=True)
loader = TensorLoader.from_dataset(data, 512)
gc.collect()
before = status_mb("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak (VmHWM) to the current RSS
    f.write("5")
KoopmanProbe(model, list(recipe.probe.layers), verbose=False).fit(loader, epochs=3)
after = status_mb("VmHWM")
print(json.dumps({"samples": n, "rss_mb_before_fit": before, "peak_rss_mb_during_fit": after}))
"""


def rss(data_root: str | None, repeats: int = 3) -> list[dict[str, Any]]:
    """Each size ``repeats`` times, in fresh processes, sizes interleaved; per size the run with
    the median growth (what the fit adds moves by several MB between identical runs)."""
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in RSS_SAMPLES}
    for _ in range(repeats):
        for n in RSS_SAMPLES:
            out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(n), data_root or ""], capture_output=True,
                                 text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["fit_growth_mb"] = row["peak_rss_mb_during_fit"] - row["rss_mb_before_fit"]
            runs[n].append(row)
    rows = []
    for n, found in runs.items():
        row = sorted(found, key=lambda r: r["fit_growth_mb"])[len(found) // 2]
        row["fit_growth_mb_runs"] = [r["fit_growth_mb"] for r in found]
        rows.append(row)
        print(f"{n:>6d} MNIST samples: RSS {row['rss_mb_before_fit']:.0f} MB with the data loaded, peak "
              f"{row['peak_rss_mb_during_fit']:.0f} MB during the fit (the fit added {row['fit_growth_mb']:.0f} MB; "
              f"runs: {', '.join(f'{g:.0f}' for g in row['fit_growth_mb_runs'])})", flush=True)
    return rows


def memory_figures(memory: list[dict[str, Any]]) -> dict[str, Any]:
    """The rows, what the fit itself adds (the data set's own tensor grows with n whatever the
    fit does) and the peak, from 10k (and 30k) to 60k samples."""
    first, middle, last = memory
    return {"rss": memory,
            "fit_memory_growth_10k_to_60k": last["fit_growth_mb"] / first["fit_growth_mb"] - 1,
            "fit_memory_growth_30k_to_60k": last["fit_growth_mb"] / middle["fit_growth_mb"] - 1,
            "peak_rss_growth_10k_to_60k": last["peak_rss_mb_during_fit"] / first["peak_rss_mb_during_fit"] - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--rss-only", action="store_true",
                        help="only the fit's memory at 10k/30k/60k samples, replacing those figures in --out")
    parser.add_argument("--latency-only", action="store_true",
                        help="only the patched/original latency, on untrained models (minutes, not hours)")
    parser.add_argument("--out", default=str(RESULTS / "fit_cost.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.rss_only:
        saved = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        saved.update(memory_figures(rss(args.data_root)))
        Path(args.out).write_text(json.dumps(saved, indent=2))
        print(f"written {args.out}")
        return
    rows = []
    for name in RECIPES:
        if args.only and name not in args.only:
            continue
        if args.latency_only:
            row = latency_only(name, args.data_root)
            rows.append(row)
            print(f"{name:>15}: latency patched/original {row['patched_over_original']:.2f} ({row['patched_path']}; "
                  f"{row['patched_latency_ms']:.1f} vs {row['original_latency_ms']:.1f} ms), "
                  f"MACs {row['surrogate_macs']} vs {row['replaced_macs']}", flush=True)
            continue
        row = run(name, args.data_root)
        rows.append(row)
        print(f"{name:>15}: fit {row['fit_seconds']:.1f} s / training {row['model_train_seconds']:.1f} s "
              f"= {row['fit_over_training']:.2f}, passes {row['model_passes']}, agreement {row['agreement']:.4f}, "
              f"edit {row['edit_seconds']:.2f} s, (fit+edit)/retrain {row['fit_plus_edit_over_retrain']:.2f}, "
              f"latency patched/original {row['patched_over_original']:.2f} ({row['patched_path']}), "
              f"MACs {row['surrogate_macs']} vs {row['replaced_macs']}", flush=True)
    result: dict[str, Any] = {"threads": 1, "machine": platform.machine(), "torch": torch.__version__, "recipes": rows}
    if not args.skip_rss and not args.latency_only:
        result.update(memory_figures(rss(args.data_root)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
