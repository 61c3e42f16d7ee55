"""Datasets and models named in recipes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from koopman_hooks.data import YinYangDataset, load_mnist
from koopman_hooks.models import ResMLP


def build_datasets(cfg: dict[str, Any], seed: int, data_root: str | None) -> tuple[Dataset, Dataset, int]:
    """``(train, test, num_classes)`` for the ``[data]`` section."""
    name = cfg.get("dataset")
    if name == "yinyang":
        train = YinYangDataset(cfg.get("train_size", 10000), seed=cfg.get("data_seed", 0) + 2 * seed)
        test = YinYangDataset(cfg.get("test_size", 2000), seed=cfg.get("data_seed", 0) + 2 * seed + 1)
        return train, test, 3
    if name == "mnist":
        flatten = bool(cfg.get("flatten", False))
        root = data_root or cfg.get("data_root")
        train = load_mnist(True, root, limit=cfg.get("train_size"), flatten=flatten)
        test = load_mnist(False, root, limit=cfg.get("test_size"), flatten=flatten)
        return train, test, 10
    raise ValueError(f"unknown dataset {name!r}; recipes know 'yinyang' and 'mnist'")


def _resmlp(cfg: dict[str, Any], num_classes: int) -> nn.Module:
    return ResMLP(cfg["in_features"], num_classes, cfg.get("width", 10), cfg.get("depth", 5), cfg.get("batch_norm", False))


def _mnist_resnet18(cfg: dict[str, Any], num_classes: int) -> nn.Module:
    from koopman_hooks.vision import mnist_resnet18

    return mnist_resnet18(num_classes, **{k: v for k, v in cfg.items() if k != "kind"})


def _mnist_vit(cfg: dict[str, Any], num_classes: int) -> nn.Module:
    from koopman_hooks.vision import mnist_vit

    return mnist_vit(num_classes, **{k: v for k, v in cfg.items() if k != "kind"})


MODEL_BUILDERS: dict[str, Callable[[dict[str, Any], int], nn.Module]] = {
    "resmlp": _resmlp,
    "mnist_resnet18": _mnist_resnet18,  # [model] keys: in_chans, stem_stride, maxpool
    "mnist_vit": _mnist_vit,  # [model] keys: depth, embed_dim, patch_size, num_heads, ... (timm kwargs)
}


def model_factory(cfg: dict[str, Any], num_classes: int) -> Callable[[], nn.Module]:
    """A function building a fresh, untrained model for the ``[model]`` section."""
    kind = cfg.get("kind", "resmlp")
    if kind not in MODEL_BUILDERS:
        raise ValueError(f"unknown model kind {kind!r}; recipes know {sorted(MODEL_BUILDERS)}")
    return lambda: MODEL_BUILDERS[kind](cfg, num_classes)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
