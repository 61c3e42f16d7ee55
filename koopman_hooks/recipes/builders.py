"""Datasets and models named in recipes, each ``[model]`` kind with its own checked options."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from koopman_hooks.core.schema import closest, from_mapping
from koopman_hooks.data import TensorLoader, TokenSequenceDataset, YinYangDataset, load_mnist
from koopman_hooks.errors import ConfigError
from koopman_hooks.models import ResMLP


def _options(section: Any) -> dict[str, Any]:
    """A ``[model]`` section's fields as the builder's keyword arguments (all but ``kind``)."""
    return {k: v for k, v in asdict(section).items() if k != "kind"}


@dataclass(frozen=True)
class ResMLPModel:
    """``kind = "resmlp"``: :class:`~koopman_hooks.models.ResMLP`."""

    kind: Literal["resmlp"]
    in_features: int
    width: int = 10
    depth: int = 5
    batch_norm: bool = False

    def build(self, num_classes: int) -> nn.Module:
        return ResMLP(self.in_features, num_classes, self.width, self.depth, self.batch_norm)


@dataclass(frozen=True)
class ResNetModel:
    """``kind = "mnist_resnet18"``: :func:`~koopman_hooks.vision.mnist_resnet18`."""

    kind: Literal["mnist_resnet18"]
    in_chans: int = 1
    stem_stride: int = 1
    maxpool: bool = True
    channels_last: bool = False

    def build(self, num_classes: int) -> nn.Module:
        from koopman_hooks.vision import mnist_resnet18

        return mnist_resnet18(num_classes, self.in_chans, self.stem_stride, self.maxpool, self.channels_last)


@dataclass(frozen=True)
class ViTModel:
    """``kind = "mnist_vit"``: :func:`~koopman_hooks.vision.mnist_vit`."""

    kind: Literal["mnist_vit"]
    depth: int = 6
    embed_dim: int = 64
    patch_size: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    img_size: int = 28
    in_chans: int = 1
    global_pool: Literal["token", "avg"] = "token"
    class_token: bool = True
    drop_path_rate: float = 0.0  # stochastic depth while training (timm's); identity in eval mode
    proj_drop_rate: float = 0.0  # dropout after attention and MLP projections while training

    def build(self, num_classes: int) -> nn.Module:
        from koopman_hooks.vision import mnist_vit

        return mnist_vit(num_classes, **_options(self))


@dataclass(frozen=True)
class BertModel:
    """``kind = "hf_bert"``: :func:`~koopman_hooks.text.bert_classifier` (HuggingFace
    ``BertForSequenceClassification`` from a config; probe ``bert.encoder.layer.*``)."""

    kind: Literal["hf_bert"]
    vocab_size: int = 16
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 64
    max_positions: int = 64
    initializer_range: float = 0.1
    dropout: float = 0.0

    def build(self, num_classes: int) -> nn.Module:
        from koopman_hooks.text import bert_classifier

        return bert_classifier(num_classes, **_options(self))


@dataclass(frozen=True)
class GPT2Model:
    """``kind = "hf_gpt2"``: :func:`~koopman_hooks.text.gpt2_classifier` (HuggingFace
    ``GPT2ForSequenceClassification`` from a config; probe ``transformer.h.*``)."""

    kind: Literal["hf_gpt2"]
    vocab_size: int = 16
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 2
    max_positions: int = 64
    initializer_range: float = 0.1
    dropout: float = 0.0

    def build(self, num_classes: int) -> nn.Module:
        from koopman_hooks.text import gpt2_classifier

        return gpt2_classifier(num_classes, **_options(self))


ModelSection = ResMLPModel | ResNetModel | ViTModel | BertModel | GPT2Model
MODEL_KINDS: dict[str, type[ResMLPModel] | type[ResNetModel] | type[ViTModel] | type[BertModel] | type[GPT2Model]] = {
    "resmlp": ResMLPModel, "mnist_resnet18": ResNetModel, "mnist_vit": ViTModel, "hf_bert": BertModel,
    "hf_gpt2": GPT2Model,
}
#: classes of each ``[data]`` dataset
NUM_CLASSES = {"yinyang": 3, "mnist": 10, "tokens": 4}


def check_model_section(raw: Any) -> ModelSection:
    """The typed ``[model]`` section (``kind`` defaults to ``"resmlp"``)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"model: expected a table, got {type(raw).__name__}")
    kind = raw.get("kind", "resmlp")
    if kind not in MODEL_KINDS:
        raise ConfigError(f"model.kind: unknown model kind {kind!r}{closest(str(kind), list(MODEL_KINDS))} "
                          f"(recipes know {', '.join(MODEL_KINDS)})")
    return from_mapping(MODEL_KINDS[kind], {**raw, "kind": kind}, "model")


