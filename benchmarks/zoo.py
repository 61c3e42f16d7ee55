"""A held-out zoo: small models nobody tuned the probe for, each fitted with defaults only.

Every entry trains its own model on its own data subset, then calls
``KoopmanProbe(model, layers).fit(loader)`` with nothing else set (the HuggingFace entries name
their dict batches' ``label_key``), and records agreement (the strict patched model's argmax
equals the model's, on held-out data) and the mixed diagnostic, the reductions, state FVU and
latent FVU per probed layer, the linear (DMD) baseline's agreement, and the fit's seconds next
to the model's training seconds. ``--fast`` shrinks every entry.

    python benchmarks/zoo.py [--fast] [--only NAME ...] [--out benchmarks/results/zoo.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from koopman_hooks import KoopmanProbe
from koopman_hooks.data import TensorLoader, TokenSequenceDataset, YinYangDataset
from koopman_hooks.training import train_classifier

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Entry:
    name: str
    description: str
    build: Callable[[bool], tuple[nn.Module, list[str], TensorLoader, TensorLoader, dict[str, Any]]]


def _digits(fast: bool, image: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    if image:
        x = x.reshape(-1, 1, 8, 8)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = 1000 if fast else 1200
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def _mnist(n_train: int, n_test: int, flatten: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from koopman_hooks.data import load_mnist

    train, test = load_mnist(True, limit=n_train, flatten=flatten), load_mnist(False, limit=n_test, flatten=flatten)
    return train.tensors[0], train.tensors[1], test.tensors[0], test.tensors[1]


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float) -> float:
    torch.manual_seed(0)
    start = time.perf_counter()
    train_classifier(model, TensorLoader(x, y, batch_size=64, shuffle=True), epochs, lr=lr, verbose=False)
    return time.perf_counter() - start


def plain_mlp(fast: bool) -> tuple[nn.Module, list[str], TensorLoader, TensorLoader, dict[str, Any]]:
    """A plain 3-layer ReLU MLP, 64 wide, on scikit-learn's digits; first to third ReLU."""
    xtr, ytr, xte, yte = _digits(fast)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    seconds = _train(model, xtr, ytr, 10 if fast else 30, 3e-3)
    return model, ["1", "5"], TensorLoader(xtr, ytr, batch_size=128, shuffle=True), TensorLoader(xte, yte, batch_size=500), {
        "train_seconds": seconds}


def batchnorm_mlp(fast: bool) -> tuple[nn.Module, list[str], TensorLoader, TensorLoader, dict[str, Any]]:
    """A 4-block residual MLP with batch norm, 128 wide, on an MNIST subset; all four blocks."""
    from koopman_hooks.models import ResMLP

    xtr, ytr, xte, yte = _mnist(2000 if fast else 6000, 1000, flatten=True)
    torch.manual_seed(2)
    model = ResMLP(784, 10, width=128, depth=4, batch_norm=True)
    seconds = _train(model, xtr, ytr, 4 if fast else 6, 2e-3)
    return model, ["blocks.*"], TensorLoader(xtr, ytr, batch_size=256, shuffle=True), TensorLoader(xte, yte, batch_size=500), {
        "train_seconds": seconds}


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU())
        self.conv3 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv3(self.conv2(self.conv1(x))))


def conv_net(fast: bool) -> tuple[nn.Module, list[str], TensorLoader, TensorLoader, dict[str, Any]]:
    """A 3-conv net on 8x8 digits images; conv1 -> conv3."""
    xtr, ytr, xte, yte = _digits(fast, image=True)
    torch.manual_seed(3)
    model = SmallCNN()
    seconds = _train(model, xtr, ytr, 10 if fast else 25, 3e-3)
    return model, ["conv1", "conv2", "conv3"], TensorLoader(xtr, ytr, batch_size=128, shuffle=True), TensorLoader(
        xte, yte, batch_size=500), {"train_seconds": seconds}


def resnet(fast: bool) -> tuple[nn.Module, list[str], TensorLoader, TensorLoader, dict[str, Any]]:
    """torchvision's ResNet-18 (3x3 stem, stride 2) on an MNIST subset; layer1 -> layer4."""
    from koopman_hooks.vision import mnist_resnet18

    xtr, ytr, xte, yte = _mnist(1500 if fast else 5000, 500, flatten=False)
    torch.manual_seed(4)
    model = mnist_resnet18(10, stem_stride=2)
    seconds = _train(model, xtr, ytr, 3, 2e-3)
    return model, ["layer1", "layer2", "layer3", "layer4"], TensorLoader(xtr, ytr, batch_size=128, shuffle=True), TensorLoader(
        xte, yte, batch_size=250), {"train_seconds": seconds}


