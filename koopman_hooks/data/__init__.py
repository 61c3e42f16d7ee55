"""Built-in datasets: Yin-Yang and a token task (generated in code), MNIST (from a local data root)."""

from koopman_hooks.data.augment import RandomShift
from koopman_hooks.data.loaders import TensorLoader
from koopman_hooks.data.mnist import DATA_ENV_VAR, MissingDataError, load_mnist, resolve_data_root
from koopman_hooks.data.tokens import TokenSequenceDataset, token_class
from koopman_hooks.data.yinyang import YinYangDataset, yinyang_class

__all__ = [
    "DATA_ENV_VAR",
    "MissingDataError",
    "RandomShift",
    "TensorLoader",
    "TokenSequenceDataset",
    "YinYangDataset",
    "load_mnist",
    "resolve_data_root",
    "token_class",
    "yinyang_class",
]
