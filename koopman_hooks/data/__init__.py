"""Built-in datasets: Yin-Yang (generated in code) and MNIST (from a local data root)."""

from koopman_hooks.data.loaders import TensorLoader
from koopman_hooks.data.mnist import DATA_ENV_VAR, MissingDataError, load_mnist, resolve_data_root
from koopman_hooks.data.yinyang import YinYangDataset, yinyang_class

__all__ = [
    "DATA_ENV_VAR",
    "MissingDataError",
    "TensorLoader",
    "YinYangDataset",
    "load_mnist",
    "resolve_data_root",
    "yinyang_class",
]