def vit(fast: bool) -> tuple[nn.Module, list[str], TensorLoader, TensorLoader, dict[str, Any]]:
    """A small timm ViT (4 blocks, CLS token) on an MNIST subset; blocks.0 -> blocks.3."""
    from koopman_hooks.vision import mnist_vit

    xtr, ytr, xte, yte = _mnist(2500 if fast else 8000, 1000, flatten=False)
    torch.manual_seed(5)
    model = mnist_vit(10, depth=4, embed_dim=48, patch_size=7, num_heads=4)
    seconds = _train(model, xtr, ytr, 8 if fast else 10, 2e-3)
    return model, ["blocks.0", "blocks.3"], TensorLoader(xtr, ytr, batch_size=128, shuffle=True), TensorLoader(
        xte, yte, batch_size=500), {"train_seconds": seconds}


class TupleNet(nn.Module):
    """Blocks that return ``(hidden, aux)`` tuples, a model output that is a tuple too."""

    class Block(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.linear = nn.Linear(width, width)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = x + torch.tanh(self.linear(x))
            return h, h.norm(dim=-1)

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 24)
        self.blocks = nn.ModuleList([self.Block(24) for _ in range(4)])
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.embed(x)
        aux = []
        for block in self.blocks:
            h, a = block(h)
            aux.append(a)
        return self.head(h), aux


def tuple_outputs(fast: bool) -> tuple[nn.Module, list[str], TensorLoader, TensorLoader, dict[str, Any]]:
    """Blocks with tuple outputs on Yin-Yang (a dataset other zoo entries do not use)."""
    train, test = YinYangDataset(3000 if fast else 6000, seed=10), YinYangDataset(1000, seed=11)
    torch.manual_seed(6)
    model = TupleNet()

    class Scores(nn.Module):  # train_classifier needs a tensor output; the probe sees the tuple
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)[0]

    seconds = _train(Scores(model), train.inputs, train.targets, 10 if fast else 30, 1e-2)
    return model, ["blocks.0", "blocks.3"], TensorLoader.from_dataset(train, 256, shuffle=True), TensorLoader.from_dataset(
        test, 500), {"train_seconds": seconds}


def train_mode(fast: bool) -> tuple[nn.Module, list[str], TensorLoader, TensorLoader, dict[str, Any]]:
    """An MLP with dropout and batch norm handed over in train mode (the probe must use eval mode)."""
    xtr, ytr, xte, yte = _digits(fast)
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(64, 96), nn.BatchNorm1d(96), nn.ReLU(), nn.Dropout(0.2), nn.Linear(96, 96),
                          nn.BatchNorm1d(96), nn.ReLU(), nn.Dropout(0.2), nn.Linear(96, 10))
    seconds = _train(model, xtr, ytr, 10 if fast else 30, 3e-3)
    model.train()
    return model, ["2", "6"], TensorLoader(xtr, ytr, batch_size=128, shuffle=True), TensorLoader(xte, yte, batch_size=500), {
        "train_seconds": seconds}


def _tokens(kind: str, fast: bool) -> tuple[nn.Module, list[str], TensorLoader, TensorLoader, dict[str, Any]]:
    from koopman_hooks.text import bert_classifier, gpt2_classifier

    train = TokenSequenceDataset(2000 if fast else 4000, seed=20)
    test = TokenSequenceDataset(1000, seed=21)
    depth = 2 if fast else 4
    torch.manual_seed(8)
    model = (bert_classifier if kind == "bert" else gpt2_classifier)(4, num_layers=depth)
    start = time.perf_counter()
    train_classifier(model, TensorLoader.from_dataset(train, 64, shuffle=True), 6 if fast else 8, lr=3e-3, verbose=False)
    seconds = time.perf_counter() - start
    prefix = "bert.encoder.layer" if kind == "bert" else "transformer.h"
    return model, [f"{prefix}.0", f"{prefix}.{depth - 1}"], TensorLoader.from_dataset(train, 512), TensorLoader.from_dataset(
        test, 500), {"train_seconds": seconds, "probe": {"label_key": "labels"}}


def bert(fast: bool) -> tuple[nn.Module, list[str], TensorLoader, TensorLoader, dict[str, Any]]:
    """HuggingFace BERT (4 layers, 32 wide, from a config) on the padded token task; first -> last layer."""
    return _tokens("bert", fast)


