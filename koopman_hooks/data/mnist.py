"""MNIST from a local data root, in torchvision's layout (``<root>/MNIST/raw``)."""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import TensorDataset

DATA_ENV_VAR = "KOOPMAN_HOOKS_DATA"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class MissingDataError(FileNotFoundError):
    """A dataset's files are not where the data root says."""


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """The data root: the argument, else ``$KOOPMAN_HOOKS_DATA``, else ``./data``."""
    if data_root is None:
        data_root = os.environ.get(DATA_ENV_VAR, "data")
    return Path(data_root).expanduser()


def load_mnist(
    train: bool,
    data_root: str | os.PathLike | None = None,
    limit: int | None = None,
    flatten: bool = False,
) -> TensorDataset:
    """Load MNIST as a normalised in-memory ``TensorDataset`` of ``(image, label)``.

    Images are ``(1, 28, 28)`` float32, or ``(784,)`` with ``flatten=True``. ``limit`` keeps
    the first ``limit`` samples (for tests and quick runs). Nothing is downloaded: missing
    files raise :class:`MissingDataError` saying how to get them.
    """
    try:
        from torchvision.datasets import MNIST
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("MNIST needs torchvision: pip install 'koopman_hooks[vision]'") from err
    root = resolve_data_root(data_root)
    try:
        dataset = MNIST(root=str(root), train=train, download=False)
    except RuntimeError as err:
        raise MissingDataError(
            f"MNIST files not found under {root.resolve()} (expected {root / 'MNIST' / 'raw'}). "
            f"Pass --data-root / data_root=..., or set ${DATA_ENV_VAR}, to a folder holding MNIST "
            "in torchvision's layout; on a machine with internet access, "
            f"`python -c \"import torchvision; torchvision.datasets.MNIST('{root}', download=True)\"` "
            "fetches it."
        ) from err
    images = dataset.data
    labels = dataset.targets
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = (images.float().div_(255.0) - MNIST_MEAN) / MNIST_STD
    x = x.reshape(len(x), -1) if flatten else x.unsqueeze(1)
    return TensorDataset(x.contiguous(), labels.long().clone())