VECTOR_FEATURES = {"yinyang": 4, "mnist": 28 * 28}  # a sample's width, as vectors


def check_data_model(data: Any, model: ModelSection) -> None:
    """Refuse a model that cannot read the data: text models need the token task and a
    vocabulary and positions covering it; the other models cannot read tokens; the ResMLP reads
    vectors of the data's width, the vision models unflattened images."""
    text = isinstance(model, (BertModel, GPT2Model))
    if text != (data.dataset == "tokens"):
        raise ConfigError(f"model.kind {model.kind!r} cannot read data.dataset {data.dataset!r}: "
                          "the hf_* kinds read the 'tokens' dataset, the others read yinyang/mnist")
    if isinstance(model, ResMLPModel):
        if data.dataset == "mnist" and not data.flatten:
            raise ConfigError("model.kind 'resmlp' reads vectors: set data.flatten = true to give it MNIST's images")
        features = VECTOR_FEATURES.get(data.dataset)
        if features is not None and model.in_features != features:
            raise ConfigError(f"model.in_features ({model.in_features}) must be {features}, the width of "
                              f"data.dataset {data.dataset!r}")
    if isinstance(model, (ResNetModel, ViTModel)) and (data.dataset != "mnist" or data.flatten):
        raise ConfigError(f"model.kind {model.kind!r} reads images: data.dataset = 'mnist' with flatten = false")
    if text and isinstance(model, (BertModel, GPT2Model)):
        if model.vocab_size < data.vocab_size:
            raise ConfigError(f"model.vocab_size ({model.vocab_size}) is smaller than data.vocab_size ({data.vocab_size})")
        if model.max_positions < data.max_length + 1:
            raise ConfigError(f"model.max_positions ({model.max_positions}) must be at least data.max_length + 1 "
                              f"({data.max_length + 1}: [CLS] and the longest sequence)")


def example_batch(data: Any) -> Any:
    """A batch of the ``[data]`` section's kind (tuple or dict, its fields and shapes) as the
    recipe's loaders give it, made without reading any file."""
    if data.dataset == "tokens":
        dataset: Dataset = TokenSequenceDataset(NUM_CLASSES["tokens"], seed=0, vocab_size=data.vocab_size,
                                                min_length=data.min_length, max_length=data.max_length)
    elif data.dataset == "yinyang":
        dataset = YinYangDataset(NUM_CLASSES["yinyang"], seed=0)
    else:
        images = torch.zeros(2, *((VECTOR_FEATURES["mnist"],) if data.flatten else (1, 28, 28)))
        return images, torch.zeros(2, dtype=torch.long)
    return next(iter(TensorLoader.from_dataset(dataset, 2)))


def build_datasets(data: Any, seed: int, data_root: str | None) -> tuple[Dataset, Dataset, int]:
    """``(train, test, num_classes)`` for the ``[data]`` section."""
    if data.dataset == "yinyang":
        train = YinYangDataset(data.train_size or 10000, seed=data.data_seed + 2 * seed)
        test = YinYangDataset(data.test_size or 2000, seed=data.data_seed + 2 * seed + 1)
        return train, test, NUM_CLASSES["yinyang"]
    if data.dataset == "tokens":
        options = {"vocab_size": data.vocab_size, "min_length": data.min_length, "max_length": data.max_length}
        train_tokens = TokenSequenceDataset(data.train_size or 4000, seed=data.data_seed + 2 * seed, **options)
        test_tokens = TokenSequenceDataset(data.test_size or 1000, seed=data.data_seed + 2 * seed + 1, **options)
        return train_tokens, test_tokens, NUM_CLASSES["tokens"]
    root = data_root or data.data_root
    train_set = load_mnist(True, root, limit=data.train_size, flatten=data.flatten)
    test_set = load_mnist(False, root, limit=data.test_size, flatten=data.flatten)
    return train_set, test_set, NUM_CLASSES["mnist"]


def model_factory(model: ModelSection, num_classes: int) -> Callable[[], nn.Module]:
    """A function building a fresh, untrained model for the ``[model]`` section."""
    return lambda: model.build(num_classes)