def gpt2(fast: bool) -> tuple[nn.Module, list[str], TensorLoader, TensorLoader, dict[str, Any]]:
    """HuggingFace GPT-2 (4 blocks, 32 wide, from a config) on the padded token task; first -> last block."""
    return _tokens("gpt2", fast)


ZOO = [
    Entry("plain_mlp", "3-layer ReLU MLP (64 wide), digits, relu1 -> relu3", plain_mlp),
    Entry("batchnorm_mlp", "residual MLP with batch norm (128 wide, 4 blocks), MNIST subset, all blocks", batchnorm_mlp),
    Entry("conv_net", "3-conv net, 8x8 digits images, conv1 -> conv2 -> conv3", conv_net),
    Entry("resnet18", "torchvision ResNet-18, MNIST subset, layer1 -> layer4", resnet),
    Entry("vit", "timm ViT (4 blocks, CLS token), MNIST subset, blocks.0 -> blocks.3", vit),
    Entry("tuple_outputs", "blocks returning (hidden, aux) tuples, Yin-Yang, blocks.0 -> blocks.3", tuple_outputs),
    Entry("train_mode", "MLP with dropout + batch norm handed over in train mode, digits", train_mode),
    Entry("bert", "HuggingFace BertForSequenceClassification (4 x 32), token task with attention masks, dict batches",
          bert),
    Entry("gpt2", "HuggingFace GPT2ForSequenceClassification (4 x 32), token task with attention masks, dict batches",
          gpt2),
]


def run_entry(entry: Entry, fast: bool) -> dict[str, Any]:
    model, layers, fit_loader, test_loader, extra = entry.build(fast)
    was_training = model.training
    probe = KoopmanProbe(model, layers, verbose=False, **extra.get("probe", {}))  # defaults only
    start = time.perf_counter()
    probe.fit(fit_loader)
    fit_seconds = time.perf_counter() - start
    metrics = probe.evaluate(test_loader)
    fitted = probe.fetch_model()
    assert model.training == was_training  # the model's mode is as it was handed over
    sizes = fitted.sizes
    return {
        "name": entry.name,
        "description": entry.description,
        "layers": fitted.layers,
        "model_accuracy": metrics.get("model_accuracy"),
        "agreement": metrics["agreement"],
        "mixed_agreement": metrics["mixed_agreement"],
        "lossy_reduction_reaches_output": metrics["lossy_reduction_reaches_output"],
        "reduce": {name: adapter.reduce for name, adapter in fitted.adapters.items()},
        "linear_baseline_agreement": metrics["linear_baseline"]["agreement"],
        "state_fvu_per_layer": metrics["state_fvu_per_layer"],
        "latent_fvu_per_layer": metrics.get("latent_fvu_per_layer", {}),
        "latent_fvu": metrics["latent_fvu"],
        "fit_seconds": fit_seconds,
        "model_train_seconds": extra["train_seconds"],
        "sizes": None if sizes is None else {"width": sizes.width, "latent_dim": sizes.latent_dim, "hidden": list(sizes.hidden),
                                             "steps": list(sizes.steps), "batch_size": sizes.batch_size,
                                             "surrogate_macs": sizes.surrogate_macs, "replaced_macs": sizes.replaced_macs},
        "fit": fitted.info,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="smaller data and shorter training (the test suite's variant)")
    parser.add_argument("--only", nargs="*", default=None, help="entries to run (default: all)")
    parser.add_argument("--out", default=str(RESULTS / "zoo.json"))
    parser.add_argument("--data-root", default=None, help="MNIST in torchvision's layout (default: $KOOPMAN_HOOKS_DATA)")
    args = parser.parse_args()
    if args.data_root:
        os.environ["KOOPMAN_HOOKS_DATA"] = args.data_root
    torch.set_num_threads(1)
    rows = []
    for entry in ZOO:
        if args.only and entry.name not in args.only:
            continue
        row = run_entry(entry, args.fast)
        rows.append(row)
        fvu = ", ".join(f"{k} {v:.3f}" for k, v in row["state_fvu_per_layer"].items())
        print(f"{row['name']:>14}: agreement {row['agreement']:.4f} (mixed {row['mixed_agreement']:.4f}, "
              f"linear {row['linear_baseline_agreement']:.4f}), "
              f"state FVU {fvu}, latent FVU {row['latent_fvu']:.3f}, fit {row['fit_seconds']:.1f} s "
              f"(model training {row['model_train_seconds']:.1f} s)", flush=True)
    result = {"fast": args.fast, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "python": platform.python_version(), "torch": torch.__version__, "entries": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
